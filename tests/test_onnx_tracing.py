"""How export traces its graphs: one torch.export trace each (capture.py), in worker processes
for small models (tracing.py), with the same result as torch.onnx.export in this process."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from conftest import config_1stage, random_torch_model  # noqa: E402
from hnet_export import capture, tracing  # noqa: E402
from hnet_export.layout import TensorSpec  # noqa: E402
from hnet_export.step_where import DERIVED  # noqa: E402


class LoweredOps(torch.nn.Module):
    """Every operator capture._lower rewrites: to(dtype) (a real cast and a no-op one), &, 1 - x,
    .item() and argsort, with a data-dependent size like the chunk count M."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        same = x.to(torch.float32)  # no-op cast
        counts = (mask & (x > 0)).sum(-1)
        m = counts.max().clamp(min=1).item()
        torch._check(m >= 1)
        torch._check(m <= x.shape[1])
        order = torch.argsort((~(x > 0)).to(torch.int64), dim=1, descending=False)[:, :m]
        picked = (1 - same).gather(1, order)
        return picked.to(torch.float64).to(torch.float32), counts


def _run(model: bytes, feeds: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(model).run(None, feeds)


def _serialized(model) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString()


def test_one_trace_capture_matches_torch_onnx_export_on_every_lowered_operator():
    inputs = [TensorSpec("x", "float32", ["batch", "length"], ""), TensorSpec("mask", "bool", ["batch", "length"], "")]
    outputs = [TensorSpec("picked", "float32", ["batch", "m"], ""), TensorSpec("counts", "int64", ["batch"], "")]
    fast = tracing.trace(LoweredOps(), inputs, outputs, 20, None)
    assert capture.last_path() == capture.FAST
    module = LoweredOps()
    args = (torch.randn(2, 7), torch.ones(2, 7, dtype=torch.bool))
    slow = capture.to_onnx(module, args, ["x", "mask"], ["picked", "counts"], 20,
                           ({0: "batch", 1: "length"}, {0: "batch", 1: "length"}), fast=False)
    assert capture.last_path() == capture.FALLBACK
    rng = np.random.default_rng(0)
    for shape in [(3, 11), (1, 5)]:
        x = rng.standard_normal(shape).astype(np.float32)
        mask = rng.random(shape) < 0.8
        mask[:, 0] = True
        got, want = _run(_serialized(fast), {"x": x, "mask": mask}), _run(_serialized(slow), {"x": x, "mask": mask})
        reference = LoweredOps()(torch.from_numpy(x), torch.from_numpy(mask))
        for a, b, r in zip(got, want, reference):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, r.numpy())


def test_every_graph_of_an_export_takes_the_one_trace_path(official_onnx_export):
    meta = json.load(open(os.path.join(official_onnx_export, "export.json")))
    traced = {name: capture.FAST for name in meta["graphs"] if name != "step"}
    assert meta["exporter"]["capture"] == {**traced, "step": DERIVED}


@pytest.mark.slow  # (every export of the default run goes through the workers, and its tests compare with torch)
def test_graphs_traced_by_worker_processes_equal_those_traced_here(tmp_path):
    model = random_torch_model(config_1stage(), seed=5)
    names = ["step", "step_cond"]  # with jobs=2 this process traces step, a worker step_cond
    here = list(tracing.trace_graphs(model, names, 64, "float32", 20, jobs=1, workdir=str(tmp_path / "a")))
    there = list(tracing.trace_graphs(model, names, 64, "float32", 20, jobs=2, workdir=str(tmp_path / "b")))
    assert [(n, how) for n, _, how in there] == [(n, capture.FAST) for n in names]
    assert [_serialized(m) for _, m, _ in here] == [_serialized(m) for _, m, _ in there]
    assert not (tmp_path / "b").exists()  # the model copy and the workers' files are gone


def test_closing_a_parallel_trace_early_stops_its_workers_and_removes_its_files(tmp_path):
    model = random_torch_model(config_1stage(), seed=5)
    work = tmp_path / "work"
    traced = tracing.trace_graphs(model, ["step", "prefill"], 64, "float32", 20, jobs=2, workdir=str(work))
    name, _, _ = next(traced)
    assert name == "step" and work.exists()
    traced.close()  # what export does when writing the first graph fails (or Ctrl-C arrives)
    assert not work.exists()
    assert not multiprocessing.active_children()


def test_large_models_are_traced_in_this_process():
    assert tracing.default_jobs(tracing.PARALLEL_MAX_BYTES + 1, 4) == 1
    assert 1 <= tracing.default_jobs(20 << 20, 4) <= 4
    assert tracing.default_jobs(20 << 20, 1) == 1


def test_float16_graphs_take_torch_onnx_export():
    """_promote_types has no "op math" (float32 reductions of float16 tensors, cast back), which
    torch.onnx's pass adds; a float16 export through it fails shape inference (tests/test_onnx_large.py)."""

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4, dtype=torch.float16)

        def forward(self, x):
            return self.linear(x).sum(-1)

    spec = [TensorSpec("x", "float16", ["batch", 4], "")]
    tracing.trace(Half(), spec, [TensorSpec("y", "float16", ["batch"], "")], 20, None)
    assert capture.last_path() == capture.FALLBACK

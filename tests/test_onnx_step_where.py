"""step.onnx is derived from step_cond.onnx (step_where.py) instead of traced: the derived graph must
compute exactly what a traced "where" step graph computes, whether or not a sample is at a boundary."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from conftest import config_2stage, random_torch_model  # noqa: E402
from hnet_export import tracing  # noqa: E402
from hnet_export.layout import graph_io  # noqa: E402
from hnet_export.step_where import where_step_from_cond  # noqa: E402

MAX_SEQLEN = 64


def _feeds(specs, rng: np.random.Generator, batch: int) -> dict:
    feeds = {}
    for spec in specs:
        shape = [batch if d == "batch" else (5 if isinstance(d, str) else d) for d in spec.shape]
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 256, size=shape).astype(np.int64)
        elif spec.dtype == "int64":  # per-sample lengths: some fresh (0), some mid-text
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def test_the_derived_where_step_equals_a_traced_one_bit_for_bit():
    model = random_torch_model(config_2stage(), seed=11)
    traced = {name: onnx_ir_model for name, onnx_ir_model, _ in tracing.trace_graphs(
        model, ["step", "step_cond"], MAX_SEQLEN, "float32", 20, jobs=1, workdir="unused")}
    import onnx_ir as ir

    cond = ir.serde.serialize_model(traced["step_cond"])
    derived = where_step_from_cond(cond)
    assert not any(n.op_type == "If" for n in derived.graph.node) and any(n.op_type == "If" for n in cond.graph.node)
    onnx.checker.check_model(derived, full_check=True)

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (ir.serde.serialize_model(traced["step"]), derived)]
    inputs, outputs = graph_io(model.config, MAX_SEQLEN, "float32", "step")
    runs_without_boundary = runs_with_boundary = 0
    for seed in range(16):
        feeds = _feeds(inputs, np.random.default_rng(seed), batch=1 + seed % 3)
        want, got = (s.run(None, feeds) for s in sessions)
        for spec, a, b in zip(outputs, want, got):
            assert a.dtype == b.dtype and a.shape == b.shape, spec.name
            np.testing.assert_array_equal(a, b, err_msg=spec.name)  # NaN where the inner stage did not run
        at_boundary = dict(zip([s.name for s in outputs], want))["stage0.boundary_mask"].any()
        runs_with_boundary += bool(at_boundary)
        runs_without_boundary += not at_boundary
    assert runs_with_boundary and runs_without_boundary  # both of the cond graph's branches were compared


def test_a_graph_without_if_is_left_as_it_is():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    model = onnx.helper.make_model(graph)
    assert where_step_from_cond(model).SerializeToString() == model.SerializeToString()

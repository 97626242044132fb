"""Weight-only int8/int4 ONNX exports and weights shared between sessions.

One float32 export of a 2-stage config whose innermost level is wide enough (~80 MB of weights,
so the export uses the shared weights file) to see a copy of the weights in the process's RSS;
quantize_export makes its int8 and int4 copies without tracing again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import random_torch_model
from hnet_core.config import HNetConfig
from hnet_core.sampling import SamplingParams
from hnet_export import OnnxHNet, stream_generate
from hnet_export.exporter import WEIGHTS_FILE, export_model, quantize_export
from hnet_export.weights import Quantization

MAX_SEQLEN = 96
BLOCK = 32
# Stated tolerances against the float32 export, on random weights (the bundled model's bits per
# byte are in bench/bench_onnx_quant.py): mean |logit difference| relative to mean |logit| (one
# int4 MatMul alone is ~7% off at its largest entry on Gaussian weights, and a random model's
# layers compound it), and the share of routing decisions that differ.
LOGIT_TOLERANCE = {"int8": 0.02, "int4": 0.25}
BOUNDARY_DISAGREEMENT = {"int8": 0.02, "int4": 0.05}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wide_2stage() -> HNetConfig:
    return HNetConfig.from_dict({
        "arch_layout": ["m1", ["T1m1", ["t1M1"], "m1T1"], "m1"], "d_model": [32, 64, 768],
        "d_intermediate": [0, 128, 3072], "ssm_cfg": {"chunk_size": 8, "d_conv": 4, "d_state": 16, "expand": 2},
        "attn_cfg": {"num_heads": [2, 2, 8], "rotary_emb_dim": [8, 8, 16], "window_size": [5, 3, -1]},
    })


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch_model = random_torch_model(wide_2stage(), seed=5)
    base = tmp_path_factory.mktemp("onnx_quant")
    dirs = {"float32": str(base / "float32")}
    export_model(torch_model, dirs["float32"], max_seqlen=MAX_SEQLEN, external_data=True, jobs=1)  # both step variants
    for kind in ("int8", "int4"):
        dirs[kind] = str(base / kind)
        quantize_export(dirs["float32"], dirs[kind], Quantization(kind, block_size=BLOCK))
    weight_bytes = sum(v.numel() * v.element_size() for v in torch_model.state_dict().values())
    return dirs, weight_bytes


def _text_ids(batch: int, length: int) -> np.ndarray:
    text = b"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    return np.array([[254, *text[7 * b : 7 * b + length - 1]] for b in range(batch)])


def _run(path: str, variant: str, ids: np.ndarray, prompt: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefill `prompt` bytes, then teacher-force the rest: per position the logits and every stage's
    boundary decisions (NaN-free: a stage that did not run in a step counts as 'no boundary')."""
    model = OnnxHNet(path, provider="cpu", threads=1, step_variant=variant)
    out = model.prefill(ids[:, :prompt])
    logits, decisions = [out.logits], [np.concatenate([r.boundary_mask[:, :prompt] for r in out.routing[:1]], 1)]
    inner = [r.boundary_mask[r.valid] for r in out.routing[1:]]
    for t in range(prompt, ids.shape[1]):
        out = model.step(ids[:, t : t + 1])
        logits.append(out.logits)
        decisions.append(out.routing[0].boundary_mask)
        inner += [r.boundary_mask & r.valid for r in out.routing[1:]]
    return [np.concatenate(logits, 1), np.concatenate(decisions, 1)], inner


def test_export_json_records_the_quantization_and_graphs_use_matmulnbits(exports):
    dirs, weight_bytes = exports
    for kind, bits in (("int8", 8), ("int4", 4)):
        meta = json.load(open(os.path.join(dirs[kind], "export.json")))
        q = meta["quantization"]
        assert q["kind"] == kind and q["bits"] == bits and q["block_size"] == BLOCK and q["op"] == "com.microsoft.MatMulNBits"
        assert any("main_network.main_network.main_network.layers.1.mlp.fc1" in n for n in q["quantized"])
        assert {n for n in q["float"] if "routing_module" in n} == {
            "model.backbone.routing_module.q_proj_layer.weight", "model.backbone.routing_module.k_proj_layer.weight",
            "model.backbone.main_network.routing_module.q_proj_layer.weight",
            "model.backbone.main_network.routing_module.k_proj_layer.weight"}
        assert meta["weights"]["file"] == WEIGHTS_FILE and set(meta["graphs"]) == {"prefill", "extend", "step", "step_cond"}
        graph = onnx.load(os.path.join(dirs[kind], "step_cond.onnx"), load_external_data=False)
        ops = [n.op_type for n in graph.graph.node]
        assert "MatMulNBits" in ops
        # The weights file shrinks about as 32/bits (scales and zero points: 5 bytes per block of 16).
        size = os.path.getsize(os.path.join(dirs[kind], WEIGHTS_FILE))
        assert size < weight_bytes * (bits / 32 + 0.1), (kind, size, weight_bytes)
    meta = json.load(open(os.path.join(dirs["float32"], "export.json")))
    assert meta["quantization"] is None and all(n in meta["weights"]["tensors"] for n in meta["weights"]["tensors"])


@pytest.mark.parametrize("variant", ["where", "cond"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_logits_and_boundaries_stay_close_to_float32(exports, kind, variant):
    dirs, _ = exports
    ids = _text_ids(batch=2 if variant == "where" else 1, length=40)
    (ref_logits, ref_stage0), ref_inner = _run(dirs["float32"], variant, ids, prompt=20)
    (logits, stage0), inner = _run(dirs[kind], variant, ids, prompt=20)
    assert np.isfinite(logits).all()
    relative = np.abs(logits - ref_logits).mean() / np.abs(ref_logits).mean()
    assert relative <= LOGIT_TOLERANCE[kind], relative
    assert relative > 0  # the graphs really are quantized
    assert np.mean(stage0 != ref_stage0) <= BOUNDARY_DISAGREEMENT[kind]
    if all(a.shape == b.shape for a, b in zip(inner, ref_inner)):  # same chunks: compare inner decisions too
        changed = sum(int((a != b).sum()) for a, b in zip(inner, ref_inner))
        assert changed <= BOUNDARY_DISAGREEMENT[kind] * max(1, sum(a.size for a in ref_inner))


def _branches(graph):
    return [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]


@pytest.mark.parametrize("kind", ["float32", "int8", "int4"])
def test_if_branch_weights_live_in_the_branch_that_reads_them(exports, kind):
    """The CPU provider pre-packs only a graph's own initializers: a MatMulNBits in step_cond's If
    reading outer-scope weights ran 2-3x slower. The main graph keeps only what its own nodes read;
    the inner levels' weights (quantized ones included, after quantizing a float export whose weights
    were already pushed down) sit in the branches, down to the nested If of the innermost level."""
    dirs, _ = exports
    graph = onnx.load(os.path.join(dirs[kind], "step_cond.onnx"), load_external_data=False).graph
    read_by_main = {i for n in graph.node for i in n.input}
    assert {i.name for i in graph.initializer} <= read_by_main
    branch_weights = {i.name for sub in _branches(graph) for i in sub.initializer}
    nested = {i.name for sub in _branches(graph) for inner in _branches(sub) for i in inner.initializer}
    assert any("main_network.main_network.main_network.layers.1.mlp.fc1" in n for n in nested), sorted(nested)[:5]
    assert branch_weights and not branch_weights & read_by_main
    if kind != "float32":
        quantized = [n for sub in _branches(graph) for n in sub.node if n.op_type == "MatMulNBits"]
        assert quantized and all(n.input[1] in {i.name for i in sub.initializer}
                                 for sub in _branches(graph) for n in sub.node if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_exports_generate_at_batch_1_and_2(exports, kind):
    dirs, _ = exports
    greedy = SamplingParams(temperature=0)
    for prompts, graph in ((["Hello there"], "step_cond"), (["Hello there", "The spiral stairs"], "step")):
        model = OnnxHNet(dirs[kind], provider="cpu", threads=1)
        steps = list(stream_generate(model, prompts, max_tokens=12, sampling=greedy))
        assert len(steps) == 12 and all(len(s.bytes) == len(prompts) for s in steps)
        # The runtime's choice, as for float exports: step_cond at batch 1 on CPU, step.onnx above.
        other = "step" if graph == "step_cond" else "step_cond"
        assert graph in model.sessions and other not in model.sessions


_GROWTH = """
import sys, numpy as np
from hnet_export import OnnxHNet

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

ids = np.array([[254, *b"Hello, w"]])
share, prepack = sys.argv[2] == "1", sys.argv[3] == "1"
OnnxHNet(sys.argv[1], provider="cpu", threads=1, share_weights=share, prepack=prepack).prefill(ids[:, :2])  # warm-up
before = rss()
model = OnnxHNet(sys.argv[1], provider="cpu", threads=1, share_weights=share, prepack=prepack, step_variant="where")
model.prefill(ids[:, :4])
model.step(ids[:, 4:5])
model.step_variant = "cond"
model.step(ids[:, 5:6])
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS is read from /proc (Linux)")
def test_sessions_of_one_model_share_one_copy_of_the_weights(exports):
    """RSS added by loading, prefilling and stepping with both step variants (three sessions), each
    in a fresh process (a heap holding freed copies would hide new ones)."""
    dirs, weight_bytes = exports

    def growth(share: bool, prepack: bool) -> int:
        proc = subprocess.run([sys.executable, "-c", _GROWTH, dirs["float32"], str(int(share)), str(int(prepack))],
                              capture_output=True, text=True, check=True)
        return int(proc.stdout.split()[-1])

    # Shared weights, no pre-packing: one copy for all sessions. (By default the step sessions of a
    # float export pre-pack: faster matrix-vector products for one more copy per step graph in use.)
    shared = growth(share=True, prepack=False)
    # The check can fail: sessions that each load and pre-pack their own weights (the runtime before
    # sharing) hold about 2.4 copies here, shared ones 1.35 (the rest is the three sessions' own
    # graphs and buffers, about 18 MB whatever the model's size).
    private = growth(share=False, prepack=True)
    assert private - shared > 0.8 * weight_bytes, (private, shared, weight_bytes)
    assert shared < 1.5 * weight_bytes, (shared, weight_bytes)


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("kind", ["float32", "int4"])
def test_io_binding_keeps_states_in_onnxruntime_values_and_matches_plain_runs(exports, kind):
    """The CUDA provider's code path (states bound as OrtValues between steps), run on the CPU provider."""
    import onnxruntime as ort

    dirs, _ = exports
    ids = _text_ids(batch=2, length=20)
    plain = OnnxHNet(dirs[kind], provider="cpu", threads=1, io_binding=False)
    bound = OnnxHNet(dirs[kind], provider="cpu", threads=1, io_binding=True)
    for model in (plain, bound):
        model.prefill(ids[:, :12])
    for t in range(12, 20):
        a, b = plain.step(ids[:, t : t + 1]), bound.step(ids[:, t : t + 1])
        assert np.array_equal(a.logits, b.logits)
    assert all(isinstance(v, ort.OrtValue) for v in bound._states.values())


@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu and a CUDA GPU (not run on CPU-only machines)")
@pytest.mark.parametrize("kind", ["float32", "int8", "int4"])
def test_cuda_provider_keeps_states_on_the_device_and_matches_cpu(exports, kind):
    dirs, _ = exports
    ids = _text_ids(batch=2, length=20)
    cpu = OnnxHNet(dirs[kind], provider="cpu", threads=1)
    gpu = OnnxHNet(dirs[kind], provider="cuda")
    assert gpu.io_binding
    for model in (cpu, gpu):
        model.prefill(ids[:, :12])
    for t in range(12, 20):
        a, b = cpu.step(ids[:, t : t + 1]), gpu.step(ids[:, t : t + 1])
        assert np.abs(a.logits - b.logits).mean() <= 1e-2 * np.abs(a.logits).mean()
    assert all(v.device_name().lower() == "cuda" for v in gpu._states.values())

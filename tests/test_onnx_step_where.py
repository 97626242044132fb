"""step.onnx is derived from step_cond.onnx (step_where.py) instead of traced: the derived graph must
compute exactly what a traced "where" step graph computes, whether or not a sample is at a boundary."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from hnet_export import tracing  # noqa: E402
from hnet_export.layout import graph_io  # noqa: E402
from hnet_export.step_where import where_step_from_cond  # noqa: E402

MAX_SEQLEN = 128  # as tests/test_onnx_configs.py, whose export this shares


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


def test_the_derived_where_step_equals_a_traced_one_bit_for_bit(onnx_export):
    # The 2-stage export the ONNX config tests share (nested Ifs; weights in a shared external file).
    model, out = onnx_export("2stage", max_seqlen=MAX_SEQLEN, external_data=True, batch_variants=True)
    derived = onnx.load(os.path.join(out, "step.onnx"), load_external_data=False)
    cond = onnx.load(os.path.join(out, "step_cond.onnx"), load_external_data=False)
    assert not any(n.op_type == "If" for n in derived.graph.node) and any(n.op_type == "If" for n in cond.graph.node)
    (_, traced, _), = tracing.trace_graphs(model, ["step"], MAX_SEQLEN, "float32", 20, jobs=1, workdir="unused")

    import onnx_ir as ir

    sessions = [ort.InferenceSession(ir.serde.serialize_model(traced).SerializeToString(),
                                     providers=["CPUExecutionProvider"]),
                ort.InferenceSession(os.path.join(out, "step.onnx"), providers=["CPUExecutionProvider"])]
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


def test_where_step_from_cond_inlines_nested_ifs_and_passes_the_checker(onnx_export):
    _, out = onnx_export("2stage", max_seqlen=MAX_SEQLEN, external_data=True, batch_variants=True)
    cond = onnx.load(os.path.join(out, "step_cond.onnx"), load_external_data=False)
    derived = where_step_from_cond(cond)
    assert not any(n.op_type == "If" for n in derived.graph.node)
    assert any(n.op_type == "If" for n in cond.graph.node)  # the input is left as it was
    assert len({n.name for n in derived.graph.node}) == len(derived.graph.node)
    assert {i.name for i in derived.graph.initializer} <= {i for n in derived.graph.node for i in n.input}
    onnx.checker.check_model(os.path.join(out, "step.onnx"), full_check=True)  # as written by the export


def test_a_graph_without_if_is_left_as_it_is():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    model = onnx.helper.make_model(graph)
    assert where_step_from_cond(model).SerializeToString() == model.SerializeToString()

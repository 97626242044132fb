"""ONNX export of the official fixture, run in onnxruntime: official values, agreement with torch,
generation, the runtime's I/O binding and capacity growth, `hnet generate --backend onnx`, errors,
and a runtime that imports without torch or MLX. One export (through the CLI) serves the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import hnet_torch
from conftest import FIXTURE_DIR, OFFICIAL_ONNX_MAX_SEQLEN, OFFICIAL_ONNX_UMASK, TEXT, greedy_bytes, wrong_modes
from hnet_core.cli import main as hnet_main
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams
from hnet_core.tokenizer import encode
from hnet_export import OnnxHNet, stream_generate

EXPECTED = os.path.join(FIXTURE_DIR, "expected.npz")
MAX_SEQLEN = OFFICIAL_ONNX_MAX_SEQLEN
EXPORT_UMASK = OFFICIAL_ONNX_UMASK


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(export_dir: str, **kw) -> OnnxHNet:
    return OnnxHNet(export_dir, provider="cpu", threads=1, **kw)


@pytest.fixture(scope="module")
def export_dir(official_onnx_export) -> str:
    return official_onnx_export  # conftest: one CLI export of the fixture, shared with the JavaScript tests


@pytest.fixture(scope="module")
def torch_model():
    return hnet_torch.load_pretrained(os.path.join(FIXTURE_DIR, "model.pt"), config=os.path.join(FIXTURE_DIR, "config.json"))


@pytest.fixture(scope="module")
def expected():
    return np.load(EXPECTED, allow_pickle=False)


def test_export_writes_graphs_config_and_documented_io(export_dir):
    files = set(os.listdir(export_dir))
    assert {"prefill.onnx", "extend.onnx", "step.onnx", "step_cond.onnx", "config.json", "export.json", "io.json"} <= files
    assert "weights.onnx.data" not in files  # a small model stays self-contained
    meta = json.load(open(os.path.join(export_dir, "export.json")))
    assert meta["opset"] == 20 and meta["dtype"] == "float32" and meta["max_seqlen"] == MAX_SEQLEN
    assert {"torch", "onnx", "onnxscript"} <= set(meta["exporter"])
    assert json.load(open(os.path.join(export_dir, "config.json"))) == json.load(open(os.path.join(FIXTURE_DIR, "config.json")))
    table = json.load(open(os.path.join(export_dir, "io.json")))
    types = {1: "float32", 7: "int64", 9: "bool"}
    for graph in ("prefill", "extend", "step", "step_cond"):
        path = os.path.join(export_dir, graph + ".onnx")
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert model.opset_import[0].version == 20
        kind = "step" if graph.startswith("step") else graph
        for values, specs in ((model.graph.input, table[kind]["inputs"]), (model.graph.output, table[kind]["outputs"])):
            assert [v.name for v in values] == [s["name"] for s in specs]
            for v, spec in zip(values, specs):
                assert types[v.type.tensor_type.elem_type] == spec["dtype"], v.name
                dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                assert dims == spec["shape"], v.name
                assert spec["meaning"]
    step_inputs = {s["name"]: s["shape"] for s in table["step"]["inputs"]}
    assert step_inputs["input_ids"] == ["batch", 1]
    assert step_inputs["past.level1.main.0.k"][1] == 6  # window 5 -> ring buffer of 6 slots
    assert step_inputs["past.level0.length"] == ["batch"]
    extend_inputs = [s["name"] for s in table["extend"]["inputs"]]
    assert extend_inputs == ["input_ids", "mask"] + [s["name"] for s in table["step"]["inputs"][1:]]
    assert [s["name"] for s in table["extend"]["outputs"]] == [s["name"] for s in table["step"]["outputs"]]


def test_export_gives_normal_umask_respecting_permissions(export_dir):
    """Like every other writer (tests/test_file_permissions.py): 0666/0777 less the umask, not private."""
    assert wrong_modes(export_dir, EXPORT_UMASK) == []


@pytest.mark.parametrize("case", ["single_L1", "single_L5", "single_L37", "single_L100", "masked_batch"])
def test_prefill_matches_the_official_fixture(export_dir, expected, case):
    model = load(export_dir)
    mask = expected[f"{case}.mask"]
    out = model.prefill(expected[f"{case}.input_ids"], mask)
    assert np.abs(out.logits - expected[f"{case}.logits"])[mask].max() <= 1e-4
    r = out.routing[0]
    assert np.abs(r.boundary_prob - expected[f"{case}.stage0.boundary_prob"])[mask].max() <= 1e-5
    assert np.array_equal(r.boundary_mask, expected[f"{case}.stage0.boundary_mask"])
    assert np.array_equal(r.valid, mask)


@pytest.mark.parametrize("case", ["single_L37", "single_L100", "masked_batch"])
def test_pieces_reproduce_the_official_fixture(export_dir, expected, case):
    """The fixture's texts fed in seeded random pieces (1 to 9 bytes) give the official logits."""
    model = load(export_dir)
    ids, mask = expected[f"{case}.input_ids"], expected[f"{case}.mask"]
    sizes = np.random.default_rng(len(case)).integers(1, 10, ids.shape[1])
    points = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), ids.shape[1])
    points = sorted(set(points.tolist()))
    outs = [model.extend(ids[:, a:b], mask[:, a:b]) for a, b in zip(points[:-1], points[1:])]
    logits = np.concatenate([o.logits for o in outs], axis=1)
    assert np.abs(logits - expected[f"{case}.logits"])[mask].max() <= 1e-4
    boundary = np.concatenate([o.routing[0].boundary_mask for o in outs], axis=1)
    assert np.array_equal(boundary, expected[f"{case}.stage0.boundary_mask"])


@pytest.mark.parametrize("variant", ["where", "cond"])
@pytest.mark.parametrize("case", ["gen", "gen_tf"])
def test_teacher_forced_steps_match_the_official_fixture(export_dir, expected, case, variant):
    model = load(export_dir, step_variant=variant)
    out = model.prefill(expected[f"{case}.prompt_ids"], capacity=int(expected[f"{case}.max_seqlen"]))
    assert np.abs(out.logits - expected[f"{case}.prefill_logits"]).max() <= 1e-4
    assert np.array_equal(out.routing[0].boundary_mask, expected[f"{case}.prefill.stage0.boundary_mask"])
    fed = expected["gen.generated_ids"] if case == "gen" else expected["gen_tf.fed_ids"]
    for k in range(len(fed)):
        out = model.step(np.array([[fed[k]]]))
        assert np.abs(out.logits[0, -1] - expected[f"{case}.step_logits"][k]).max() <= 1e-4, k
        r = out.routing[0]
        assert r.boundary_mask[0, 0] == expected[f"{case}.step.stage0.boundary_mask"][k], k
        assert abs(r.boundary_prob[0, 0] - expected[f"{case}.step.stage0.boundary_prob"][k]) <= 1e-5, k
    if case == "gen_tf":
        assert expected["gen_tf.step.stage0.boundary_mask"].sum() > 0  # steps at boundaries ran the inner level


def _ragged(length: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (batch, length))
    ids[:, 0] = 254
    lengths = np.array([length] + list(rng.integers(1, length + 1, batch - 1)))
    return ids, np.arange(length)[None] < lengths[:, None]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 2, 7, 64, 300])
def test_exported_graphs_agree_with_torch(export_dir, torch_model, length, batch):
    ids, mask = _ragged(length, batch, seed=length * 10 + batch)
    model = load(export_dir, step_variant="cond" if batch == 1 else "where")
    out = model.prefill(ids, mask)
    cache = torch_model.allocate_inference_cache(batch, MAX_SEQLEN)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), mask=torch.from_numpy(mask), cache=cache)
    assert np.abs(out.logits - ref.logits.numpy())[mask].max() <= 1e-4
    assert np.array_equal(out.routing[0].boundary_mask, ref.routing[0].boundary_mask.numpy())
    feed = np.random.default_rng(length).integers(0, 256, (12, batch, 1))
    for k in range(len(feed)):
        out = model.step(feed[k])
        with torch.no_grad():
            ref = torch_model.step(torch.from_numpy(feed[k]), cache)
        assert np.abs(out.logits - ref.logits.numpy()).max() <= 1e-4, k
        assert np.array_equal(out.routing[0].boundary_mask, ref.routing[0].boundary_mask.numpy()), k


def test_greedy_generation_is_byte_identical_to_torch(export_dir, torch_model):
    prompts = ["The old lighthouse keeper", "From the top, he could"]
    greedy = SamplingParams(temperature=0)
    ours = greedy_bytes(stream_generate(load(export_dir), prompts, max_tokens=64, sampling=greedy))
    theirs = greedy_bytes(hnet_torch.stream_generate(torch_model, prompts, max_tokens=64, sampling=greedy))
    assert [len(r) for r in ours] == [64, 64]
    assert ours == theirs
    single = greedy_bytes(stream_generate(load(export_dir), prompts[0], max_tokens=64, sampling=greedy))
    assert single == theirs[:1]  # batch 1 runs step_cond.onnx


def test_io_binding_and_capacity_growth_match_plain_runs(export_dir, torch_model):
    ids = np.array([encode(TEXT[:5])])
    plain = load(export_dir, io_binding=False)
    bound = load(export_dir, io_binding=True)
    plain.prefill(ids)
    bound.prefill(ids, capacity=1)  # starts small and must grow (doubling) while decoding
    cache = torch_model.allocate_inference_cache(1, MAX_SEQLEN)
    with torch.no_grad():
        torch_model(torch.from_numpy(ids), cache=cache)
    capacities = set()
    for byte in encode(TEXT[5:160], add_bos=False):
        a, b = plain.step(np.array([[byte]])), bound.step(np.array([[byte]]))
        with torch.no_grad():
            ref = torch_model.step(torch.tensor([[byte]]), cache).logits.numpy()
        assert np.array_equal(a.logits, b.logits)
        assert np.abs(a.logits - ref).max() <= 1e-4
        capacities.add(bound.capacity)
    assert len(capacities) >= 2 and max(capacities) <= MAX_SEQLEN


def test_hnet_generate_with_the_onnx_backend_prints_what_torch_prints(export_dir):
    args = ["--prompt", "The old lighthouse keeper", "--temperature", "0", "--max-tokens", "24"]
    onnx_run = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", export_dir, *args])
    torch_run = CliRunner().invoke(hnet_main, ["generate", "--backend", "torch", "--model", os.path.join(FIXTURE_DIR, "model.pt"),
                                               "--config", os.path.join(FIXTURE_DIR, "config.json"), *args])
    assert onnx_run.exit_code == 0, onnx_run.output
    assert onnx_run.output == torch_run.output
    bad = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", export_dir, "--dtype", "float16", *args])
    assert bad.exit_code == 1 and "export time" in bad.output


def test_runtime_mistakes_are_one_line_errors(export_dir, tmp_path):
    model = load(export_dir)
    with pytest.raises(HNetError, match="prefill"):
        model.step(np.array([[1]]))
    with pytest.raises(HNetError, match="right-padded"):
        model.prefill(np.array([[254, 1, 2]]), np.array([[True, False, True]]))
    with pytest.raises(HNetError, match="at least one byte"):
        model.prefill(np.array([[254, 1]]), np.array([[False, False]]))
    with pytest.raises(HNetError, match="byte values"):
        model.prefill(np.array([[254, 256]]))
    with pytest.raises(HNetError, match="batch, length"):
        model.prefill(np.array([254, 1]))
    model.prefill(np.array([[254, 1, 2]]))
    with pytest.raises(HNetError, match=r"shape \(1, 1\)"):
        model.step(np.array([[1], [2]]))
    # Longer than max_seqlen: logits still come back (evaluation), decoding is refused.
    long = np.array([encode(TEXT * 3)[: MAX_SEQLEN + 20]])
    assert model.prefill(long).logits.shape == (1, MAX_SEQLEN + 20, 256)
    with pytest.raises(HNetError, match="max_seqlen"):
        model.step(np.array([[1]]))
    with pytest.raises(HNetError, match="max_seqlen"):
        list(stream_generate(model, "x", max_tokens=MAX_SEQLEN + 5))
    with pytest.raises(HNetError, match="provider"):
        OnnxHNet(export_dir, provider="tpu")
    with pytest.raises(HNetError, match="not found"):
        OnnxHNet(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("export.json", "io.json", "config.json", "prefill.onnx", "extend.onnx", "step.onnx"):
        (broken / name).write_bytes(open(os.path.join(export_dir, name), "rb").read())
    with pytest.raises(HNetError, match="step_cond.onnx not found"):
        OnnxHNet(str(broken))
    (broken / "step_cond.onnx").write_bytes(open(os.path.join(export_dir, "step_cond.onnx"), "rb").read())
    (broken / "prefill.onnx").write_bytes(open(os.path.join(export_dir, "prefill.onnx"), "rb").read()[:1000])
    with pytest.raises(HNetError, match="cannot load"):
        OnnxHNet(str(broken))


def test_runtime_imports_and_runs_without_torch_or_mlx(export_dir):
    script = textwrap.dedent(f"""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "mlx"):
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Blocker())
        import numpy as np
        from hnet_export import OnnxHNet, stream_generate
        from hnet_core.sampling import SamplingParams
        m = OnnxHNet({export_dir!r}, provider="auto")
        out = m.prefill(np.array([[254, 72, 105]]))
        out = m.step(np.array([[33]]))
        steps = list(stream_generate(m, "Hi", max_tokens=8, sampling=SamplingParams(temperature=0)))
        assert len(steps) == 8 and out.logits.shape == (1, 1, 256)
        assert not any(k.split(".")[0] in ("torch", "mlx") for k in sys.modules), sorted(sys.modules)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"

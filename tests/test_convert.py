"""`hnet convert` (torch-to-mlx / mlx-to-torch) and the MLX loader: bit-identical fp32 round trips,
dtype casts, quantization recorded in config.json (and its measured tolerance), Hugging Face repo
ids from a prepared offline cache, sharding, atomic writes, and one-line errors for every mistake."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten
from safetensors.torch import load_file

import hnet_mlx
import hnet_torch
from hnet_core import HNetError, mlx_lm_files
from hnet_core.io import INDEX_NAME
from hnet_core.tokenizer import encode
from hnet_mlx.convert import convert, torch_to_mlx

from conftest import FIXTURE_DIR, TEXT, config_2stage, random_torch_model
from mlx_helpers import np_
from precision import relative_error, unflipped_positions

PT = f"{FIXTURE_DIR}/model.pt"
CFG = f"{FIXTURE_DIR}/config.json"


def invoke(*args):
    return CliRunner().invoke(convert, [str(a) for a in args])


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory):
    """One of our torch safetensors directories (hnet_torch.save_pretrained) of a 2-stage model."""
    path = tmp_path_factory.mktemp("torch") / "two"
    hnet_torch.save_pretrained(random_torch_model(config_2stage()), path)
    return path


@pytest.fixture(scope="module")
def mlx_fixture_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlx") / "tiny"
    torch_to_mlx(PT, str(path), config=CFG)
    return path


# -- round trips --------------------------------------------------------------------------------


def test_official_pt_to_mlx_to_torch_round_trip_is_bit_identical(tmp_path, mlx_fixture_dir):
    result = invoke("mlx-to-torch", mlx_fixture_dir, tmp_path / "back")
    assert result.exit_code == 0, result.output
    official = torch.load(PT, weights_only=True)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(official)
    for k, v in official.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert json.load(open(tmp_path / "back" / "config.json")) == {**json.load(open(CFG)), **mlx_lm_files.config_keys()}  # + the keys mlx-lm reads
    reloaded = hnet_torch.load_pretrained(tmp_path / "back")  # the torch loader takes it as is
    assert list(reloaded.state_dict()) == list(official)


def test_torch_dir_round_trip_is_bit_identical_and_logits_agree(tmp_path, torch_dir):
    assert invoke("torch-to-mlx", torch_dir, tmp_path / "m").exit_code == 0
    assert invoke("mlx-to-torch", tmp_path / "m", tmp_path / "t").exit_code == 0
    a, b = load_file(str(torch_dir / "model.safetensors")), load_file(str(tmp_path / "t" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    tm = hnet_torch.load_pretrained(torch_dir)
    mm, _ = hnet_mlx.load(tmp_path / "m")
    ids = [encode(TEXT[:80])]
    with torch.no_grad():
        lt = tm(torch.tensor(ids)).logits.numpy()
    assert np.abs(lt - np_(mm(mx.array(ids)).logits)).max() <= 1e-4


def test_mlx_loader_also_reads_a_torch_layout_directory(torch_dir):
    model, config = hnet_mlx.load(torch_dir)  # sanitize fixes the conv1d layout on the way in
    assert config.num_stages == 2
    conv = dict(tree_flatten(model.parameters()))["backbone.encoder.layers.0.mixer.conv1d.weight"]
    assert conv.shape[-1] == 1


def test_sharded_output_writes_an_index_and_loads(tmp_path, torch_dir):
    torch_to_mlx(str(torch_dir), str(tmp_path / "m"), max_shard_bytes=60_000)
    files = os.listdir(tmp_path / "m")
    assert INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 1
    sharded, _ = hnet_mlx.load(tmp_path / "m")
    torch_to_mlx(str(torch_dir), str(tmp_path / "single"))
    single, _ = hnet_mlx.load(tmp_path / "single")
    a, b = dict(tree_flatten(sharded.parameters())), dict(tree_flatten(single.parameters()))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_save_pretrained_then_load_is_identical(tmp_path, mlx_fixture_dir):
    model, _ = hnet_mlx.load(mlx_fixture_dir)
    hnet_mlx.save_pretrained(model, tmp_path / "again")
    again, _ = hnet_mlx.load(tmp_path / "again")
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(again.parameters()))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


# -- dtype and quantization ----------------------------------------------------------------------


def greedy_bytes(model, prompt: str, n: int = 16) -> list[int]:
    """n greedy bytes through the decoding path (prefill + cached steps)."""
    steps = hnet_mlx.stream_generate(model, [prompt], max_tokens=n, sampling=hnet_mlx.SamplingParams(temperature=0))
    return [step.bytes[0] for step in steps if step.bytes[0] is not None]


def assert_decodes_like_its_forward(model, prompt: str, generated: list[int]) -> None:
    """The cached decoding path picks, at every step, the byte the full forward pass ranks first."""
    ids = encode(prompt)
    logits = np_(model(mx.array([ids + generated])).logits)[0]
    assert logits[len(ids) - 1: -1].argmax(-1).tolist() == generated


REL_TOL = {"bfloat16": 0.03, 8: 0.02, 4: 0.2}  # bounds on relative_error (tests/precision.py), measured below
MAX_KL = {8: 1e-5, 4: 2e-3}


def test_dtype_bfloat16_casts_everything_but_residual_proj(tmp_path, mlx_fixture_dir):
    result = invoke("torch-to-mlx", PT, tmp_path / "bf16", "--config", CFG, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    model, _ = hnet_mlx.load(tmp_path / "bf16")
    for name, w in tree_flatten(model.parameters()):
        assert w.dtype == (mx.float32 if "residual_proj" in name else mx.bfloat16), name
    ref_model, _ = hnet_mlx.load(mlx_fixture_dir)
    ids = mx.array([encode(TEXT[:100])])
    out, ref = model(ids), ref_model(ids)
    assert out.logits.dtype == mx.bfloat16
    # Measured: no boundary flips on this text, mean |dlogit| 0.6% of mean |logit| (tests/precision.py).
    keep = unflipped_positions([np_(r.boundary_mask) for r in ref.routing], [np_(r.boundary_mask) for r in out.routing],
                               np.ones(ids.shape, bool))
    assert keep.sum() >= ids.size // 2
    lb, lr = np_(out.logits), np_(ref.logits)
    assert relative_error(lb, lr, keep) <= REL_TOL["bfloat16"]
    assert relative_error(0.5 * lr, lr, keep) > REL_TOL["bfloat16"]  # the check rejects halved logits
    # bf16 decoding agrees with bf16's own forward pass and picks the float32 model's bytes.
    generated = greedy_bytes(model, "The old")
    assert_decodes_like_its_forward(model, "The old", generated)
    assert generated == greedy_bytes(ref_model, "The old")


def kl_divergence(logits_q: np.ndarray, logits_ref: np.ndarray) -> np.ndarray:
    """KL(ref || q) per position, from logits (..., V)."""
    lq = logits_q - logits_q.max(-1, keepdims=True)
    lr = logits_ref - logits_ref.max(-1, keepdims=True)
    lq, lr = lq - np.log(np.exp(lq).sum(-1, keepdims=True)), lr - np.log(np.exp(lr).sum(-1, keepdims=True))
    return (np.exp(lr) * (lr - lq)).sum(-1)


# Measured on the fixture (official init + noise), TEXT, vs fp32 (bench/mlx_quantization.py, tests/precision.py):
#   8-bit, group 32: mean |dlogit| 0.25% of mean |logit|, max 2.1e-3, no boundary flips
#   4-bit, group 32: mean |dlogit| 7.5% of mean |logit|, max 0.70, 3 of 207 stage-0 boundaries flip,
#                    mean KL 3.5e-4 (constant logits: 1.4e-2, halved logits: 4.0e-3)
#   8-bit mean KL 1.0e-7
# Halved logits are 50% off and constant ones 93%: each bound below rejects both.
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_loads_without_flags_and_stays_close_to_fp32(tmp_path, mlx_fixture_dir, bits):
    dst = tmp_path / f"q{bits}"
    result = invoke("torch-to-mlx", PT, dst, "--config", CFG, "-q", "--q-bits", bits, "--q-group-size", 32)
    assert result.exit_code == 0, result.output
    recorded = json.load(open(dst / "config.json"))["quantization"]
    assert recorded == {"group_size": 32, "bits": bits, "mode": "affine", "embedding": False, "lm_head": False}
    model, config = hnet_mlx.load(dst)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert "backbone.encoder.layers.0.mixer.in_proj.scales" in names
    assert not any(k.endswith(".scales") and ("routing_module" in k or "residual_proj" in k or k.startswith(("embeddings", "lm_head")))
                   for k in names)
    ref_model, _ = hnet_mlx.load(mlx_fixture_dir)
    ids = mx.array([encode(TEXT)])
    out, ref = model(ids), ref_model(ids)
    lq, lr = np_(out.logits), np_(ref.logits)
    everywhere = np.ones(ids.shape, bool)
    constant = np.broadcast_to(lr.mean(1, keepdims=True), lr.shape)
    for wrong in (0.5 * lr, constant):
        assert relative_error(wrong, lr, everywhere) > REL_TOL[bits]
        assert kl_divergence(wrong, lr).mean() > MAX_KL[bits]
    assert relative_error(lq, lr, everywhere) <= REL_TOL[bits]
    assert kl_divergence(lq, lr).mean() <= MAX_KL[bits]
    flips = sum(int((np_(a.boundary_mask) != np_(b.boundary_mask)).sum()) for a, b in zip(ref.routing, out.routing))
    if bits == 8:  # docs/checkpoints.md: 8-bit makes no boundary changes
        assert flips == 0
    else:  # docs/checkpoints.md: 4-bit flips 1-3% of boundaries
        assert flips <= 0.05 * ids.size
    generated = greedy_bytes(model, "The old")
    assert_decodes_like_its_forward(model, "The old", generated)
    if bits == 8:
        assert generated == greedy_bytes(ref_model, "The old")
    assert (dst / "model.safetensors").stat().st_size < (mlx_fixture_dir / "model.safetensors").stat().st_size


def test_quantize_embedding_and_lm_head_when_asked(tmp_path):
    dst = tmp_path / "q"
    result = invoke("torch-to-mlx", PT, dst, "--config", CFG, "-q", "--q-group-size", 32, "--q-embedding", "--q-lm-head")
    assert result.exit_code == 0, result.output
    model, _ = hnet_mlx.load(dst)
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {"embeddings.scales", "lm_head.scales"} <= names
    assert model(mx.array([encode("abc")])).logits.shape == (1, 4, 256)


def test_quantized_model_cannot_go_back_to_torch(tmp_path):
    torch_to_mlx(PT, str(tmp_path / "q"), config=CFG, quantize=True, q_group_size=32)
    result = invoke("mlx-to-torch", tmp_path / "q", tmp_path / "t")
    assert result.exit_code == 1 and "quantized" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t").exists()


# -- sources ------------------------------------------------------------------------------------


def _fake_hf_cache(root, repo="cartesia-ai/hnet_tiny", with_config=True):
    """A Hugging Face hub cache holding `repo` at one commit, laid out like huggingface_hub's own."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snap.name)
    shutil.copy(PT, snap / "hnet_tiny.pt")
    if with_config:
        shutil.copy(CFG, snap / "config.json")
    return root


def test_hugging_face_repo_id_is_read_from_the_offline_cache(tmp_path, monkeypatch):
    cache = _fake_hf_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = invoke("torch-to-mlx", "cartesia-ai/hnet_tiny", tmp_path / "m")
    assert result.exit_code == 0, result.output
    model, _ = hnet_mlx.load(tmp_path / "m")
    expected = np.load(f"{FIXTURE_DIR}/expected.npz")
    out = model(mx.array(expected["single_L37.input_ids"]))
    assert np.abs(np_(out.logits) - expected["single_L37.logits"]).max() <= 1e-4


def test_mlx_load_takes_a_repo_id_of_a_converted_model(tmp_path, monkeypatch, mlx_fixture_dir):
    snap = tmp_path / "hub" / "models--someone--hnet-tiny-mlx" / "snapshots" / ("a" * 40)
    shutil.copytree(mlx_fixture_dir, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, config = hnet_mlx.load("someone/hnet-tiny-mlx")
    assert config.d_model == [64, 96]


def test_unknown_repo_id_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    result = invoke("torch-to-mlx", "cartesia-ai/not_there", tmp_path / "m")
    assert result.exit_code == 1
    assert "cartesia-ai/not_there" in result.output and "cache" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


# -- overwriting and atomicity ------------------------------------------------------------------


def test_existing_destination_needs_force(tmp_path):
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    result = invoke("torch-to-mlx", PT, dst, "--config", CFG)
    assert result.exit_code == 1 and "--force" in result.output
    assert os.listdir(dst) == ["keep.txt"]
    assert invoke("torch-to-mlx", PT, dst, "--config", CFG, "--force").exit_code == 0
    assert sorted(os.listdir(dst)) == sorted(["config.json", "model.safetensors", *mlx_lm_files.EXTRA_FILES])


def test_failed_conversion_leaves_no_output_and_no_temp_files(tmp_path):
    bad = tmp_path / "bad.json"
    cfg = json.load(open(CFG))
    cfg["d_model"] = [64, 128]
    bad.write_text(json.dumps(cfg))
    result = invoke("torch-to-mlx", PT, tmp_path / "out" / "m", "--config", bad)
    assert result.exit_code == 1 and "shape" in result.output and "\n" not in result.output.strip()
    assert not (tmp_path / "out" / "m").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


# -- user mistakes --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["torch-to-mlx", "nowhere/../missing.pt", "OUT"], "not found"),
    (["torch-to-mlx", PT, "OUT"], "--config"),  # not an official checkpoint: needs its config
    (["torch-to-mlx", PT, "OUT", "--config", CFG, "--q-bits", "8"], "-q/--quantize"),
    (["torch-to-mlx", PT, "OUT", "--config", CFG, "-q", "--q-embedding", "--q-group-size", "128"],
     "multiple of --q-group-size 128"),  # d_model[0] is 64
    (["mlx-to-torch", FIXTURE_DIR, "OUT"], "not a model directory"),
    (["mlx-to-torch", PT, "OUT"], "convert it first"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_loader_errors_are_one_line(tmp_path, mlx_fixture_dir):
    with pytest.raises(HNetError, match="model not found"):
        hnet_mlx.load(tmp_path / "nope")
    with pytest.raises(HNetError, match="convert it first with `hnet convert torch-to-mlx"):
        hnet_mlx.load(PT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HNetError, match="not a model directory"):
        hnet_mlx.load(tmp_path / "empty")
    broken = tmp_path / "truncated"
    shutil.copytree(mlx_fixture_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HNetError, match="truncated"):
        hnet_mlx.load(broken)
    wrong = tmp_path / "wrong"
    shutil.copytree(mlx_fixture_dir, wrong)
    cfg = json.load(open(wrong / "config.json"))
    cfg["d_intermediate"] = [0, 320]
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HNetError, match="shape"):
        hnet_mlx.load(wrong)
    sharded = tmp_path / "lost_shard"
    torch_to_mlx(PT, str(sharded), config=CFG, max_shard_bytes=400_000)
    os.remove(sharded / sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[0])
    with pytest.raises(HNetError, match="weights file not found"):
        hnet_mlx.load(sharded)

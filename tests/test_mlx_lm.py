"""H-Net inside mlx-lm: our model directories load with mlx_lm.load / mlx_lm.generate and give the
same greedy bytes as hnet-mlx; the byte tokenizer works in transformers and mlx-lm's streaming
detokenizer; old directories get the files with `hnet-mlx add-mlx-lm`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import hnet_mlx  # noqa: E402
from hnet_core import mlx_lm_files  # noqa: E402
from hnet_core.backends import DEMO_MODEL  # noqa: E402
from hnet_core.tokenizer import BOS_ID, EOS_ID, decode, encode  # noqa: E402

from conftest import FIXTURE_DIR, TEXT  # noqa: E402

# Longer than the small prefill step the tests set, so mlx-lm feeds the prompt in several pieces.
LONG_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def demo():
    import mlx_lm

    return mlx_lm.load(DEMO_MODEL, trust_remote_code=True)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """The official 1-stage fixture converted to an MLX model directory."""
    from hnet_mlx.convert import torch_to_mlx

    out = tmp_path_factory.mktemp("official") / "mlx"
    torch_to_mlx(f"{FIXTURE_DIR}/model.pt", str(out), config=f"{FIXTURE_DIR}/config.json")
    return str(out)


def mlx_lm_greedy(model, tokenizer, prompt: str, max_tokens: int, prefill_step_size: int) -> str:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0),
                           prefill_step_size=prefill_step_size)


# -- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_ids_are_bytes_with_bos_and_eos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    for text in ["Hello, world", "café ▁ 日本語 😀", " leading and trailing  ", "þÿ are letters, not BOS/EOS", ""]:
        ids = tok.encode(text)
        assert ids == encode(text)  # BOS + the UTF-8 bytes
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode("abc", add_special_tokens=False) == list(b"abc")


def test_tokenizer_decodes_invalid_bytes_like_hnet():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    for data in [b"\x80abc", b"caf\xc3", b"\xe2\x96a", b"\xf0\x9f\x98\x80\xed\xa0\x80\xc0\xaf", b"\xfe\xff"]:
        assert tok.decode(list(data), skip_special_tokens=True) == decode(list(data))
        # without skipping, BOS/EOS come out as U+FFFD, as hnet-mlx's stream prints a generated 254
        assert tok.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_streaming_detokenizer_never_prints_half_a_character():
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer
    from pathlib import Path

    tok = load_tokenizer(Path(DEMO_MODEL))
    detok = tok.detokenizer
    assert isinstance(detok, NaiveStreamingDetokenizer)  # not the BPE one, which trims a leading space
    detok.reset()
    pieces = []
    for byte in " é日".encode():  # 0x20, then 2 bytes, then 3 bytes
        detok.add_token(byte)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert pieces == [" ", "", "é", "", "", "日", ""]
    assert tok.eos_token_ids == {EOS_ID}


# -- generation -------------------------------------------------------------------------------


def test_mlx_lm_generate_equals_hnet_mlx_generate_on_the_demo_model(demo):
    model, tokenizer = demo
    ours = hnet_mlx.generate(hnet_mlx.load(DEMO_MODEL)[0], LONG_PROMPT, max_tokens=60, temperature=0.0)
    theirs = mlx_lm_greedy(model, tokenizer, LONG_PROMPT, max_tokens=60, prefill_step_size=16)
    assert theirs == ours and len(ours.encode()) > 30


def test_mlx_lm_generate_equals_hnet_mlx_generate_on_the_official_fixture(official_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(official_dir, trust_remote_code=True)
    prompt = TEXT[:120]
    ours = hnet_mlx.generate(hnet_mlx.load(official_dir)[0], prompt, max_tokens=40, temperature=0.0)
    theirs = mlx_lm_greedy(model, tokenizer, prompt, max_tokens=40, prefill_step_size=32)
    assert theirs == ours


def test_logits_in_pieces_equal_one_pass(official_dir):
    import mlx_lm

    model, _ = mlx_lm.load(official_dir, trust_remote_code=True)  # float32 weights
    ids = mx.array([encode(LONG_PROMPT)])
    whole = model(ids)
    cache = model.make_cache()
    pieces = [model(ids[:, a:b], cache=cache) for a, b in [(0, 20), (20, 21), (21, 50), (50, ids.shape[1])]]
    assert mx.abs(mx.concatenate(pieces, axis=1) - whole).max().item() < 1e-4
    assert cache[0].size() == ids.shape[1] and not cache[0].is_trimmable() and cache[0].nbytes > 0


def test_stream_generate_and_a_deep_copied_cache_continue_alike(demo):
    import copy

    import mlx_lm

    model, tokenizer = demo
    texts = [r.text for r in mlx_lm.stream_generate(model, tokenizer, "Mr. Darcy", max_tokens=20)]
    assert len(texts) == 20 and "".join(texts)
    cache = model.make_cache()
    model(mx.array([encode("Mr. Darcy")]), cache=cache)
    twin = copy.deepcopy(cache)
    a = model(mx.array([[32]]), cache=cache)
    b = model(mx.array([[32]]), cache=twin)
    assert mx.array_equal(a, b)


def test_layers_expose_linear_blocks_for_mlx_lm_lora(demo):
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from hnet_mlx.mlx_lm_model import Model, ModelArgs

    config = json.load(open(os.path.join(DEMO_MODEL, "config.json")))
    model = Model(ModelArgs.from_dict(config))
    assert len(model.layers) == 12  # m2 + m2 + T4 + m2 + m2 blocks
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 1.0, "dropout": 0.0})
    adapted = [name for name, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    assert adapted and all(name.startswith("backbone.decoder.layers") for name in adapted)
    assert isinstance(model.layers[0].mixer.in_proj, nn.Linear)


# -- directories ------------------------------------------------------------------------------


def test_every_written_directory_is_an_mlx_lm_directory(official_dir, tmp_path):
    import hnet_torch

    for directory in [official_dir, DEMO_MODEL]:
        config = json.load(open(os.path.join(directory, "config.json")))
        assert config["model_type"] == "hnet" and config["model_file"] == mlx_lm_files.MODEL_FILE
        for name in (mlx_lm_files.TOKENIZER_FILE, mlx_lm_files.TOKENIZER_CONFIG_FILE, mlx_lm_files.MODEL_FILE):
            assert os.path.exists(os.path.join(directory, name))
    # our loaders ignore the extra keys: the config reads back unchanged
    assert "model_type" not in hnet_mlx.load(official_dir)[1].to_dict()
    torch_dir = tmp_path / "torch"
    hnet_torch.save_pretrained(hnet_torch.load_pretrained(f"{FIXTURE_DIR}/model.pt", f"{FIXTURE_DIR}/config.json"), torch_dir)
    assert os.path.exists(torch_dir / mlx_lm_files.TOKENIZER_FILE)


def test_add_mlx_lm_makes_an_old_directory_loadable(official_dir, tmp_path):
    import mlx_lm

    from hnet_mlx.cli import main

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(official_dir, "model.safetensors"), old)
    config = {k: v for k, v in json.load(open(os.path.join(official_dir, "config.json"))).items()
              if k not in mlx_lm_files.CONFIG_KEYS}
    (old / "config.json").write_text(json.dumps(config))
    hnet_mlx.load(str(old))  # old directories still load
    result = CliRunner().invoke(main, ["add-mlx-lm", str(old)])
    assert result.exit_code == 0, result.output
    model, tokenizer = mlx_lm.load(str(old), trust_remote_code=True)
    assert tokenizer.encode("hi") == encode("hi")
    bad = CliRunner().invoke(main, ["add-mlx-lm", str(tmp_path / "missing")])
    assert bad.exit_code != 0 and "not a model directory" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_mlx_lm_generate_command_prints_what_hnet_mlx_generate_prints():
    prompt = LONG_PROMPT * 3
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    theirs = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", DEMO_MODEL, "--trust-remote-code",
                             "--prompt", prompt, "--max-tokens", "100", "--temp", "0", "--verbose", "False",
                             "--prefill-step-size", "64"], capture_output=True, env=env, timeout=600)
    ours = subprocess.run([sys.executable, "-m", "hnet_mlx.cli", "generate", "--model", DEMO_MODEL, "--prompt", prompt,
                           "--max-tokens", "100", "--temp", "0"], capture_output=True, env=env, timeout=600)
    assert theirs.returncode == 0 and ours.returncode == 0, theirs.stderr[-500:]
    assert theirs.stdout == ours.stdout


def test_mlx_lm_loads_the_residual_proj_of_a_float16_checkpoint_in_float32(demo):
    from mlx.utils import tree_flatten

    model, _ = demo
    dtypes = {name: p.dtype for name, p in tree_flatten(model.parameters())}
    assert any("residual_proj" in name for name in dtypes)
    for name, dtype in dtypes.items():
        assert dtype == (mx.float32 if "residual_proj" in name else mx.float16), name

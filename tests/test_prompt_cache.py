"""Prompt caches on disk: one safetensors format for hnet_torch and hnet_mlx.

Round trip in a fresh process (continuing a loaded cache == continuing the cache never saved),
across backends (torch-saved loads in MLX and the other way round), refusal of another config's
cache and of files that are not prompt caches, and the CLI: `cache-prompt`, `generate
--prompt-cache-file` (greedy bytes identical to generating from the whole text) and
`--prefill-step-size`, for `hnet-mlx` and `hnet --backend torch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hnet_core.errors import HNetError
from hnet_core.tokenizer import encode

from conftest import TEXT, config_1stage, config_2stage, random_torch_model

mx = pytest.importorskip("mlx.core")

import hnet_mlx  # noqa: E402
import hnet_torch  # noqa: E402
from mlx_helpers import mlx_from_torch  # noqa: E402

ATOL = 1e-4
TESTS = os.path.dirname(os.path.abspath(__file__))
PREFIX, MORE = encode(TEXT[:70]), encode(TEXT[70:110], add_bos=False)


@pytest.fixture(scope="module")
def models():
    tm = random_torch_model(config_2stage())
    return tm, mlx_from_torch(tm)


def torch_continue(model, cache) -> np.ndarray:
    """Logits of MORE fed to the cache, then of 5 steps: (len(MORE) + 5, V)."""
    with torch.no_grad():
        out = [model(torch.tensor([MORE]), cache=cache).logits[0]]
        out += [model.step(torch.tensor([[b]]), cache).logits[0] for b in MORE[:5]]
    return torch.cat(out).numpy()


def mlx_continue(model, cache) -> np.ndarray:
    out = [model(mx.array([MORE]), cache=cache).logits[0]]
    out += [model.step(mx.array([[b]]), cache).logits[0] for b in MORE[:5]]
    return np.array(mx.concatenate(out))


def torch_prefilled(model):
    cache = model.allocate_inference_cache(batch_size=1)
    with torch.no_grad():
        model(torch.tensor([PREFIX[:30]]), cache=cache)
        model(torch.tensor([PREFIX[30:]]), cache=cache)
    return cache


def mlx_prefilled(model):
    cache = model.allocate_inference_cache(batch_size=1)
    model(mx.array([PREFIX]), cache=cache)
    return cache


FRESH_PROCESS = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import config_2stage, random_torch_model
from hnet_core.tokenizer import encode
import test_prompt_cache as t
tm = random_torch_model(config_2stage())
if {backend!r} == "torch":
    import hnet_torch
    out = t.torch_continue(tm, hnet_torch.load_prompt_cache({path!r}, tm))
else:
    import hnet_mlx
    from mlx_helpers import mlx_from_torch
    mm = mlx_from_torch(tm)
    out = t.mlx_continue(mm, hnet_mlx.load_prompt_cache({path!r}, mm))
np.save({out!r}, out)
"""


@pytest.mark.parametrize("saver,loader", [("torch", "mlx"), *[pytest.param(*pair, marks=pytest.mark.slow) for pair in
                                                             [("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")]]])
def test_saved_cache_continues_in_a_fresh_process_like_the_live_one(models, tmp_path, saver, loader):
    tm, mm = models
    path = str(tmp_path / "prompt.safetensors")
    if saver == "torch":
        cache = torch_prefilled(tm)
        hnet_torch.save_prompt_cache(path, cache, {"note": "seventy bytes"})
        live = torch_continue(tm, cache)
    else:
        cache = mlx_prefilled(mm)
        hnet_mlx.save_prompt_cache(path, cache, {"note": "seventy bytes"})
        live = mlx_continue(mm, cache)
    out = str(tmp_path / "logits.npy")
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = FRESH_PROCESS.format(tests=TESTS, backend=loader, path=path, out=out)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(out) - live).max() <= ATOL
    _, meta = (hnet_torch if loader == "torch" else hnet_mlx).load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "seventy bytes"}


def test_cache_of_another_config_is_refused_with_the_difference(models, tmp_path):
    tm, mm = models
    path = str(tmp_path / "prompt.safetensors")
    hnet_torch.save_prompt_cache(path, torch_prefilled(tm))
    other = random_torch_model(config_1stage())
    with pytest.raises(HNetError, match=r"belongs to a model with another config \(arch_layout is"):
        hnet_torch.load_prompt_cache(path, other)
    with pytest.raises(HNetError, match=r"belongs to a model with another config \(arch_layout is"):
        hnet_mlx.load_prompt_cache(path, mlx_from_torch(other))
    loose = hnet_torch.load_prompt_cache(path)  # no model given: refused when a model first uses it
    with pytest.raises(HNetError, match="another config"):
        other(torch.tensor([MORE]), cache=loose)


def test_a_file_that_is_not_a_prompt_cache_is_refused(tmp_path):
    from safetensors.numpy import save_file

    weights = str(tmp_path / "model.safetensors")
    save_file({"w": np.zeros(3, dtype=np.float32)}, weights)
    with pytest.raises(HNetError, match="not an H-Net prompt cache"):
        hnet_torch.load_prompt_cache(weights)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(HNetError, match="not a readable safetensors file"):
        hnet_mlx.load_prompt_cache(str(junk))
    with pytest.raises(HNetError, match="does not exist"):
        hnet_mlx.load_prompt_cache(str(tmp_path / "missing.safetensors"))


def test_save_is_atomic_and_refuses_a_directory(models, tmp_path):
    tm, _ = models
    cache = torch_prefilled(tm)
    with pytest.raises(HNetError, match="is a directory"):
        hnet_torch.save_prompt_cache(str(tmp_path), cache)
    path = tmp_path / "p.safetensors"
    hnet_torch.save_prompt_cache(str(path), cache)
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary file left behind
    # The header is plain JSON: format, version, the model config, the tree and the metadata.
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]
    header = json.loads(meta["hnet_prompt_cache"])
    assert header["format"] == "hnet-prompt-cache" and header["config"] == tm.config.to_dict()


# -- the CLI ---------------------------------------------------------------------------------------


def cli(main, *args):
    result = CliRunner().invoke(main, list(args))
    return result


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "doc.txt"
    path.write_bytes(("It is a truth universally acknowledged, that a single man in possession of a good "
                      "fortune, must be in want of a wife. ").encode() * 3)
    return str(path)


def test_cli_generate_from_a_prompt_cache_equals_generating_from_the_whole_text(prompt_file, tmp_path,
                                                                                one_torch_thread):
    """Files written by `hnet-mlx cache-prompt` and `hnet cache-prompt --backend torch`, continued by either
    backend, give the greedy bytes of the whole text; so does reading the whole text in pieces."""
    from hnet_core.cli import main as hnet_main
    from hnet_mlx.cli import main as mlx_main

    by_mlx, by_torch = str(tmp_path / "mlx.safetensors"), str(tmp_path / "torch.safetensors")
    r = cli(mlx_main, "cache-prompt", "--prompt-file", prompt_file, "--out", by_mlx, "--prefill-step-size", "64")
    assert r.exit_code == 0, r.output
    r = cli(hnet_main, "cache-prompt", "--backend", "torch", "--prompt-file", prompt_file, "--out", by_torch)
    assert r.exit_code == 0, r.output
    whole = open(prompt_file, encoding="utf-8").read() + "However little"
    greedy = ["--temp", "0", "-m", "24"]
    expected = cli(mlx_main, "generate", "--prompt", whole, *greedy)
    assert expected.exit_code == 0, expected.output
    for main, extra, path in [(mlx_main, [], by_mlx), (hnet_main, ["--backend", "torch"], by_torch),
                              (hnet_main, ["--backend", "torch"], by_mlx)]:
        r = cli(main, "generate", *extra, "--prompt-cache-file", path, "--prompt", "However little", *greedy)
        assert r.exit_code == 0, r.output
        assert r.stdout == expected.stdout
    pieces = cli(hnet_main, "generate", "--backend", "torch", "--prompt", whole, "--prefill-step-size", "50", *greedy)
    assert pieces.exit_code == 0 and pieces.stdout == expected.stdout


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "x", "--prefill-step-size", "0"], "--prefill-step-size must be a positive"),
    (["generate", "--prompt", "x", "--prompt-cache-file", "/nonexistent/c.safetensors"], "does not exist"),
    (["cache-prompt", "--prompt-file", "/nonexistent/doc.txt", "--out", "c.safetensors"], "cannot read --prompt-file"),
])
def test_cli_prompt_cache_errors_are_one_line(args, message):
    from hnet_mlx.cli import main as mlx_main

    r = cli(mlx_main, *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_cli_refuses_a_prompt_cache_of_another_model(prompt_file, tmp_path, models, one_torch_thread):
    from hnet_core.cli import main as hnet_main

    path = str(tmp_path / "other.safetensors")
    hnet_torch.save_prompt_cache(path, torch_prefilled(models[0]))
    for extra in (["--backend", "torch"], ["--backend", "mlx"]):
        r = cli(hnet_main, "generate", *extra, "--prompt-cache-file", path, "--prompt", "x")
        assert r.exit_code != 0 and "belongs to a model with another config" in r.output
        assert "Traceback" not in r.output

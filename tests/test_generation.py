"""Sampling, UTF-8-safe streaming with stop strings, and `hnet generate` (torch backend)."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from hnet_core import HNetError
from hnet_core.cli import main
from hnet_core.sampling import Sampler, SamplingParams
from hnet_core.streaming import TextStream
from hnet_torch import generate, load_pretrained

from conftest import FIXTURE_DIR

MODEL = [f"--model={FIXTURE_DIR}/model.pt", f"--config={FIXTURE_DIR}/config.json"]


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = np.random.default_rng(0).normal(size=(3, 256))
    assert np.array_equal(Sampler(SamplingParams(temperature=0))(logits), logits.argmax(-1))
    assert np.array_equal(Sampler(SamplingParams(top_k=1, seed=3))(logits), logits.argmax(-1))
    assert np.array_equal(Sampler(SamplingParams(top_p=1e-6, seed=3))(logits), logits.argmax(-1))


def test_sampling_is_reproducible_with_a_seed_and_respects_filters():
    logits = np.random.default_rng(1).normal(size=(2, 256)) * 3
    a = [Sampler(SamplingParams(seed=7))(logits) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    top5 = np.argsort(-logits, -1)[:, :5]
    s = Sampler(SamplingParams(top_k=5, seed=0))
    for _ in range(50):
        picks = s(logits)
        assert all(picks[b] in top5[b] for b in range(2))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    s = Sampler(SamplingParams(min_p=0.5, seed=0))
    for _ in range(50):
        picks = s(logits)
        assert all(probs[b, picks[b]] >= 0.5 * probs[b].max() for b in range(2))


def test_repetition_penalty_discourages_seen_bytes():
    logits = np.zeros((1, 256))
    logits[0, 65] = 2.0
    logits[0, 66] = 1.9
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))(logits, [[65]])[0] == 66


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -1}, "temperature must be a finite number >= 0"), ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k must be a non-negative"), ({"min_p": 1.0}, "min_p must be in [0, 1)"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
])
def test_invalid_sampling_parameters_are_rejected(kw, message):
    with pytest.raises(HNetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingParams(**kw)


def test_stream_never_prints_half_a_character_and_survives_invalid_bytes():
    s = TextStream()
    euro = "€".encode()  # 3 bytes
    assert s.feed(euro[0]) == "" and s.feed(euro[1]) == ""
    assert s.feed(euro[2]) == "€"
    assert s.feed(0xC3) == ""  # start of a 2-byte character...
    assert s.feed(0x41) == "\ufffdA"  # ...that never completes: replacement char, no exception
    assert s.feed(0xFF) == "" and s.done  # EOS ends the stream
    t = TextStream()
    t.feed(0xE2)
    assert t.finish() == "\ufffd"


def test_stop_strings_are_cut_and_held_back_until_decided():
    s = TextStream(stop=["END"])
    out = "".join(s.feed(b) for b in b"abcEN")
    assert out == "abc"  # "EN" may start "END": held back
    assert s.feed(ord("X")) == "ENX"
    assert "".join(s.feed(b) for b in b"yyEND") == "yy" and s.done
    assert s.feed(ord("z")) == ""


def test_python_generate_api_greedy_matches_official_fixture_bytes():
    model = load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json")
    expected = np.load(f"{FIXTURE_DIR}/expected.npz")["gen.generated_ids"]
    prompt = "The old lighthouse keeper"
    got = generate(model, prompt, max_tokens=8, temperature=0)
    assert got == bytes(expected[:8].tolist()).decode("utf-8", errors="replace")
    batch = generate(model, [prompt, "Hi"], max_tokens=8, temperature=0)
    assert batch == [got, generate(model, "Hi", max_tokens=8, temperature=0)]  # batched = each prompt alone


def test_cli_generate_streams_text():
    result = CliRunner().invoke(main, ["generate", *MODEL, "--prompt", "Hello", "-m", "16", "--seed", "0", "-v"])
    assert result.exit_code == 0, result.output
    assert "Generation: 16 bytes" in result.stderr
    assert "Stage 0:" in result.stderr
    # torch on CPU reports the process's peak resident set (MLX its allocator's peak): the line says which.
    assert re.search(r"Peak memory: \d+\.\d{3} GB \(peak resident memory of the process\)", result.stderr)


def test_cli_generate_reads_the_prompt_from_stdin_as_raw_bytes():
    ok = CliRunner().invoke(main, ["generate", *MODEL, "--prompt", "-", "-m", "4", "--temp", "0"], input="Hello")
    assert ok.exit_code == 0, ok.output
    raw = CliRunner().invoke(main, ["generate", *MODEL, "--prompt", "-", "-m", "4", "--temp", "0"], input=b"\xff\xfeabc")
    assert raw.exit_code == 0, raw.output  # H-Net reads bytes: invalid UTF-8 is a prompt like any other
    assert "Traceback" not in raw.output


@pytest.mark.parametrize("args, message", [
    (["--model", "does/not/exist", "--prompt", "x"], "model not found"),
    ([*MODEL, "--prompt", "x", "--max-tokens", "-1"], "--max-tokens must be >= 0"),
    ([*MODEL, "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    ([f"--model={FIXTURE_DIR}/model.pt", "--prompt", "x"], "pass the model's config JSON with --config"),
])
def test_cli_generate_errors_are_one_line(args, message):
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_cli_generate_without_model_uses_the_bundled_demo_model():
    result = CliRunner().invoke(main, ["generate", "--prompt", "It is a truth universally acknowledged", "-m", "40",
                                       "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert sum(c.isalpha() or c == " " for c in result.stdout) > 30


def test_cli_generate_max_tokens_zero_prints_nothing():
    result = CliRunner().invoke(main, ["generate", *MODEL, "--prompt", "Hello", "--max-tokens", "0"])
    assert result.exit_code == 0 and result.stdout == "\n"


def test_cli_batch_prompts_generate_together():
    result = CliRunner().invoke(main, ["generate", *MODEL, "-p", "Hello", "-p", "A longer prompt", "-m", "5", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert "=== [0] 'Hello'" in result.stdout and "=== [1] 'A longer prompt'" in result.stdout


def test_cli_help_lists_every_command_and_each_one_has_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    names = ("generate", "convert", "export", "train", "eval", "plot", "data")
    listed = result.output.split("Commands:")[1]
    for name in names:
        assert re.search(rf"^  {name} ", listed, re.M), name
        sub = CliRunner().invoke(main, [name, "--help"], prog_name="hnet")  # the lazily imported command loads and documents itself
        assert sub.exit_code == 0 and sub.output.startswith(f"Usage: hnet {name} "), (name, sub.output)

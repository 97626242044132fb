"""hnet_core.engine on its own (a numpy adapter whose next byte is a known function of the text read)
and through the CLI: prompts are cut into pieces once, the step size has one default and one
check, and every backend (ONNX included) takes --prefill-step-size."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURE_DIR
from hnet_core import engine
from hnet_core.errors import HNetError
from hnet_core.prompt_cache import continuation
from hnet_core.sampling import SamplingParams
from hnet_core.tokenizer import BOS_ID

GREEDY = SamplingParams(temperature=0)


def rule(text: list[int]) -> int:
    """The scripted model's next byte after `text`: a letter that depends on every byte read."""
    return ord("a") + sum(text) % 26


class ScriptedAdapter:
    """An engine.Adapter in numpy: the cache is the bytes each sample has read; the logits at a position
    peak at rule(bytes up to it); routing 'stage 0' sees every byte and opens a chunk at each space."""

    config = {"model": "scripted"}

    def __init__(self) -> None:
        self.pieces: list[tuple[int, int]] = []  # (batch, width) of every extend call

    def new_cache(self, batch_size: int, max_bytes: int) -> list[list[int]]:
        return [[] for _ in range(batch_size)]

    def _logits(self, texts: list[list[int]]) -> np.ndarray:
        logits = np.zeros((len(texts), 256), dtype=np.float32)
        logits[np.arange(len(texts)), [rule(t) for t in texts]] = 1.0
        return logits

    def extend(self, cache, ids, mask, last):
        self.pieces.append(ids.shape)
        at_last = []
        for b in range(ids.shape[0]):
            real = ids[b][mask[b]].tolist()
            at_last.append(cache[b] + real[: last[b] + 1])
            cache[b] += real
        counts = mask.sum(-1)[None].astype(np.int64)
        return engine.StepResult(self._logits(at_last), counts, ((ids == 32) & mask).sum(-1)[None].astype(np.int64))

    def step(self, cache, next_bytes):
        for b, byte in enumerate(next_bytes[:, 0].tolist()):
            cache[b].append(byte)
        return engine.StepResult(self._logits(cache), np.ones((1, len(cache)), np.int64),
                                 (next_bytes.T == 32).astype(np.int64))

    def export_cache(self, cache):
        return {"texts": [list(t) for t in cache]}, {}

    def import_cache(self, tree, arrays):
        return [list(t) for t in tree["texts"]]

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory(self):
        return None


def expected_continuation(prompt: bytes, n: int) -> bytes:
    text = [BOS_ID, *prompt]
    for _ in range(n):
        text.append(rule(text))
    return bytes(text[len(prompt) + 1 :])


def run(adapter, prompts, **kwargs):
    steps = engine.stream_generate(adapter, prompts, sampling=GREEDY, **kwargs)
    out: list[bytearray] = []
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            return [bytes(b) for b in out], done.value
        out = out or [bytearray() for _ in step.bytes]
        for b, byte in enumerate(step.bytes):
            if byte is not None:
                out[b].append(byte)


PROMPTS = [b"a b", b"a much longer prompt, with spaces", b"x"]


def test_the_scripted_adapter_satisfies_the_protocol():
    assert isinstance(ScriptedAdapter(), engine.Adapter)


@pytest.mark.parametrize("step_size", [1, 2, 5, 7, 2048, None])
def test_each_sample_continues_from_its_own_last_byte_whatever_the_piece_size(step_size):
    adapter = ScriptedAdapter()
    got, stats = run(adapter, PROMPTS, max_tokens=12, prefill_step_size=step_size)
    assert got == [expected_continuation(p, 12) for p in PROMPTS]
    width = max(len(p) for p in PROMPTS) + 1  # BOS
    size = step_size or engine.DEFAULT_PREFILL_STEP
    assert adapter.pieces == [(3, min(size, width - start)) for start in range(0, width, size)]
    assert stats.prompt_bytes == sum(len(p) + 1 for p in PROMPTS)
    # stage counts: every prompt byte and every byte fed back (11 per sample; the last is never fed)
    assert stats.stage_tokens == [stats.prompt_bytes + 3 * 11]
    spaces = sum(p.count(b" ") for p in PROMPTS)
    assert stats.stage_boundaries == [spaces + sum(o[:-1].count(b" ") for o in got)]


@pytest.mark.parametrize("bad", [0, -1, -2048, 1.5, True, "64"])
def test_a_step_size_that_is_not_a_positive_integer_is_refused_in_one_line(bad):
    with pytest.raises(HNetError, match="prefill-step-size must be a positive number of bytes") as e:
        run(ScriptedAdapter(), PROMPTS, max_tokens=4, prefill_step_size=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(HNetError, match="prefill-step-size must be a positive"):
        engine.cache_prompt(ScriptedAdapter(), b"some text", bad)


def test_the_default_step_size_applies_when_none_is_given():
    assert engine.check_prefill_step(None) == engine.DEFAULT_PREFILL_STEP
    assert engine.check_prefill_step(3) == 3


@pytest.mark.parametrize("step_size", [1, 4, None])
def test_a_cached_prompt_continues_as_if_the_whole_text_were_the_prompt(step_size):
    adapter = ScriptedAdapter()
    doc = b"the cached part of a text, read once"
    cache, metadata = engine.cache_prompt(adapter, doc, step_size)
    assert cache == [[BOS_ID, *doc[:-1]]]  # the last byte is held back for the continuation
    data, context = continuation(metadata, b" and more")
    got, _ = run(adapter, [data], max_tokens=10, prompt_cache=cache, context=[context])
    assert got == [expected_continuation(doc + b" and more", 10)]


# -- the backends' adapters and the CLI -------------------------------------------------------------


def test_every_backend_adapter_satisfies_the_protocol(official_onnx_export):
    from hnet_core.backends import load_model

    for backend, path, config in [("torch", f"{FIXTURE_DIR}/model.pt", f"{FIXTURE_DIR}/config.json"),
                                  ("onnx", official_onnx_export, None)]:
        loaded = load_model(backend, path, config=config)
        assert isinstance(loaded.adapter, engine.Adapter), backend
    pytest.importorskip("mlx.core")
    from hnet_core.backends import DEMO_MODEL

    assert isinstance(load_model("mlx", DEMO_MODEL).adapter, engine.Adapter)


def hnet(*args: str):
    from hnet_core.cli import main

    return CliRunner().invoke(main, list(args))


def test_onnx_generation_takes_the_prefill_step_size_from_the_cli(official_onnx_export):
    base = ["generate", "--backend", "onnx", "--model", official_onnx_export, "--prompt", "The old lighthouse",
            "--prompt", "Hi", "-m", "12", "--temp", "0", "--device", "cpu"]
    whole = hnet(*base)
    assert whole.exit_code == 0, whole.output
    for size in ("1", "5"):
        pieces = hnet(*base, "--prefill-step-size", size)
        assert pieces.exit_code == 0, pieces.output
        assert pieces.output == whole.output
    refused = hnet(*base, "--prefill-step-size", "0")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.output.strip() == "Error: --prefill-step-size must be a positive number of bytes, got 0"


def test_onnx_refuses_prompt_cache_files_in_one_line(official_onnx_export, tmp_path):
    from hnet_core.backends import load_model
    from hnet_core.prompt_cache import save_with

    torch_loaded = load_model("torch", f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json")
    path = str(tmp_path / "c.safetensors")
    save_with(torch_loaded.adapter, path, *engine.cache_prompt(torch_loaded.adapter, b"Some text."))
    r = hnet("generate", "--backend", "onnx", "--model", official_onnx_export, "--prompt-cache-file", path,
             "--prompt", " more", "-m", "4")
    assert r.exit_code == 1
    assert r.output.strip() == "Error: prompt caches work with the torch and mlx backends, not onnx"


def test_an_onnx_model_extends_only_its_newest_cache(official_onnx_export):
    from hnet_export import OnnxHNet
    from hnet_export.generate import Adapter

    adapter = Adapter(OnnxHNet(official_onnx_export, provider="cpu"))
    old = adapter.new_cache(1, 8)
    adapter.new_cache(1, 8)
    with pytest.raises(HNetError, match="one live state"):
        adapter.extend(old, np.array([[BOS_ID, 65]]), np.ones((1, 2), bool), np.array([1]))
    with pytest.raises(HNetError, match="max_seqlen"):
        adapter.new_cache(1, 10**6)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cache_prompt_refuses_a_step_size_below_one_in_one_line(tmp_path, value):
    doc = tmp_path / "doc.txt"
    doc.write_text("A document to cache.")
    out = tmp_path / "c.safetensors"
    r = hnet("cache-prompt", "--model", f"{FIXTURE_DIR}/model.pt", "--config", f"{FIXTURE_DIR}/config.json",
             "--prompt-file", str(doc), "--out", str(out), "--prefill-step-size", value)
    assert r.exit_code == 1, r.output
    assert r.output.strip() == f"Error: --prefill-step-size must be a positive number of bytes, got {value}"
    assert not out.exists()


def test_help_strings_show_the_engine_default():
    for command in ("generate", "cache-prompt"):
        r = hnet(command, "--help")
        assert f"default {engine.DEFAULT_PREFILL_STEP}" in " ".join(r.output.split()), command


class SlowFirstStep(ScriptedAdapter):
    """The scripted model, whose first decode step costs `delay` seconds (a session created on first use)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay, self.steps = delay, 0

    def step(self, cache, next_bytes):
        self.steps += 1
        if self.steps == 1:
            import time

            time.sleep(self.delay)
        return super().step(cache, next_bytes)


def test_the_statistics_split_the_first_decode_step_from_the_steady_rate():
    _, stats = run(SlowFirstStep(0.3), [b"ab", b"c"], max_tokens=10)
    assert stats.generated_bytes == 20
    assert stats.first_step_seconds >= 0.3
    assert stats.steady_bytes == 2 * 8  # bytes from the second step's logits on
    assert stats.steady_seconds <= stats.decode_seconds - 0.3  # the first step is outside the steady window
    assert stats.steady_bytes_per_second > stats.decode_bytes_per_second
    _, short = run(SlowFirstStep(0.0), [b"ab"], max_tokens=2)  # one step: a first step and nothing steady
    assert short.first_step_seconds is not None and np.isnan(short.steady_bytes_per_second)
    _, none = run(SlowFirstStep(0.0), [b"ab"], max_tokens=1)
    assert none.first_step_seconds is None

"""The one generation engine: every backend (hnet_torch, hnet_mlx, hnet_export) generates through it.

A backend supplies an `Adapter` (below): a few verbs on its own cache, numpy at the boundary.
Everything backends do the same way lives here, once:

  * the prefill step size: its default (`DEFAULT_PREFILL_STEP`) and its one validity check
    (`check_prefill_step`);
  * cutting prompts into pieces of that many bytes, each extending one live cache, so memory stays
    flat in the prompt length (`prefill`): for generation, `cache-prompt`, prompt caches and ONNX;
  * sampling (hnet_core.sampling), UTF-8 streaming and stop strings (hnet_core.streaming), and the
    statistics `-v` prints (GenerationStats), in `stream_generate`.

    adapter = load_model("torch", path).adapter       # hnet_core.backends; the core imports no backend
    for step in stream_generate(adapter, ["Hello"], max_tokens=64, sampling=SamplingParams(temperature=0)):
        print(step.texts[0], end="")

A serving loop can drive an adapter directly: `new_cache` for a batch, `prefill` to read prompts
(or `extend` piece by piece), then `step` one byte per sample, sampling from the returned logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generator, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import HNetError
from .sampling import Sampler, SamplingParams
from .streaming import GenerationStats, GenerationStep, TextStream, collect_texts
from .tokenizer import encode

DEFAULT_PREFILL_STEP = 2048  # bytes per prompt piece (mlx-lm's prefill_step_size is 2048 tokens)


@dataclass
class StepResult:
    """What `Adapter.extend` and `Adapter.step` return, all numpy on the host."""

    logits: np.ndarray  # (B, V) float32: each sample's logits at the position asked for
    valid: np.ndarray  # (S, B) int64: per routing stage, tokens of this call that entered it, per sample
    boundaries: np.ndarray  # (S, B) int64: of those, the ones routing chose as chunk starts

    @classmethod
    def from_masks(cls, logits: np.ndarray, masks: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> StepResult:
        """From logits (B, V) and, per routing stage, (boundary_mask, valid) as numpy with B leading
        (valid None: every entry valid): the counts are sums over each sample's entries."""
        B = logits.shape[0]
        bounds = [np.asarray(b).reshape(B, -1) for b, _ in masks]
        valid = [np.full(B, b.shape[1]) if v is None else np.asarray(v).reshape(B, -1).sum(1)
                 for b, (_, v) in zip(bounds, masks)]
        shape = (len(masks), B)
        return cls(logits, np.array(valid, np.int64).reshape(shape), np.array([b.sum(1) for b in bounds], np.int64).reshape(shape))


@runtime_checkable
class Adapter(Protocol):
    """What a backend implements so the engine can run its model. `cache` is the backend's own
    object (torch/MLX: an InferenceCache; ONNX: a handle on the runtime's live state); the engine
    never looks inside it. ids are int64 and masks bool numpy arrays, right-padded: a row's real
    bytes are a prefix of the row, then False."""

    config: dict  # the model's config (HNetConfig.to_dict()): a prompt cache file records it, loading checks it

    def new_cache(self, batch_size: int, max_bytes: int) -> Any:
        """An empty cache for `batch_size` samples. max_bytes: the most bytes a sample will hold
        (prompt + generated), a hint for backends that reserve space; one that cannot hold that
        many raises HNetError (one line saying what to change)."""

    def extend(self, cache: Any, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        """Read a piece ids (B, L) with mask (B, L) into `cache` in place, continuing where each
        sample's cache ended (a row whose mask is all False leaves its sample unchanged). Return
        the logits at column last[b] of the piece for each sample b (last: (B,) int64) and the
        routing counts of the piece's real bytes."""

    def step(self, cache: Any, next_bytes: np.ndarray) -> StepResult:
        """Read one byte per sample, next_bytes (B, 1), into `cache`; return its logits (B, V) and
        routing counts (a sample whose stage did not run at this byte counts 0 there)."""

    # The methods below have defaults: an adapter that subclasses Adapter overrides what it has.

    def export_cache(self, cache: Any) -> tuple[dict, dict[str, np.ndarray]]:
        """(tree, arrays) of hnet_core.prompt_cache's file format: the cache's tensors as numpy in the
        canonical layout. A backend without prompt caches raises HNetError (the default)."""
        raise HNetError("prompt caches work with the torch and mlx backends, not this one")

    def import_cache(self, tree: dict, arrays: dict[str, np.ndarray]) -> Any:
        """The cache that export_cache described, ready for this adapter's model."""
        return self.export_cache(None)

    def reset_peak_memory(self) -> None:
        """Start measuring peak memory now (the default: a no-op, where the measure cannot be reset)."""

    def peak_memory(self) -> tuple[int, str] | None:
        """(bytes, what was measured) or None: backends measure different things (the process's
        resident set, the default; the MLX or CUDA allocator), so `-v` names the one it reports."""
        return rss_peak()


RSS_PEAK = "peak resident memory of the process"


def rss_peak() -> tuple[int, str] | None:
    """The process's peak resident set (what `-v` reports where no allocator counts)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), RSS_PEAK
    except Exception:
        return None


def check_prefill_step(step_size: int | None) -> int:
    """The prefill step size to use: DEFAULT_PREFILL_STEP for None; 0 or less is refused."""
    if step_size is None:
        return DEFAULT_PREFILL_STEP
    if isinstance(step_size, bool) or not isinstance(step_size, (int, np.integer)) or step_size <= 0:
        raise HNetError(f"--prefill-step-size must be a positive number of bytes, got {step_size}")
    return int(step_size)


def prompt_batch(prompts: str | bytes | Sequence[str | bytes], max_tokens: int, add_bos: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate the prompts; BOS + bytes per prompt (no BOS when continuing a cache), right-padded
    with 0: ids (B, L) int64, mask (B, L) bool."""
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not prompts:
        raise HNetError("give at least one prompt")
    if max_tokens < 0:
        raise HNetError(f"max_tokens must be >= 0, got {max_tokens}")
    seqs = [encode(p, add_bos=add_bos) for p in prompts]
    if any(len(s) == 0 for s in seqs):
        raise HNetError("a continuation of a prompt cache needs at least one byte")
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask


def prefill(adapter: Adapter, cache: Any, ids: np.ndarray, mask: np.ndarray, step_size: int | None = None
            ) -> StepResult:
    """Read right-padded prompts (B, L) into `cache` in pieces of `step_size` columns, each
    extending the same live cache. The logits returned are each sample's at its last real byte
    (so a sample keeps the row of the piece that held it); routing counts are summed over pieces."""
    step_size = check_prefill_step(step_size)
    lengths = mask.sum(-1)
    result: StepResult | None = None
    for start in range(0, ids.shape[1], step_size):
        ids_p, mask_p = ids[:, start : start + step_size], mask[:, start : start + step_size]
        at = np.clip(lengths - 1 - start, 0, ids_p.shape[1] - 1)
        out = adapter.extend(cache, ids_p, mask_p, at)
        if result is None:
            result = out
            continue
        here = (lengths - 1 >= start) & (lengths - 1 < start + ids_p.shape[1])
        result = StepResult(np.where(here[:, None], out.logits, result.logits),
                            result.valid + out.valid, result.boundaries + out.boundaries)
    assert result is not None, "prompt_batch gives at least one column"
    return result


def cache_prompt(adapter: Adapter, prompt: str | bytes, prefill_step_size: int | None = None) -> tuple[Any, dict]:
    """A new cache that has read `prompt` (BOS first, its last byte held back: see
    hnet_core.prompt_cache.split_prompt) in pieces of prefill_step_size bytes, and its metadata."""
    from .prompt_cache import split_prompt

    step_size = check_prefill_step(prefill_step_size)
    ids, metadata = split_prompt(prompt)
    cache = adapter.new_cache(1, len(ids))
    if ids:
        row = np.array([ids], dtype=np.int64)
        prefill(adapter, cache, row, np.ones(row.shape, dtype=bool), step_size)
    return cache, metadata


def stream_generate(adapter: Adapter, prompts: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                    prefill_step_size: int | None = None, prompt_cache: Any = None,
                    context: Sequence[Sequence[int]] | None = None
                    ) -> Generator[GenerationStep, None, GenerationStats]:
    """Yield a GenerationStep per byte (printable text per sample, UTF-8 safe, stop strings cut) and
    return GenerationStats. With `prompt_cache` (a live cache, e.g. a loaded prompt cache) the
    prompts continue the text it holds: no BOS is added and the cache is extended in place;
    `context` then holds the bytes it already read per sample, so the repetition penalty sees what
    it would have seen had the whole text been the prompt."""
    step_size = check_prefill_step(prefill_step_size)
    ids, mask = prompt_batch(prompts, max_tokens, add_bos=prompt_cache is None)
    B = ids.shape[0]
    # The last generated byte is never fed back, so a sample holds at most L + max_tokens - 1 bytes.
    cache = prompt_cache if prompt_cache is not None else adapter.new_cache(B, ids.shape[1] + max_tokens - 1)
    sampler = Sampler(sampling)
    stats = GenerationStats(prompt_bytes=int(mask.sum()))
    streams = [TextStream(stop) for _ in range(B)]
    history = [list(context[b] if context is not None else []) + ids[b, : int(mask[b].sum())].tolist()
               for b in range(B)]
    adapter.reset_peak_memory()
    if max_tokens == 0:
        stats.peak_memory = adapter.peak_memory()
        return stats
    t0 = time.perf_counter()
    out = prefill(adapter, cache, ids, mask, step_size)
    stats.prefill_seconds = time.perf_counter() - t0
    stats.add_routing(out.valid.sum(1).tolist(), out.boundaries.sum(1).tolist())
    t0 = time.perf_counter()
    first_step_end, steady_from = 0.0, 0
    for n in range(max_tokens):
        nxt = sampler(out.logits, history)
        step_bytes: list[int | None] = []
        texts: list[str] = []
        for b in range(B):
            if streams[b].done:  # finished samples keep stepping (batch shape) but print nothing
                step_bytes.append(None)
                texts.append("")
                continue
            byte = int(nxt[b])
            history[b].append(byte)
            step_bytes.append(byte)
            texts.append(streams[b].feed(byte))
            stats.generated_bytes += 1
        if n == 1:
            steady_from = stats.generated_bytes  # this iteration's bytes came from the first step
        if all(s.done for s in streams) or n == max_tokens - 1:
            texts = [t + (s.finish() if not s.done else "") for t, s in zip(texts, streams)]
            end = time.perf_counter()
            stats.decode_seconds = end - t0
            if n >= 2:
                stats.steady_bytes, stats.steady_seconds = stats.generated_bytes - steady_from, end - first_step_end
            stats.peak_memory = adapter.peak_memory()
            yield GenerationStep(step_bytes, texts, [True] * B)
            return stats
        yield GenerationStep(step_bytes, texts, [s.done for s in streams])
        started = time.perf_counter() if n == 0 else 0.0
        out = adapter.step(cache, np.array([[b if b is not None else 0] for b in step_bytes], dtype=np.int64))
        if n == 0:
            first_step_end = time.perf_counter()
            stats.first_step_seconds = first_step_end - started
        stats.add_routing(out.valid.sum(1).tolist(), out.boundaries.sum(1).tolist())
    return stats


def generate(adapter: Adapter, prompt: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             prefill_step_size: int | None = None, prompt_cache: Any = None) -> str | list[str]:
    """The generated continuation (a string, or one per prompt for a list of prompts)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    steps = stream_generate(adapter, prompt, max_tokens=max_tokens, sampling=params, stop=stop,
                            prefill_step_size=prefill_step_size, prompt_cache=prompt_cache)
    return collect_texts(steps, prompt)

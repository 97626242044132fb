"""Text generation: prefill the prompts, then one byte per step (any batch size, ragged prompts).

    from hnet_mlx import load, generate
    model, config = load("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`stream_generate` yields a `GenerationStep` per byte (printable text per sample, UTF-8 safe) and
returns `GenerationStats` (throughput, peak memory, per-stage chunk lengths) when it ends. The
sampler is hnet_core's (numpy), so torch and MLX draw the same bytes from the same logits and seed.
"""

from __future__ import annotations

import time
from typing import Generator, Sequence

import mlx.core as mx
import numpy as np

from hnet_core.errors import HNetError
from hnet_core.sampling import Sampler, SamplingParams
from hnet_core.streaming import GenerationStats, GenerationStep, TextStream
from hnet_core.tokenizer import encode

from .lm import HNetForCausalLM

CACHE_ROUNDING = 128


def batch_prompts(prompts: Sequence[str | bytes]) -> tuple[mx.array, mx.array]:
    """BOS + bytes per prompt, right-padded with 0: ids (B, L) int32 and mask (B, L) bool."""
    seqs = [encode(p) for p in prompts]
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), dtype=np.int32)
    mask = np.zeros((len(seqs), L), dtype=bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return mx.array(ids), mx.array(mask)


def _routing_counts(routing) -> tuple[list[int], list[int]]:
    mx.eval([r.boundary_mask for r in routing], [r.valid for r in routing if r.valid is not None])  # one sync
    valid = [int(np.array(r.valid).sum()) if r.valid is not None else r.boundary_mask.size for r in routing]
    return valid, [int(np.array(r.boundary_mask).sum()) for r in routing]


def _peak_memory() -> int | None:
    try:
        return int(mx.get_peak_memory())
    except Exception:  # a backend without memory accounting
        return None


def stream_generate(model: HNetForCausalLM, prompts: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = ()
                    ) -> Generator[GenerationStep, None, GenerationStats]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not prompts:
        raise HNetError("give at least one prompt")
    if max_tokens < 0:
        raise HNetError(f"max_tokens must be >= 0, got {max_tokens}")
    sampler = Sampler(sampling)
    ids, mask = batch_prompts(prompts)
    B = ids.shape[0]
    lengths = mask.sum(-1)
    stats = GenerationStats(prompt_bytes=int(lengths.sum().item()))
    streams = [TextStream(stop) for _ in range(B)]
    history = [encode(p) for p in prompts]
    if max_tokens == 0:
        return stats

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    # Cache lengths rounded up, so prompts of similar lengths share one compiled decode step.
    max_seqlen = -(-(ids.shape[1] + max_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
    cache = model.allocate_inference_cache(batch_size=B, max_seqlen=max_seqlen)
    out = model(ids, mask=mask, cache=cache)
    last = mx.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)
    last = np.array(last.astype(mx.float32))
    stats.prefill_seconds = time.perf_counter() - t0
    stats.add_routing(*_routing_counts(out.routing))

    t0 = time.perf_counter()
    for n in range(max_tokens):
        nxt = sampler(last, history)
        step_bytes: list[int | None] = []
        texts: list[str] = []
        for b in range(B):
            if streams[b].done:
                step_bytes.append(None)
                texts.append("")
                continue
            byte = int(nxt[b])
            history[b].append(byte)
            step_bytes.append(byte)
            texts.append(streams[b].feed(byte))
            stats.generated_bytes += 1
        finished = [s.done for s in streams]
        if all(finished) or n == max_tokens - 1:
            for b in range(B):
                if not streams[b].done:
                    texts[b] += streams[b].finish()
            stats.decode_seconds = time.perf_counter() - t0
            stats.peak_memory_bytes = _peak_memory()
            yield GenerationStep(step_bytes, texts, [True] * B)
            return stats
        yield GenerationStep(step_bytes, texts, finished)
        feed = np.array([[b if b is not None else 0] for b in step_bytes], dtype=np.int32)
        out = model.step(feed, cache)
        stats.add_routing(*_routing_counts(out.routing))
        last = np.array(out.logits[:, -1].astype(mx.float32))
    return stats


def generate(model: HNetForCausalLM, prompt: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> str | list[str]:
    """The generated continuation (a string, or one per prompt for a list of prompts)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    single = isinstance(prompt, (str, bytes))
    n = 1 if single else len(prompt)
    pieces = [[] for _ in range(n)]
    for step in stream_generate(model, prompt, max_tokens=max_tokens, sampling=params, stop=stop):
        for b, t in enumerate(step.texts):
            pieces[b].append(t)
    texts = ["".join(p) for p in pieces]
    return texts[0] if single else texts

"""Text generation: prefill the prompts, then one byte per step (any batch size, ragged prompts).

    from hnet_mlx import load, generate
    model, config = load("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`stream_generate` yields a `GenerationStep` per byte (printable text per sample, UTF-8 safe) and
returns `GenerationStats` (throughput, peak memory, per-stage chunk lengths) when it ends. The
sampler is hnet_core's (numpy), so torch and MLX draw the same bytes from the same logits and seed.
"""

from __future__ import annotations

from typing import Generator, Sequence

import mlx.core as mx
import numpy as np

from hnet_core.sampling import SamplingParams
from hnet_core.streaming import GenerationStats, GenerationStep, collect_texts, decode_loop, prompt_batch

from .lm import HNetForCausalLM

CACHE_ROUNDING = 128


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
    ids, mask = prompt_batch(prompts, max_tokens)
    cache = None

    def prefill(ids_np, mask_np):
        nonlocal cache
        ids_m, mask_m = mx.array(ids_np.astype(np.int32)), mx.array(mask_np)
        # Cache lengths rounded up, so prompts of similar lengths share one compiled decode step.
        max_seqlen = -(-(ids_np.shape[1] + max_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
        cache = model.allocate_inference_cache(batch_size=ids_np.shape[0], max_seqlen=max_seqlen)
        out = model(ids_m, mask=mask_m, cache=cache)
        lengths = mask_m.sum(-1)
        last = mx.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)
        return np.array(last.astype(mx.float32)), _routing_counts(out.routing)

    def step(next_bytes):
        out = model.step(mx.array(next_bytes.astype(np.int32)), cache)
        return np.array(out.logits[:, -1].astype(mx.float32)), _routing_counts(out.routing)

    mx.reset_peak_memory()
    stats = yield from decode_loop(ids, mask, max_tokens, sampling, stop, prefill, step)
    stats.peak_memory_bytes = _peak_memory()
    return stats


def generate(model: HNetForCausalLM, prompt: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> str | list[str]:
    """The generated continuation (a string, or one per prompt for a list of prompts)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    return collect_texts(stream_generate(model, prompt, max_tokens=max_tokens, sampling=params, stop=stop), prompt)

"""Text generation: prefill the prompts, then one byte per step (any batch size, ragged prompts).

    from hnet_torch import load_pretrained, generate
    model = load_pretrained("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`stream_generate` yields a `GenerationStep` per byte (printable text per sample, UTF-8 safe) and
returns `GenerationStats` (throughput, per-stage chunk lengths) when it ends. Prompts are read in
pieces of `prefill_step_size` bytes extending one growing cache, so a long prompt costs no more
memory than its cache. With `prompt_cache` (a live cache, e.g. from `load_prompt_cache`) the
prompts continue the text it holds: no BOS is added, and the cache is extended in place.
"""

from __future__ import annotations

from typing import Generator, Sequence

import torch

from hnet_core.sampling import SamplingParams
from hnet_core.streaming import (DEFAULT_PREFILL_STEP, GenerationStats, GenerationStep, collect_texts, decode_loop,
                                  prefill_in_pieces, prompt_batch)

from .cache import InferenceCache
from .lm import HNetForCausalLM


def _routing_counts(routing) -> tuple[list[int], list[int]]:
    valid = [int(r.valid.sum()) if r.valid is not None else r.boundary_mask.numel() for r in routing]
    return valid, [int(r.boundary_mask.sum()) for r in routing]


@torch.inference_mode()
def stream_generate(model: HNetForCausalLM, prompts: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                    prefill_step_size: int = DEFAULT_PREFILL_STEP, prompt_cache: InferenceCache | None = None,
                    context: Sequence[Sequence[int]] | None = None
                    ) -> Generator[GenerationStep, None, GenerationStats]:
    """`context`: the bytes `prompt_cache` already holds per sample (for the repetition penalty)."""
    ids, mask = prompt_batch(prompts, max_tokens, add_bos=prompt_cache is None)
    device = model.embeddings.weight.device
    cache = prompt_cache

    def piece(ids_np, mask_np, last):
        ids_t, mask_t = torch.from_numpy(ids_np).to(device), torch.from_numpy(mask_np).to(device)
        out = model(ids_t, mask=mask_t, cache=cache)
        rows = out.logits[torch.arange(ids_t.shape[0], device=device), torch.from_numpy(last).to(device)]  # (B, V)
        return rows.float().cpu().numpy(), _routing_counts(out.routing)

    def prefill(ids_np, mask_np):
        nonlocal cache
        if cache is None:
            cache = model.allocate_inference_cache(batch_size=ids_np.shape[0])
        return prefill_in_pieces(ids_np, mask_np, prefill_step_size, piece)

    def step(next_bytes):
        out = model.step(torch.from_numpy(next_bytes).to(device), cache)
        return out.logits[:, -1].float().cpu().numpy(), _routing_counts(out.routing)

    # inference_mode must cover the steps too, so the loop runs inside this generator
    return (yield from decode_loop(ids, mask, max_tokens, sampling, stop, prefill, step, context=context))


def generate(model: HNetForCausalLM, prompt: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             prefill_step_size: int = DEFAULT_PREFILL_STEP, prompt_cache: InferenceCache | None = None
             ) -> str | list[str]:
    """The generated continuation (a string, or one per prompt for a list of prompts)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    steps = stream_generate(model, prompt, max_tokens=max_tokens, sampling=params, stop=stop,
                            prefill_step_size=prefill_step_size, prompt_cache=prompt_cache)
    return collect_texts(steps, prompt)

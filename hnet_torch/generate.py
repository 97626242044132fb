"""Text generation: prefill the prompts, then one byte per step (any batch size, ragged prompts).

    from hnet_torch import load_pretrained, generate
    model = load_pretrained("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`stream_generate` yields a `GenerationStep` per byte (printable text per sample, UTF-8 safe) and
returns `GenerationStats` (throughput, per-stage chunk lengths) when it ends.
"""

from __future__ import annotations

from typing import Generator, Sequence

import torch

from hnet_core.sampling import SamplingParams
from hnet_core.streaming import GenerationStats, GenerationStep, collect_texts, decode_loop, prompt_batch

from .lm import HNetForCausalLM


def _routing_counts(routing) -> tuple[list[int], list[int]]:
    valid = [int(r.valid.sum()) if r.valid is not None else r.boundary_mask.numel() for r in routing]
    return valid, [int(r.boundary_mask.sum()) for r in routing]


@torch.inference_mode()
def stream_generate(model: HNetForCausalLM, prompts: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = ()
                    ) -> Generator[GenerationStep, None, GenerationStats]:
    ids, mask = prompt_batch(prompts, max_tokens)
    device = model.embeddings.weight.device
    cache = None

    def prefill(ids_np, mask_np):
        nonlocal cache
        ids_t, mask_t = torch.from_numpy(ids_np).to(device), torch.from_numpy(mask_np).to(device)
        B = ids_t.shape[0]
        cache = model.allocate_inference_cache(batch_size=B, max_seqlen=ids_t.shape[1] + max_tokens)
        out = model(ids_t, mask=mask_t, cache=cache)
        last = out.logits[torch.arange(B, device=device), mask_t.sum(-1) - 1]  # (B, V)
        return last.float().cpu().numpy(), _routing_counts(out.routing)

    def step(next_bytes):
        out = model.step(torch.from_numpy(next_bytes).to(device), cache)
        return out.logits[:, -1].float().cpu().numpy(), _routing_counts(out.routing)

    # inference_mode must cover the steps too, so the loop runs inside this generator
    return (yield from decode_loop(ids, mask, max_tokens, sampling, stop, prefill, step))


def generate(model: HNetForCausalLM, prompt: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> str | list[str]:
    """The generated continuation (a string, or one per prompt for a list of prompts)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    return collect_texts(stream_generate(model, prompt, max_tokens=max_tokens, sampling=params, stop=stop), prompt)

"""Text generation: prefill the prompts, then one byte per step (any batch size, ragged prompts).

    from hnet_torch import load_pretrained, generate
    model = load_pretrained("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`stream_generate` yields a `GenerationStep` per byte (printable text per sample, UTF-8 safe) and
returns `GenerationStats` (throughput, per-stage chunk lengths) when it ends.
"""

from __future__ import annotations

import time
from typing import Generator, Sequence

import torch

from hnet_core.errors import HNetError
from hnet_core.sampling import Sampler, SamplingParams
from hnet_core.streaming import GenerationStats, GenerationStep, TextStream
from hnet_core.tokenizer import encode

from .lm import HNetForCausalLM


def batch_prompts(prompts: Sequence[str | bytes], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + bytes per prompt, right-padded with 0: ids (B, L) int64 and mask (B, L) bool."""
    seqs = [encode(p) for p in prompts]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def _routing_counts(routing) -> tuple[list[int], list[int]]:
    valid = [int(r.valid.sum()) if r.valid is not None else r.boundary_mask.numel() for r in routing]
    return valid, [int(r.boundary_mask.sum()) for r in routing]


@torch.inference_mode()
def stream_generate(model: HNetForCausalLM, prompts: str | bytes | Sequence[str | bytes], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = ()
                    ) -> Generator[GenerationStep, None, GenerationStats]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not prompts:
        raise HNetError("give at least one prompt")
    if max_tokens < 0:
        raise HNetError(f"max_tokens must be >= 0, got {max_tokens}")
    device = model.embeddings.weight.device
    sampler = Sampler(sampling)
    ids, mask = batch_prompts(prompts, device)
    B = ids.shape[0]
    stats = GenerationStats(prompt_bytes=int(mask.sum()))
    streams = [TextStream(stop) for _ in range(B)]
    history = [encode(p) for p in prompts]
    if max_tokens == 0:
        return stats

    t0 = time.perf_counter()
    cache = model.allocate_inference_cache(batch_size=B, max_seqlen=ids.shape[1] + max_tokens)
    out = model(ids, mask=mask, cache=cache)
    last = out.logits[torch.arange(B, device=device), mask.sum(-1) - 1].float().cpu().numpy()  # (B, V)
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
            yield GenerationStep(step_bytes, texts, [True] * B)
            return stats
        yield GenerationStep(step_bytes, texts, finished)
        feed = torch.tensor([[b if b is not None else 0] for b in step_bytes], device=device)
        out = model.step(feed, cache)
        stats.add_routing(*_routing_counts(out.routing))
        last = out.logits[:, -1].float().cpu().numpy()
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

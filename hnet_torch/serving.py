"""The torch side of `hnet serve`: prefill one request, merge rows into the running batch, step it.

The scheduler (hnet_core/serve/scheduler.py) owns requests, sampling and text; this adapter only
moves bytes in and logits out (numpy, float32), holding caches it gets back unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from . import batch_cache
from .cache import InferenceCache
from .lm import HNetForCausalLM


class ServeBackend:
    max_seqlen: int | None = None  # a cache grows without limit

    def __init__(self, model: HNetForCausalLM):
        self.model = model
        self.device = model.embeddings.weight.device

    @torch.inference_mode()
    def prefill(self, cache: InferenceCache | None, piece: np.ndarray) -> tuple[InferenceCache, np.ndarray]:
        """Extend one request's cache (None: a new one) by piece (L,); logits (V,) after its last byte."""
        if cache is None:
            cache = self.model.allocate_inference_cache(batch_size=1)
        out = self.model(torch.from_numpy(piece[None]).to(self.device), cache=cache)
        return cache, out.logits[0, -1].float().cpu().numpy()

    @torch.inference_mode()
    def merge(self, caches: list[InferenceCache]) -> InferenceCache:
        return caches[0] if len(caches) == 1 else batch_cache.merge_caches(caches)

    @torch.inference_mode()
    def filter(self, cache: InferenceCache, rows: list[int]) -> InferenceCache:
        return batch_cache.filter_cache(cache, rows)

    @torch.inference_mode()
    def step(self, cache: InferenceCache, next_bytes: np.ndarray) -> tuple[InferenceCache, np.ndarray]:
        """One byte per row, next_bytes (B,); logits (B, V)."""
        out = self.model.step(torch.from_numpy(next_bytes[:, None]).to(self.device), cache)
        return cache, out.logits[:, -1].float().cpu().numpy()

"""The MLX side of `hnet serve`: prefill one request, merge rows into the running batch, step it.

The scheduler (hnet_core/serve/scheduler.py) owns requests, sampling and text; this adapter only
moves bytes in and logits out (numpy, float32), holding caches it gets back unchanged. Every call
evaluates the cache, so no lazy graph grows across requests.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import batch_cache
from .cache import InferenceCache, state_arrays
from .lm import HNetForCausalLM


class ServeBackend:
    max_seqlen: int | None = None  # a cache grows without limit

    def __init__(self, model: HNetForCausalLM):
        self.model = model

    def prefill(self, cache: InferenceCache | None, piece: np.ndarray) -> tuple[InferenceCache, np.ndarray]:
        """Extend one request's cache (None: a new one) by piece (L,); logits (V,) after its last byte."""
        if cache is None:
            cache = self.model.allocate_inference_cache(batch_size=1)
        logits = self.model(mx.array(piece[None]), cache=cache).logits[0, -1].astype(mx.float32)
        mx.eval(logits, cache.lengths, *state_arrays(cache.backbone))
        return cache, np.array(logits)

    def merge(self, caches: list[InferenceCache]) -> InferenceCache:
        return caches[0] if len(caches) == 1 else self._evaluated(batch_cache.merge_caches(caches))

    def filter(self, cache: InferenceCache, rows: list[int]) -> InferenceCache:
        return self._evaluated(batch_cache.filter_cache(cache, rows))

    def step(self, cache: InferenceCache, next_bytes: np.ndarray) -> tuple[InferenceCache, np.ndarray]:
        """One byte per row, next_bytes (B,); logits (B, V)."""
        logits = self.model.step(mx.array(next_bytes[:, None]), cache).logits[:, -1].astype(mx.float32)
        mx.eval(logits, cache.lengths, *state_arrays(cache.backbone))
        return cache, np.array(logits)

    @staticmethod
    def _evaluated(cache: InferenceCache) -> InferenceCache:
        mx.eval(cache.lengths, *state_arrays(cache.backbone))
        return cache

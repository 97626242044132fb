"""The scheduler's backend for torch and MLX: hnet_core.engine's Adapter plus the backend's batch
cache operations (hnet_torch/batch_cache.py, hnet_mlx/batch_cache.py).

The adapter reads pieces and steps; merge and filter come from the batch cache module, so the
serving loop needs nothing else of the framework. (ONNX keeps one live state per OnnxHNet, so its
serving backend is export/serving.py, with the same four moves.)
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


class EngineBackend:
    max_seqlen: int | None = None  # torch and MLX caches grow without limit

    def __init__(self, adapter: Any, batch_cache: ModuleType):
        self.adapter, self.ops = adapter, batch_cache

    def prefill(self, cache: Any, piece: np.ndarray) -> tuple[Any, np.ndarray]:
        """Extend one request's cache (None: a new one) by piece (L,); logits (V,) after its last byte."""
        if cache is None:
            cache = self.adapter.new_cache(1, len(piece))
        out = self.adapter.extend(cache, piece[None], np.ones((1, len(piece)), dtype=bool),
                                  np.array([len(piece) - 1], dtype=np.int64))
        return cache, out.logits[0]

    def merge(self, caches: list[Any]) -> Any:
        return caches[0] if len(caches) == 1 else self.ops.merge_caches(caches)

    def filter(self, cache: Any, rows: list[int]) -> Any:
        return self.ops.filter_cache(cache, rows)

    def step(self, cache: Any, next_bytes: np.ndarray) -> tuple[Any, np.ndarray]:
        """One byte per row, next_bytes (B,); logits (B, V)."""
        return cache, self.adapter.step(cache, next_bytes[:, None]).logits

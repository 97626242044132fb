"""The ONNX side of `hnet serve`: prefill one request, merge rows into the running batch, step it.

Two OnnxHNet objects share the mapped weights: one prefills requests (one at a time, in pieces),
one decodes the running batch, so neither's live state is swapped out between a prefill piece and
a decode step. A cache handed to the scheduler is a `Handle`: live inside one of them, or parked
as host arrays when another request's prefill took its place.
"""

from __future__ import annotations

import numpy as np

from . import batch_cache
from .batch_cache import OnnxState
from .runtime import OnnxHNet


class Handle:
    def __init__(self) -> None:
        self.parked: OnnxState | None = None  # None while live in its OnnxHNet


class ServeBackend:
    def __init__(self, path: str, provider: str = "auto", threads: int | None = None):
        self.prefiller = OnnxHNet(path, provider=provider, threads=threads)
        self.decoder = OnnxHNet(path, provider=provider, threads=threads)
        # Every session is created and run once now, not on the first request: the prefiller reads
        # prompts in pieces, the decoder steps batches whose size changes as requests come and go.
        self.prefiller.warm_up(roles=("prefill", "extend"))
        self.decoder.warm_up(batch=None, roles=("step",))
        self.max_seqlen = self.decoder.max_seqlen
        self.prefilling: Handle | None = None  # the handle live in self.prefiller
        self.batch: Handle | None = None  # the handle live in self.decoder

    def prefill(self, cache: Handle | None, piece: np.ndarray) -> tuple[Handle, np.ndarray]:
        """Extend one request's cache (None: a new one) by piece (L,); logits (V,) after its last byte."""
        if self.prefilling is not None and self.prefilling is not cache:
            self.prefilling.parked = self.prefiller.get_state()
        if cache is None:
            cache = Handle()
            out = self.prefiller.prefill(piece[None].astype(np.int64))
        else:
            if cache is not self.prefilling:
                self.prefiller.set_state(cache.parked)
                cache.parked = None
            out = self.prefiller.extend(piece[None].astype(np.int64))
        self.prefilling = cache
        return cache, out.logits[0, -1]

    def _state(self, cache: Handle) -> OnnxState:
        if cache is self.prefilling:
            self.prefilling = None
            return self.prefiller.get_state()
        if cache is self.batch:
            return self.decoder.get_state()
        return cache.parked

    def _decode(self, state: OnnxState) -> Handle:
        self.decoder.set_state(state)
        self.batch = Handle()
        return self.batch

    def merge(self, caches: list[Handle]) -> Handle:
        return self._decode(batch_cache.merge_caches([self._state(c) for c in caches]))

    def filter(self, cache: Handle, rows: list[int]) -> Handle:
        return self._decode(batch_cache.filter_cache(self._state(cache), rows))

    def step(self, cache: Handle, next_bytes: np.ndarray) -> tuple[Handle, np.ndarray]:
        """One byte per row, next_bytes (B,); logits (B, V)."""
        if cache is not self.batch:
            cache = self._decode(self._state(cache))
        out = self.decoder.step(next_bytes[:, None].astype(np.int64))
        return cache, out.logits[:, -1]

"""Choosing the next byte from logits, in numpy, shared by every backend.

One sampler for torch, MLX and ONNX means one set of semantics (and, with the same seed and the
same logits, the same bytes). The logits are 256 floats per sample, so moving them to the host
costs nothing next to the model step. Order of operations (as in Hugging Face / mlx-lm):
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw. temperature = 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import HNetError


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style: divide positive logits, multiply negative)
    repetition_context: int = 64  # how many recent bytes the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        # `not x >= 0` also catches NaN; infinity is refused too (temperature inf would be uniform noise).
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise HNetError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise HNetError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise HNetError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise HNetError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise HNetError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if self.repetition_context < 0:
            raise HNetError(f"repetition_context must be >= 0, got {self.repetition_context}")


class Sampler:
    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history: list[list[int]] | None = None) -> np.ndarray:
        """logits (B, V) -> next byte per sample (B,) int64. history[b] = bytes seen so far by sample b."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float64).copy()
        if p.repetition_penalty != 1.0 and history is not None and p.repetition_context > 0:
            for b, seen in enumerate(history):
                recent = np.unique(np.asarray(seen[-p.repetition_context :], dtype=np.int64))
                if recent.size:
                    vals = logits[b, recent]
                    logits[b, recent] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return logits.argmax(-1)
        logits = logits / p.temperature
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if p.top_k > 0 and p.top_k < probs.shape[-1]:
            kth = np.sort(probs, axis=-1)[:, -p.top_k][:, None]
            probs = np.where(probs >= kth, probs, 0.0)
        if p.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, -1)
            cum = np.cumsum(sorted_p, -1) / sorted_p.sum(-1, keepdims=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            keep_sorted = (cum - sorted_p / sorted_p.sum(-1, keepdims=True)) < p.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            probs = np.where(keep, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(-1, keepdims=True), probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)

"""The routing module: where do chunks start? (paper eq. 4)

The MLX mirror of hnet_torch/routing.py, whose docstring states the rule once: p_t from the cosine
of W_q h_{t-1} and W_k h_t, the forced boundary at every sequence start, how a live cache being
extended compares its first new byte, and the strict p > 0.5 of the official argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cache import RoutingState
from .mamba2 import commit


@dataclass
class RoutingOutput:
    boundary_prob: mx.array  # (B, L) p_t (packed: (1, T))
    boundary_mask: mx.array  # (B, L) bool, AND-ed with `valid`
    selected_probs: mx.array  # (B, L) p where p > 0.5 else 1 - p
    valid: mx.array | None = None  # (B, L) bool: real entries (padding / not-run steps are False)
    cu_seqlens: mx.array | None = None  # packed mode: sequence offsets at this stage


def normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """torch's F.normalize: x / max(||x||_2, eps) over the last axis."""
    norm = mx.sqrt((x * x).sum(-1, keepdims=True))
    return x / mx.maximum(norm, eps)


def boundary_probability(q: mx.array, k: mx.array) -> mx.array:
    cos = (normalize(q) * normalize(k)).sum(-1)
    return mx.clip((1 - cos) / 2, 0.0, 1.0)


class RoutingModule(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.q_proj_layer = nn.Linear(d_model, d_model, bias=False)
        self.k_proj_layer = nn.Linear(d_model, d_model, bias=False)
        self.q_proj_layer.weight = mx.eye(d_model)
        self.k_proj_layer.weight = mx.eye(d_model)

    def allocate_state(self, batch_size: int, dtype=None) -> RoutingState:
        return RoutingState(
            has_seen_tokens=mx.zeros((batch_size,), dtype=mx.bool_),
            last_hidden_state=mx.zeros((batch_size, self.d_model), dtype=dtype or self.q_proj_layer.weight.dtype),
        )

    def __call__(self, h: mx.array, mask: mx.array | None = None, seq_start: mx.array | None = None,
                 state: RoutingState | None = None) -> RoutingOutput:
        """h (B, L, D); mask (B, L) for right-padded batches; seq_start (B, L) bool in packed mode."""
        B, L = h.shape[:2]
        p = boundary_probability(self.q_proj_layer(h[:, :-1]), self.k_proj_layer(h[:, 1:]))  # (B, L-1)
        if state is not None:
            # Continuing a cache: p of the first new byte against the last cached one (p = 1 only
            # for a sample that has seen nothing yet, i.e. the true start of its sequence).
            first = boundary_probability(self.q_proj_layer(state.last_hidden_state.astype(h.dtype)),
                                         self.k_proj_layer(h[:, 0]))
            first = mx.where(state.has_seen_tokens, first, mx.ones_like(first))
            p = mx.concatenate([first[:, None].astype(p.dtype), p], axis=1)
        else:
            p = mx.concatenate([mx.ones((B, 1), dtype=p.dtype), p], axis=1)
        if seq_start is not None:
            p = mx.where(seq_start, mx.ones_like(p), p)
        boundary = p > 0.5
        selected = mx.where(boundary, p, 1 - p)
        if mask is not None:
            boundary = boundary & mask
        if state is not None:
            lengths = mask.sum(-1) if mask is not None else mx.full((B,), L)
            has = lengths > 0
            last = mx.take_along_axis(h, mx.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
            state.last_hidden_state = mx.where(has[:, None], last, state.last_hidden_state).astype(
                state.last_hidden_state.dtype)
            state.has_seen_tokens = state.has_seen_tokens | has
        return RoutingOutput(p, boundary, selected, valid=mask)

    def step(self, h: mx.array, state: RoutingState, active: mx.array | None = None) -> RoutingOutput:
        """h (B, 1, D) -> outputs of shape (B,)."""
        h = h[:, 0]
        p = boundary_probability(self.q_proj_layer(state.last_hidden_state), self.k_proj_layer(h))
        p = mx.where(state.has_seen_tokens, p, mx.ones_like(p))
        state.last_hidden_state = commit(state.last_hidden_state, h, active)
        state.has_seen_tokens = commit(state.has_seen_tokens, mx.ones_like(state.has_seen_tokens), active)
        boundary = p > 0.5
        if active is not None:
            boundary = boundary & active
        return RoutingOutput(p, boundary, mx.where(p > 0.5, p, 1 - p), valid=active)

"""The routing module: where do chunks start? (paper eq. 4)

    p_t = clamp((1 - cos(W_q h_{t-1}, W_k h_t)) / 2, 0, 1),   p_0 = 1,   b_t = [p_t > 0.5]

q is applied to the previous byte and k to the current one; both projections start as the
identity. The first position of every sequence is forced to p = 1 (in packed mode, every
cu_seqlens start). A live cache being extended is not a new sequence: its first new byte is
compared with the last byte before the cut (`last_hidden_state`), exactly as a single pass would. Official `argmax([1 - p, p])` means strictly p > 0.5 (a tie is not a boundary).
`selected_probs` is p on boundaries and 1 - p elsewhere; it only reaches the model through the
straight-through estimator in hnet.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import RoutingState
from .mamba2 import commit


@dataclass
class RoutingOutput:
    boundary_prob: torch.Tensor  # (B, L) p_t (packed: (1, T))
    boundary_mask: torch.Tensor  # (B, L) bool, AND-ed with `valid`
    selected_probs: torch.Tensor  # (B, L) p where p > 0.5 else 1 - p
    valid: torch.Tensor | None = None  # (B, L) bool: real entries (padding / not-run steps are False)
    cu_seqlens: torch.Tensor | None = None  # packed mode: sequence offsets at this stage


def boundary_probability(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    cos = (F.normalize(q, dim=-1) * F.normalize(k, dim=-1)).sum(-1)
    return torch.clamp((1 - cos) / 2, min=0.0, max=1.0)


class RoutingModule(nn.Module):
    def __init__(self, d_model: int, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.q_proj_layer = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.k_proj_layer = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.q_proj_layer.weight.copy_(torch.eye(d_model))
            self.k_proj_layer.weight.copy_(torch.eye(d_model))

    def allocate_state(self, batch_size: int, dtype=None) -> RoutingState:
        w = self.q_proj_layer.weight
        return RoutingState(
            has_seen_tokens=torch.zeros(batch_size, dtype=torch.bool, device=w.device),
            last_hidden_state=torch.zeros(batch_size, self.d_model, device=w.device, dtype=dtype or w.dtype),
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, seq_start: torch.Tensor | None = None,
                state: RoutingState | None = None) -> RoutingOutput:
        """h (B, L, D); mask (B, L) for right-padded batches; seq_start (B, L) bool in packed mode."""
        p = boundary_probability(self.q_proj_layer(h[:, :-1]), self.k_proj_layer(h[:, 1:]))  # (B, L-1)
        if state is not None:
            # Continuing a cache: p of the first new byte against the last cached one (p = 1 only
            # for a sample that has seen nothing yet, i.e. the true start of its sequence).
            first = boundary_probability(self.q_proj_layer(state.last_hidden_state.to(h.dtype)), self.k_proj_layer(h[:, 0]))
            p = torch.cat([torch.where(state.has_seen_tokens, first, torch.ones_like(first))[:, None], p], dim=1)
        else:
            p = F.pad(p, (1, 0), value=1.0)
        if seq_start is not None:
            p = torch.where(seq_start, torch.ones_like(p), p)
        boundary = p > 0.5
        selected = torch.where(boundary, p, 1 - p)
        if mask is not None:
            boundary = boundary & mask
        if state is not None:
            lengths = mask.sum(-1) if mask is not None else torch.full((h.shape[0],), h.shape[1], device=h.device)
            has = lengths > 0
            last = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]
            state.last_hidden_state.copy_(torch.where(has[:, None], last, state.last_hidden_state))
            state.has_seen_tokens.copy_(state.has_seen_tokens | has)
        return RoutingOutput(p, boundary, selected, valid=mask)

    def step(self, h: torch.Tensor, state: RoutingState, active: torch.Tensor | None = None) -> RoutingOutput:
        """h (B, 1, D) -> outputs of shape (B,)."""
        h = h[:, 0]
        p = boundary_probability(self.q_proj_layer(state.last_hidden_state), self.k_proj_layer(h))
        p = torch.where(state.has_seen_tokens, p, torch.ones_like(p))
        commit(state.last_hidden_state, h, active)
        commit(state.has_seen_tokens, torch.ones_like(state.has_seen_tokens), active)
        boundary = p > 0.5
        if active is not None:
            boundary = boundary & active
        return RoutingOutput(p, boundary, torch.where(p > 0.5, p, 1 - p), valid=active)

"""The dechunk layer: smooth the chunk outputs with an EMA and spread them back over the bytes
(paper eq. 5 and 6, "upsampling").

    z̄_j = P_j ẑ_j + (1 - P_j) z̄_{j-1}   over the chunk sequence (z̄_{-1} = 0)
    out_t = z̄_{c(t)}                     c(t) = index of the last boundary <= t (no shift)

P is the boundary probability of the chunk's first byte, clamped to [1e-4, 1 - 1e-4] as in the
official code, so the forced first chunk gives 0.9999 ẑ_0. The EMA always runs in fp32 (the
official forward rounds it to bf16 by default while its step does not; see the fixture README).
In step mode a non-boundary byte holds the last value exactly (P = 0). Extending a live cache,
the EMA starts from the cached z̄ (bytes before the piece's first boundary keep it); the scan is
linear in its start value, so that is the zero-start scan plus prod_{i<=j}(1 - P_i) z̄_cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import DeChunkState
from .chunk import boundary_order
from . import kernels
from .mamba2 import commit

P_MIN, P_MAX = 1e-4, 1 - 1e-4
EMA_BLOCK = 256  # official block size of the EMA scan


def packed_seq_idx(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(N+1,) offsets -> (1, total) sequence id of every position."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True))[None]


class DeChunkLayer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.use_kernels = "auto"  # the EMA is a scan: it follows the scan path ("compiled" compiles it)

    def allocate_state(self, batch_size: int, device=None) -> DeChunkState:
        return DeChunkState(last_value=torch.zeros(batch_size, self.d_model, device=device, dtype=torch.float32))

    def forward(self, inner: torch.Tensor, boundary_mask: torch.Tensor, boundary_prob: torch.Tensor,
                mask: torch.Tensor | None = None, inner_cu_seqlens: torch.Tensor | None = None,
                state: DeChunkState | None = None) -> torch.Tensor:
        """inner (B, M, D) chunk outputs; boundary_mask/prob (B, L) -> (B, L, D) in inner's dtype."""
        p = boundary_prob.float().clamp(P_MIN, P_MAX)
        B, L = boundary_mask.shape
        chunk_of = torch.cumsum(boundary_mask.long(), dim=1) - 1  # (B, L); -1 before the first boundary
        if inner.shape[1] == 0:  # no new chunk in any sample: every byte keeps the cached value
            out = state.last_value[:, None].expand(B, L, -1)
        else:
            if inner_cu_seqlens is not None:
                p_chunks = p[:, boundary_mask[0]]  # (1, M)
                seq_idx = packed_seq_idx(inner_cu_seqlens, p_chunks.shape[1])
            else:
                order = boundary_order(boundary_mask)[:, : inner.shape[1]]
                p_chunks = p.gather(1, order)  # (B, M)
                seq_idx = None
            z = kernels.ema_scan(inner, p_chunks, EMA_BLOCK, seq_idx=seq_idx, mode=self.use_kernels)  # (B, M, D) fp32
            if state is not None:
                decay = torch.exp(torch.cumsum(torch.log1p(-p_chunks), dim=1))  # (B, M)
                z = z + decay[..., None] * state.last_value[:, None]
            out = z.gather(1, chunk_of.clamp(min=0)[..., None].expand(-1, -1, z.shape[-1]))
            if state is not None:
                out = torch.where((chunk_of < 0)[..., None], state.last_value[:, None], out)
        if state is not None:
            lengths = mask.sum(-1) if mask is not None else torch.full((B,), L, device=out.device)
            last = out[torch.arange(B, device=out.device), (lengths - 1).clamp(min=0)]
            state.last_value.copy_(torch.where((lengths > 0)[:, None], last, state.last_value))
        return out.to(inner.dtype)

    def step(self, inner: torch.Tensor, boundary_mask: torch.Tensor, boundary_prob: torch.Tensor,
             state: DeChunkState, active: torch.Tensor | None = None) -> torch.Tensor:
        """inner (B, 1, D) (read only where boundary_mask), mask/prob (B,) -> (B, 1, D)."""
        p = boundary_prob.float().clamp(P_MIN, P_MAX)[:, None]
        updated = p * inner[:, 0].float() + (1 - p) * state.last_value
        z = torch.where(boundary_mask[:, None], updated, state.last_value)
        commit(state.last_value, z, active)
        return z[:, None].to(inner.dtype)

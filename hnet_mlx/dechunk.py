"""The dechunk layer: smooth the chunk outputs with an EMA and spread them back over the bytes
(paper eq. 5 and 6, "upsampling").

    z̄_j = P_j ẑ_j + (1 - P_j) z̄_{j-1}   over the chunk sequence (z̄_{-1} = 0)
    out_t = z̄_{c(t)}                     c(t) = index of the last boundary <= t (no shift)

P is the boundary probability of the chunk's first byte, clamped to [1e-4, 1 - 1e-4] as in the
official code, so the forced first chunk gives 0.9999 ẑ_0. The EMA always runs in fp32 (the
official forward rounds it to bf16 by default while its step does not; see the fixture README).
In step mode a non-boundary byte holds the last value exactly (P = 0). The scan + spread goes
through kernels.ema_dechunk (the Metal kernel's dispatch point). Extending a live cache, the EMA
starts from the cached z̄ (bytes before the piece's first boundary keep it); the scan is linear in
its start value, so that is the zero-start scan plus prod_{i<=j}(1 - P_i) z̄_cached.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cache import DeChunkState
from .chunk import boundary_order, boundary_positions
from .mamba2 import commit

P_MIN, P_MAX = 1e-4, 1 - 1e-4
EMA_BLOCK = 256  # official block size of the EMA scan (ssd.ema_dechunk's default chunk_size)


def packed_seq_idx(cu_seqlens: mx.array, total: int) -> mx.array:
    """(N+1,) offsets -> (1, total) int32 sequence id of every position (searchsorted, right)."""
    pos = mx.arange(total)
    return (pos[:, None] >= cu_seqlens[None, 1:]).astype(mx.int32).sum(-1)[None]


class DeChunkLayer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.use_kernels = kernels.default_mode()  # $HNET_METAL_KERNELS, else "auto"

    def allocate_state(self, batch_size: int) -> DeChunkState:
        return DeChunkState(last_value=mx.zeros((batch_size, self.d_model), dtype=mx.float32))

    def __call__(self, inner: mx.array, boundary_mask: mx.array, boundary_prob: mx.array,
                 mask: mx.array | None = None, inner_cu_seqlens: mx.array | None = None,
                 state: DeChunkState | None = None) -> mx.array:
        """inner (B, M, D) chunk outputs; boundary_mask/prob (B, L) -> (B, L, D) in inner's dtype."""
        p = mx.clip(boundary_prob.astype(mx.float32), P_MIN, P_MAX)
        B, L = boundary_mask.shape
        chunk_of = mx.cumsum(boundary_mask.astype(mx.int32), axis=1) - 1  # (B, L); -1 before the first boundary
        if inner.shape[1] == 0:  # no new chunk in any sample: every byte keeps the cached value
            out = mx.broadcast_to(state.last_value[:, None], (B, L, state.last_value.shape[-1]))
        else:
            if inner_cu_seqlens is not None:
                p_chunks = mx.take(p, boundary_positions(boundary_mask[0]), axis=1)  # (1, M)
                seq_idx = packed_seq_idx(inner_cu_seqlens, p_chunks.shape[1])
            else:
                order = boundary_order(boundary_mask)[:, : inner.shape[1]]
                p_chunks = mx.take_along_axis(p, order, axis=1)  # (B, M)
                seq_idx = None
            index = mx.maximum(chunk_of, 0)
            out = kernels.ema_dechunk(inner, p_chunks, index, seq_idx, mode=self.use_kernels)  # (B, L, D) fp32
            if state is not None:
                decay = mx.exp(mx.cumsum(mx.log1p(-p_chunks), axis=1))  # (B, M)
                carried = mx.take_along_axis(decay, index, axis=1)[..., None] * state.last_value[:, None]
                out = mx.where((chunk_of < 0)[..., None], state.last_value[:, None], out + carried)
        if state is not None:
            lengths = mask.sum(-1) if mask is not None else mx.full((B,), L)
            last = mx.take_along_axis(out, mx.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
            state.last_value = mx.where((lengths > 0)[:, None], last, state.last_value)
        return out.astype(inner.dtype)

    def step(self, inner: mx.array, boundary_mask: mx.array, boundary_prob: mx.array,
             state: DeChunkState, active: mx.array | None = None) -> mx.array:
        """inner (B, 1, D) (read only where boundary_mask), mask/prob (B,) -> (B, 1, D)."""
        p = mx.clip(boundary_prob.astype(mx.float32), P_MIN, P_MAX)[:, None]
        updated = p * inner[:, 0].astype(mx.float32) + (1 - p) * state.last_value
        z = mx.where(boundary_mask[:, None], updated, state.last_value)
        state.last_value = commit(state.last_value, z, active)
        return z[:, None].astype(inner.dtype)

"""The chunk layer: keep the boundary positions (paper eq. 3, "downsampling").

Masked mode: each row's boundary tokens move to the front, in order (a sort on
index + L * [not boundary], as the official layer does); the inner sequence has
M = max boundaries per row, and rows with fewer are padded with their leftover non-boundary
tokens (official behaviour: outputs at valid positions never depend on them).
Packed mode: the boundary tokens of the flat sequence, with new cu_seqlens.
M depends on the data, so this layer evaluates the boundary mask (it never runs inside the
compiled decode step, which has no chunk layer).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def boundary_order(boundary_mask: mx.array) -> mx.array:
    """(B, L) -> (B, L) indices with each row's boundary positions first, in order."""
    L = boundary_mask.shape[1]
    key = mx.arange(L)[None] + (~boundary_mask).astype(mx.int32) * L
    # Indices carry no gradient (MLX would otherwise try to differentiate the gathers w.r.t. them).
    return mx.stop_gradient(mx.argsort(key, axis=1))


def boundary_positions(flat_mask: mx.array) -> mx.array:
    """(T,) bool -> int32 indices of the True entries (MLX has no boolean indexing)."""
    return mx.array(np.flatnonzero(np.array(flat_mask)).astype(np.int32))


class ChunkLayer(nn.Module):
    def __call__(self, h: mx.array, boundary_mask: mx.array, cu_seqlens: mx.array | None = None):
        """Returns (inner h, inner mask or None, inner cu_seqlens or None)."""
        if cu_seqlens is not None:
            flat = boundary_mask[0]
            counts = mx.cumsum(flat.astype(mx.int32), axis=0)
            inner_cu = mx.concatenate([mx.zeros((1,), dtype=mx.int32), counts[cu_seqlens[1:] - 1]])
            # Offsets carry no gradient (a VJP through gathers indexed by them would be refused).
            return mx.take(h, boundary_positions(flat), axis=1), None, mx.stop_gradient(inner_cu)
        counts = boundary_mask.sum(-1)
        M = int(counts.max().item())
        order = boundary_order(boundary_mask)[:, :M]
        inner = mx.take_along_axis(h, order[..., None], axis=1)
        inner_mask = mx.arange(M)[None] < counts[:, None]
        return inner, inner_mask, None

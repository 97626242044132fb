"""The chunk layer: keep the boundary positions (paper eq. 3, "downsampling").

Masked mode: each row's boundary tokens move to the front, in order (a stable sort on
index + L * [not boundary], as the official layer does); the inner sequence has
M = max boundaries per row, and rows with fewer are padded with their leftover non-boundary
tokens (official behaviour: outputs at valid positions never depend on them).
Packed mode: the boundary tokens of the flat sequence, with new cu_seqlens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def boundary_order(boundary_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L) indices with each row's boundary positions first, in order."""
    L = boundary_mask.shape[1]
    key = torch.arange(L, device=boundary_mask.device)[None] + (~boundary_mask).long() * L
    return torch.argsort(key, dim=1)


class ChunkLayer(nn.Module):
    def forward(self, h: torch.Tensor, boundary_mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """Returns (inner h, inner mask or None, inner cu_seqlens or None)."""
        if cu_seqlens is not None:
            flat = boundary_mask[0]
            counts = torch.cumsum(flat.long(), 0)
            inner_cu = F.pad(counts[cu_seqlens[1:].long() - 1], (1, 0)).to(cu_seqlens.dtype)
            return h[:, flat], None, inner_cu
        counts = boundary_mask.sum(-1)
        M = int(counts.max())
        order = boundary_order(boundary_mask)[:, :M]
        inner = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
        inner_mask = torch.arange(M, device=h.device)[None] < counts[:, None]
        return inner, inner_mask, None

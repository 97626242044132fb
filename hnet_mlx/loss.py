"""Training objectives: next-byte cross entropy and the ratio (load-balancing) loss (paper eq. 10).

    F = fraction of positions selected as boundaries,  G = mean boundary probability
    L_ratio = N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G))

It is minimised (value 1) when F = G = 1/N, i.e. one chunk per N tokens. Official
`load_balancing_loss` averages over every entry of the routing output, padding included; we
average over valid entries only (identical when there is no padding, as in packed training).
MLX has no boolean indexing, so "only these positions" is a 0/1 weight in a weighted mean.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .routing import RoutingOutput


def ratio_loss(routing: RoutingOutput, target_ratio: float) -> mx.array:
    N = float(target_ratio)
    b = routing.boundary_mask.astype(mx.float32)
    p = routing.boundary_prob.astype(mx.float32)
    if routing.valid is not None:
        v = routing.valid.astype(mx.float32)
        count = mx.maximum(v.sum(), 1.0)
        f, g = (b * v).sum() / count, (p * v).sum() / count
    else:
        f, g = b.mean(), p.mean()
    return N / (N - 1) * ((N - 1) * f * g + (1 - f) * (1 - g))


def next_byte_loss(logits: mx.array, input_ids: mx.array, mask: mx.array | None = None,
                   cu_seqlens: mx.array | None = None) -> mx.array:
    """Mean cross entropy of predicting byte t+1 from position t, never across sequences or into padding."""
    logits = logits.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits[:, :-1], input_ids[:, 1:], reduction="none")  # (B, L-1)
    if cu_seqlens is not None:
        T = input_ids.shape[1]
        ends = cu_seqlens[1:-1] - 1  # last position of each sequence but the final one
        keep = ~(mx.arange(T - 1)[:, None] == ends[None, :]).any(-1)[None]  # (1, T-1)
    elif mask is not None:
        keep = mask[:, 1:]
    else:
        return ce.mean()
    keep = keep.astype(mx.float32)
    return (ce * keep).sum() / keep.sum()


def hnet_loss(logits, input_ids, routing: list[RoutingOutput], target_ratios: list[float], alpha: float = 0.03,
              mask=None, cu_seqlens=None) -> tuple[mx.array, mx.array, list[mx.array]]:
    """(total, ce, [ratio loss per stage]) with total = CE + alpha * sum of ratio losses."""
    ce = next_byte_loss(logits, input_ids, mask=mask, cu_seqlens=cu_seqlens)
    ratios = [ratio_loss(r, n) for r, n in zip(routing, target_ratios)]
    total = ce + alpha * sum(ratios) if ratios else ce
    return total, ce, ratios

"""The training objective in a form that splits exactly across processes and micro-batches.

Mirror of hnet_torch/objective.py (read its docstring for the derivation). The loss of a global
batch is CE + alpha * sum_s L_ratio(F_s, G_s) over the whole batch; since F carries no gradient,
L_ratio = c(F) G + k(F), so each process sums a few detached counts over all processes first and
backpropagates

    W * ( ce_sum_local / targets_global + alpha * sum_s (c(F_global) p_sum_local / count_global + k / W) )

whose gradients averaged over the W processes are exactly the gradients of the global loss.
MLX has no boolean indexing, so "only these positions" is a 0/1 weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from hnet_core.train_loop import totals_metrics

from .routing import RoutingOutput


@dataclass
class LocalSums:
    ce_sum: mx.array  # () differentiable: summed next-byte CE over this process's targets
    p_sums: list[mx.array]  # per stage () differentiable: summed boundary probabilities
    counts: mx.array  # (2 + 3 S,) no gradient: [ce_sum, targets, then per stage: boundaries, p_sum, positions]


def next_byte_ce_sum(logits: mx.array, input_ids: mx.array, mask: mx.array | None = None,
                     cu_seqlens: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(summed CE, number of targets) of predicting byte t+1 at t, never across sequences or into padding."""
    ce = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), input_ids[:, 1:], reduction="none")  # (B, L-1)
    if cu_seqlens is not None:
        T = input_ids.shape[1]
        keep = mx.ones((T - 1,), dtype=mx.float32)
        ends = cu_seqlens[1:-1] - 1  # last byte of a sequence predicts nothing
        if ends.size:
            keep = keep.at[ends].multiply(0.0)
        keep = keep[None]
    elif mask is not None:
        keep = mask[:, 1:].astype(mx.float32)
    else:
        keep = mx.ones(ce.shape, dtype=mx.float32)
    return (ce * keep).sum(), keep.sum()


def routing_sums(r: RoutingOutput) -> tuple[mx.array, mx.array, mx.array]:
    """(boundaries, summed p (differentiable), positions) over the valid entries of one stage."""
    b, p = r.boundary_mask.astype(mx.float32), r.boundary_prob.astype(mx.float32)
    if r.valid is not None:
        v = r.valid.astype(mx.float32)
        return (b * v).sum(), (p * v).sum(), v.sum()
    return b.sum(), p.sum(), mx.array(float(p.size))


def local_sums(logits, input_ids, routing: list[RoutingOutput], mask=None, cu_seqlens=None) -> LocalSums:
    ce_sum, targets = next_byte_ce_sum(logits, input_ids, mask=mask, cu_seqlens=cu_seqlens)
    counts = [ce_sum, targets]
    p_sums = []
    for r in routing:
        b, p, n = routing_sums(r)
        p_sums.append(p)
        counts += [b, p, n]
    return LocalSums(ce_sum, p_sums, mx.stop_gradient(mx.stack([c.astype(mx.float32) for c in counts])))


def ratio_coefficients(f: mx.array, n: float) -> tuple[mx.array, mx.array]:
    """L_ratio = c G + k for fixed F (paper eq. 10 rearranged)."""
    scale = n / (n - 1)
    return scale * (n * f - 1), scale * (1 - f)


def split_loss(sums: LocalSums, totals: mx.array, target_ratios: list[float], alpha: float, world: int) -> mx.array:
    """The per-process loss to backpropagate (see module docstring)."""
    loss = sums.ce_sum / mx.maximum(totals[1], 1.0)
    for s, n in enumerate(target_ratios):
        b, count = totals[2 + 3 * s], mx.maximum(totals[4 + 3 * s], 1.0)
        c, k = ratio_coefficients(b / count, float(n))
        loss = loss + alpha * (c * sums.p_sums[s] / count + k / world)
    return loss * world


def objective(out, input_ids, target_ratios: list[float], alpha: float, mask=None, cu_seqlens=None,
              all_sum: Callable[[mx.array], mx.array] | None = None, world: int = 1) -> tuple[mx.array, mx.array]:
    """(loss to backpropagate, summed counts) for one (micro-)batch; `all_sum` sums over processes.

    `hnet_core.train_loop.totals_metrics(counts, ...)` turns the counts into loss/CE/rates."""
    sums = local_sums(out.logits, input_ids, out.routing, mask=mask, cu_seqlens=cu_seqlens)
    totals = mx.stop_gradient(all_sum(sums.counts)) if all_sum is not None else sums.counts
    return split_loss(sums, totals, target_ratios, alpha, world), totals


__all__ = ["LocalSums", "local_sums", "objective", "split_loss", "ratio_coefficients", "totals_metrics"]

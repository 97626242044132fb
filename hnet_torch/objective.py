"""The training objective in a form that splits exactly across processes and micro-batches.

The loss of a global batch is the official one computed over the whole batch (paper eq. 10-11):

    L = CE + alpha * sum_s L_ratio(F_s, G_s),   L_ratio = N/(N-1) * ((N-1) F G + (1-F)(1-G))

with CE the mean over every next-byte target, F_s the fraction of stage-s positions that are
boundaries and G_s their mean boundary probability. When the batch is split over W processes the
plain "average the per-process losses" recipe is not that loss: token counts differ between
processes and F*G is not linear. But F (hard decisions) carries no gradient, so L_ratio is
linear in G for fixed F: L_ratio = c(F) G + k(F) with c = N/(N-1) (N F - 1), k = N/(N-1) (1 - F).
Every process therefore sums a few detached counts across processes first (targets, boundaries,
positions per stage) and then backpropagates

    W * ( ce_sum_local / targets_global + alpha * sum_s (c(F_global) p_sum_local / count_global + k / W) )

whose gradients, averaged over the W processes (what DDP does), are exactly the gradients of L on
the global batch. With W = 1 this is `hnet_loss` on the batch (tests check both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hnet_core.train_loop import totals_metrics

from .routing import RoutingOutput


@dataclass
class LocalSums:
    ce_sum: torch.Tensor  # () differentiable: summed next-byte CE over this process's targets
    p_sums: list[torch.Tensor]  # per stage () differentiable: summed boundary probabilities
    counts: torch.Tensor  # (2 + 3 S,) detached: [ce_sum, targets, then per stage: boundaries, p_sum, positions]


def next_byte_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed CE, number of targets) of predicting byte t+1 at t, never across sequences or into padding."""
    logits = logits.float()
    if cu_seqlens is not None:
        keep = torch.ones(input_ids.shape[1] - 1, dtype=torch.bool, device=logits.device)
        keep[cu_seqlens[1:-1].long() - 1] = False  # last byte of a sequence predicts nothing
        pred, target = logits[0, :-1][keep], input_ids[0, 1:][keep]
    else:
        ok = mask[:, 1:] if mask is not None else torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
        pred, target = logits[:, :-1][ok], input_ids[:, 1:][ok]
    return F.cross_entropy(pred, target.long(), reduction="sum"), int(target.numel())


def routing_sums(r: RoutingOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boundaries, summed p (differentiable), positions) over the valid entries of one stage."""
    b, p = r.boundary_mask.float(), r.boundary_prob.float()
    if r.valid is not None:
        v = r.valid.float()
        return (b * v).sum(), (p * v).sum(), v.sum()
    return b.sum(), p.sum(), torch.tensor(float(p.numel()), device=p.device)


def local_sums(logits, input_ids, routing: list[RoutingOutput], mask=None, cu_seqlens=None) -> LocalSums:
    ce_sum, targets = next_byte_ce_sum(logits, input_ids, mask=mask, cu_seqlens=cu_seqlens)
    counts = [ce_sum.detach(), torch.tensor(float(targets), device=ce_sum.device)]
    p_sums = []
    for r in routing:
        b, p, n = routing_sums(r)
        p_sums.append(p)
        counts += [b.detach(), p.detach(), n.detach()]
    return LocalSums(ce_sum, p_sums, torch.stack([c.to(torch.float64) for c in counts]))


def ratio_coefficients(f: torch.Tensor, n: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ratio = c G + k for fixed F (paper eq. 10 rearranged)."""
    scale = n / (n - 1)
    return scale * (n * f - 1), scale * (1 - f)


def split_loss(sums: LocalSums, totals: torch.Tensor, target_ratios: list[float], alpha: float, world: int
               ) -> tuple[torch.Tensor, dict]:
    """The per-process loss to backpropagate (see module docstring) and the global metric values."""
    targets = totals[1].clamp(min=1)
    loss = sums.ce_sum / targets.float()
    for s, n in enumerate(target_ratios):
        b, count = totals[2 + 3 * s], totals[4 + 3 * s].clamp(min=1)
        c, k = ratio_coefficients(b / count, float(n))
        loss = loss + alpha * (c.float() * sums.p_sums[s] / count.float() + k.float() / world)
    return loss * world, totals_metrics(totals.detach().cpu().numpy(), target_ratios, alpha)


def objective(out, input_ids, target_ratios: list[float], alpha: float, mask=None, cu_seqlens=None,
              all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, world: int = 1) -> tuple[torch.Tensor, dict]:
    """Loss to backpropagate + metrics for one (micro-)batch; `all_sum` sums a tensor over processes."""
    sums = local_sums(out.logits, input_ids, out.routing, mask=mask, cu_seqlens=cu_seqlens)
    totals = all_sum(sums.counts) if all_sum is not None else sums.counts
    return split_loss(sums, totals, target_ratios, alpha, world)

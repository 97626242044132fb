"""Training objectives: next-byte cross entropy and the ratio (load-balancing) loss (paper eq. 10).

    F = fraction of positions selected as boundaries,  G = mean boundary probability
    L_ratio = N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G))

It is minimised (value 1) when F = G = 1/N, i.e. one chunk per N tokens. Official
`load_balancing_loss` averages over every entry of the routing output, padding included; we
average over valid entries only (identical when there is no padding, as in packed training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import RoutingOutput


def ratio_loss(routing: RoutingOutput, target_ratio: float) -> torch.Tensor:
    N = float(target_ratio)
    b = routing.boundary_mask.float()
    p = routing.boundary_prob.float()
    if routing.valid is not None:
        v = routing.valid.float()
        count = v.sum().clamp(min=1)
        f, g = (b * v).sum() / count, (p * v).sum() / count
    else:
        f, g = b.mean(), p.mean()
    return N / (N - 1) * ((N - 1) * f * g + (1 - f) * (1 - g))


def next_byte_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy of predicting byte t+1 from position t, never across sequences or into padding."""
    logits = logits.float()
    if cu_seqlens is not None:
        T = input_ids.shape[1]
        keep = torch.ones(T - 1, dtype=torch.bool, device=logits.device)
        ends = cu_seqlens[1:-1].long() - 1  # last position of each sequence but the final one
        keep[ends] = False
        return F.cross_entropy(logits[0, :-1][keep], input_ids[0, 1:][keep])
    target_ok = mask[:, 1:] if mask is not None else torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    return F.cross_entropy(logits[:, :-1][target_ok], input_ids[:, 1:][target_ok])


def hnet_loss(logits, input_ids, routing: list[RoutingOutput], target_ratios: list[float], alpha: float = 0.03,
              mask=None, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(total, ce, [ratio loss per stage]) with total = CE + alpha * sum of ratio losses."""
    ce = next_byte_loss(logits, input_ids, mask=mask, cu_seqlens=cu_seqlens)
    ratios = [ratio_loss(r, n) for r, n in zip(routing, target_ratios)]
    total = ce + alpha * sum(ratios) if ratios else ce
    return total, ce, ratios

"""RMSNorm with the pre-norm residual stream kept in fp32, and the gated RMSNorm of Mamba2.

Official blocks call a fused `RMSNorm(x, residual, prenorm=True, residual_in_fp32=True)`:
the residual sum is formed and kept in fp32, and the normalised output is cast back to the
activation dtype. `GatedRMSNorm` is Mamba2's `RMSNormGated(norm_before_gate=False)`: the gate
multiplies first, then the whole d_inner vector is normalised (ngroups = 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # residual_in_fp32=True: the running sum lives in fp32 whatever the activation dtype.
        residual = x.float() if residual is None else residual + x.float()
        out = rms_norm(residual, self.weight, self.eps).to(x.dtype)
        return (out, residual) if prenorm else out


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x * silu(z)) * weight (Mamba2 with norm_before_gate=False, one group)."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = x.float() * F.silu(z.float())
        return rms_norm(gated, self.weight, self.eps).to(x.dtype)

"""RMSNorm with the pre-norm residual stream kept in fp32, and the gated RMSNorm of Mamba2.

Official blocks call a fused `RMSNorm(x, residual, prenorm=True, residual_in_fp32=True)`:
the residual sum is formed and kept in fp32, and the normalised output is cast back to the
activation dtype. `GatedRMSNorm` is Mamba2's `RMSNormGated(norm_before_gate=False)`: the gate
multiplies first, then the whole d_inner vector is normalised (ngroups = 1).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """fp32 RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in fp32."""
    return mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((d,))

    def __call__(self, x: mx.array, residual: mx.array | None = None,
                 prenorm: bool = False) -> mx.array | tuple[mx.array, mx.array]:
        # residual_in_fp32=True: the running sum lives in fp32 whatever the activation dtype.
        residual = x.astype(mx.float32) if residual is None else residual + x.astype(mx.float32)
        out = rms_norm(residual, self.weight, self.eps).astype(x.dtype)
        return (out, residual) if prenorm else out


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x * silu(z)) * weight (Mamba2 with norm_before_gate=False, one group)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((d,))

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        gated = x.astype(mx.float32) * nn.silu(z.astype(mx.float32))
        return rms_norm(gated, self.weight, self.eps).astype(x.dtype)

"""Decode-step kernels: the Mamba2 state update and the conv1d step (inference only, no vjp)."""

from __future__ import annotations

import mlx.core as mx

from hnet_core.errors import HNetError

from .factory import KernelFactory, current_factory
from .sources import source

F32 = mx.float32


def ssm_step(state: mx.array, x: mx.array, dt: mx.array, dt_bias: mx.array, A: mx.array, B: mx.array, C: mx.array,
             D: mx.array, *, factory: KernelFactory | None = None) -> tuple[mx.array, mx.array]:
    """One Mamba2 decode step for all heads in one launch (kernel ssm_step.metal).

    state (b,h,p,n) fp32, x (b,h,p), dt (b,h) before softplus, dt_bias/A/D (h,), B/C (b,g,n)
    -> y (b,h,p) fp32, new_state (b,h,p,n) fp32. Same math as its pure twin (PurePaths.ssm_step)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if x.shape != (b, h, p) or dt.shape != (b, h) or B.shape != (b, g, n) or C.shape != (b, g, n):
        raise HNetError(f"ssm_step: inconsistent shapes state {state.shape}, x {x.shape}, dt {dt.shape}, "
                        f"B {B.shape}, C {C.shape}; expected x (b,h,p), dt (b,h), B/C (b,g,n)")
    if h % g:
        raise HNetError(f"ssm_step: {h} heads are not divisible into {g} groups")
    kernel = current_factory(factory).metal_kernel(
        "hnet_ssm_step", ["state", "x", "dt", "dt_bias", "A", "B", "C", "D"], ["y", "new_state"], source("ssm_step"))
    y, new_state = kernel(
        inputs=[state.astype(F32), x, dt, dt_bias, A, B, C, D],
        grid=(32, p, b * h), threadgroup=(32, min(p, 8), 1),
        output_shapes=[(b, h, p), (b, h, p, n)], output_dtypes=[F32, F32],
    )
    return y, new_state


def conv_step(conv_state: mx.array, x: mx.array, weight: mx.array, bias: mx.array, *,
              factory: KernelFactory | None = None) -> tuple[mx.array, mx.array]:
    """Shift x (b, c) into conv_state (b, c, k) and apply the depthwise conv + SiLU (conv_step.metal).

    -> out (b, c) in x's dtype, new_state (b, c, k) in conv_state's dtype; same math as
    its pure twin (PurePaths.conv_step)."""
    b, c, k = conv_state.shape
    if x.shape != (b, c) or weight.shape != (c, k) or bias.shape != (c,):
        raise HNetError(f"conv_step: inconsistent shapes conv_state {conv_state.shape}, x {x.shape}, "
                        f"weight {weight.shape}, bias {bias.shape}; expected x (b,c), weight (c,k), bias (c,)")
    kernel = current_factory(factory).metal_kernel(
        "hnet_conv_step", ["conv_state", "x", "weight", "bias"], ["out", "new_state"], source("conv_step"))
    out, new_state = kernel(
        inputs=[conv_state, x, weight, bias],
        template=[("OutT", x.dtype), ("StateT", conv_state.dtype)],
        grid=(c, b, 1), threadgroup=(min(c, 256), 1, 1),
        output_shapes=[(b, c), (b, c, k)], output_dtypes=[x.dtype, conv_state.dtype],
    )
    return out, new_state

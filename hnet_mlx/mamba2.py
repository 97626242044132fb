"""The Mamba2 mixer as H-Net uses it (mamba_ssm `Mamba2` with H-Net's ssm_cfg).

in_proj splits into [z | xBC | dt] = [d_inner | d_inner + 2 d_state | nheads]; xBC goes through a
depthwise causal conv + SiLU and splits into [x | B | C]; dt = softplus(dt + dt_bias);
A = -exp(A_log); the SSD scan adds the D skip; a gated RMSNorm (gate first) and out_proj finish.
H-Net's ssm_cfg never sets headdim or ngroups, so headdim = 64 and ngroups = 1 (mamba defaults).

MLX layout: conv1d.weight is (conv_dim, d_conv, 1) (mlx.nn.Conv1d's channels-last layout); the
official/torch (conv_dim, 1, d_conv) is converted in loading.py's `sanitize`, nowhere else.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from hnet_core.config import MAMBA_HEADDIM

from . import blas, kernels
from .cache import MambaState
from .norm import GatedRMSNorm
from .ssd import softplus


def commit(old: mx.array, new: mx.array, active: mx.array | None) -> mx.array:
    """The next per-sample state: `new`, except the old one where `active` is False."""
    if active is None:
        return new.astype(old.dtype)
    return mx.where(active.reshape(-1, *([1] * (old.ndim - 1))), new.astype(old.dtype), old)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, chunk_size: int = 256,
                 headdim: int = MAMBA_HEADDIM):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.chunk_size = d_model, d_state, d_conv, chunk_size
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * d_state
        self.use_kernels = kernels.default_mode()  # $HNET_METAL_KERNELS, else "auto"
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=True)
        # mamba_ssm init: dt log-uniform in [1e-3, 1e-1] (floor 1e-4), dt_bias = softplus^-1(dt); A ~ U[1, 16].
        dt = mx.exp(mx.random.uniform(shape=(self.nheads,)) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = mx.maximum(dt, 1e-4)
        self.dt_bias = dt + mx.log(-mx.expm1(-dt))
        self.A_log = mx.log(mx.random.uniform(1, 16, shape=(self.nheads,)))
        self.D = mx.ones((self.nheads,))
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def allocate_state(self, batch_size: int, dtype=None) -> MambaState:
        return MambaState(
            conv=mx.zeros((batch_size, self.conv_dim, self.d_conv), dtype=dtype or self.conv1d.weight.dtype),
            ssm=mx.zeros((batch_size, self.nheads, self.headdim, self.d_state), dtype=mx.float32),
        )

    def _split(self, zxbcdt: mx.array):
        return mx.split(zxbcdt, [self.d_inner, self.d_inner + self.conv_dim], axis=-1)

    def __call__(self, u: mx.array, mask: mx.array | None = None, seq_idx: mx.array | None = None,
                 state: MambaState | None = None, **_) -> mx.array:
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))  # (b, l, ·)
        weight = self.conv1d.weight[:, :, 0]  # (conv_dim, d_conv)
        if state is not None:
            # A live cache continues: the conv sees the last d_conv - 1 inputs before this piece
            # (zeros for a fresh cache, which is exactly the causal zero padding), and the scan
            # starts from the cached SSM state. Conv state = the last d_conv inputs of each sample.
            lengths = mask.sum(-1) if mask is not None else mx.full((b,), l)
            full = mx.concatenate([state.conv.swapaxes(1, 2).astype(xBC.dtype), xBC], axis=1)  # (b, d_conv + l, c)
            idx = lengths[:, None] + mx.arange(self.d_conv)  # (b, k)
            state.conv = mx.take_along_axis(full, idx[..., None], axis=1).swapaxes(1, 2).astype(state.conv.dtype)
            xBC = kernels.causal_conv1d_silu(full[:, 1:], weight, self.conv1d.bias, mode=self.use_kernels)
            xBC = xBC[:, self.d_conv - 1:]
        else:
            xBC = kernels.causal_conv1d_silu(xBC, weight, self.conv1d.bias, seq_idx=seq_idx, mode=self.use_kernels)
        x, B, C = mx.split(xBC, [self.d_inner, self.d_inner + self.d_state], axis=-1)
        dt = softplus(dt.astype(mx.float32) + self.dt_bias.astype(mx.float32))  # (b, l, h); dt_limit = (0, inf)
        if mask is not None:
            # Padding steps get dt = 0: the state passes through them unchanged, so the final state
            # is each sample's state after its last real byte. Valid outputs are unaffected (causal).
            dt = dt * mask[..., None]
        A = -mx.exp(self.A_log.astype(mx.float32))
        y, final_state = kernels.ssd_scan(
            x.reshape(b, l, self.nheads, self.headdim), dt, A, B[:, :, None], C[:, :, None], self.chunk_size,
            self.D, seq_idx=seq_idx, initial_state=None if state is None else state.ssm, mode=self.use_kernels,
        )
        if state is not None:
            state.ssm = final_state
        y = self.norm(y.reshape(b, l, self.d_inner).astype(u.dtype), z)
        return self.out_proj(y)

    def step(self, u: mx.array, state: MambaState, active: mx.array | None = None, **_) -> mx.array:
        b = u.shape[0]
        z, xBC, dt = self._split(blas.linear(self.in_proj, u[:, 0]))  # (b, ·); see blas.linear
        xBC, conv = kernels.conv_step(state.conv, xBC, self.conv1d.weight[:, :, 0], self.conv1d.bias,
                                      mode=self.use_kernels)
        x, B, C = mx.split(xBC, [self.d_inner, self.d_inner + self.d_state], axis=-1)
        A = -mx.exp(self.A_log.astype(mx.float32))
        y, ssm = kernels.ssm_step(
            state.ssm, x.reshape(b, self.nheads, self.headdim), dt, self.dt_bias, A, B[:, None], C[:, None], self.D,
            mode=self.use_kernels,
        )
        state.conv = commit(state.conv, conv, active)
        state.ssm = commit(state.ssm, ssm, active)
        y = self.norm(y.reshape(b, self.d_inner).astype(u.dtype), z)
        return blas.linear(self.out_proj, y)[:, None]

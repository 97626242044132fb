"""The Mamba2 mixer as H-Net uses it (mamba_ssm `Mamba2` with H-Net's ssm_cfg).

in_proj splits into [z | xBC | dt] = [d_inner | d_inner + 2 d_state | nheads]; xBC goes through a
depthwise causal conv + SiLU and splits into [x | B | C]; dt = softplus(dt + dt_bias);
A = -exp(A_log); the SSD scan adds the D skip; a gated RMSNorm (gate first) and out_proj finish.
H-Net's ssm_cfg never sets headdim or ngroups, so headdim = 64 and ngroups = 1 (mamba defaults).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hnet_core.config import MAMBA_HEADDIM

from . import kernels
from .cache import MambaState
from .norm import GatedRMSNorm


def commit(old: torch.Tensor, new: torch.Tensor, active: torch.Tensor | None) -> None:
    """Write a new per-sample state in place, keeping the old one where `active` is False."""
    if active is None:
        old.copy_(new)
    else:
        old.copy_(torch.where(active.view(-1, *([1] * (old.dim() - 1))), new.to(old.dtype), old))


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, chunk_size: int = 256,
                 headdim: int = MAMBA_HEADDIM, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.chunk_size = d_model, d_state, d_conv, chunk_size
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * d_state
        self.use_kernels = "auto"
        # Parameter registration order reproduces the official state-dict order.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=True, **factory)
        # mamba_ssm init: dt log-uniform in [1e-3, 1e-1] (floor 1e-4), dt_bias = softplus^-1(dt); A ~ U[1, 16].
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype or torch.float32))
        A = torch.empty(self.nheads, device=device).uniform_(1, 16)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.D = nn.Parameter(torch.ones(self.nheads, **factory))
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)

    def allocate_state(self, batch_size: int, dtype=None) -> MambaState:
        device = self.A_log.device  # (not in_proj's: an int8 in_proj has no weight tensor, quantize.py)
        return MambaState(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype or self.conv1d.weight.dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                state: MambaState | None = None, **_) -> torch.Tensor:
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))  # (b, l, ·)
        weight = self.conv1d.weight[:, 0]  # (conv_dim, d_conv)
        if state is not None:
            # A live cache continues: the conv sees the last d_conv - 1 inputs before this piece
            # (zeros for a fresh cache, which is exactly the causal zero padding), and the scan
            # starts from the cached SSM state. Conv state = the last d_conv inputs of each sample.
            lengths = mask.sum(-1) if mask is not None else torch.full((b,), l, device=u.device)
            full = torch.cat([state.conv.transpose(1, 2).to(xBC.dtype), xBC], dim=1)  # (b, d_conv + l, c)
            idx = lengths[:, None] + torch.arange(self.d_conv, device=u.device)  # (b, k)
            state.conv.copy_(full.gather(1, idx[..., None].expand(-1, -1, self.conv_dim)).transpose(1, 2))
            xBC = kernels.causal_conv1d_silu(full[:, 1:], weight, self.conv1d.bias, mode=self.use_kernels)
            xBC = xBC[:, self.d_conv - 1:]
        else:
            xBC = kernels.causal_conv1d_silu(xBC, weight, self.conv1d.bias, seq_idx=seq_idx, mode=self.use_kernels)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h); dt_limit = (0, inf): no clamp
        if mask is not None:
            # Padding steps get dt = 0: the state passes through them unchanged, so the final state
            # is each sample's state after its last real byte. Valid outputs are unaffected (causal).
            dt = dt * mask[..., None]
        A = -torch.exp(self.A_log.float())
        y, final_state = kernels.ssd_scan(
            x.reshape(b, l, self.nheads, self.headdim), dt, A, B[:, :, None], C[:, :, None], self.chunk_size,
            self.D, seq_idx=seq_idx, initial_state=None if state is None else state.ssm, mode=self.use_kernels,
        )
        if state is not None:
            state.ssm.copy_(final_state)
        y = self.norm(y.reshape(b, l, self.d_inner).to(u.dtype), z)
        return self.out_proj(y)

    def step(self, u: torch.Tensor, state: MambaState, active: torch.Tensor | None = None, **_) -> torch.Tensor:
        b = u.shape[0]
        z, xBC, dt = self._split(self.in_proj(u[:, 0]))  # (b, ·)
        xBC, conv = kernels.conv_step(state.conv, xBC, self.conv1d.weight[:, 0], self.conv1d.bias, mode=self.use_kernels)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y, ssm = kernels.ssm_step(
            state.ssm, x.reshape(b, self.nheads, self.headdim), dt, self.dt_bias, A, B[:, None], C[:, None], self.D,
            mode=self.use_kernels,
        )
        commit(state.conv, conv, active)
        commit(state.ssm, ssm, active)
        y = self.norm(y.reshape(b, self.d_inner).to(u.dtype), z)
        return self.out_proj(y)[:, None]

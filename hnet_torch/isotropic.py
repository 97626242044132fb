"""A flat stack of blocks at one hierarchy level, ending in an RMSNorm (official `Isotropic`).

Encoders, decoders and the innermost main network are all Isotropic stacks. The final norm adds
the last block output to the fp32 residual stream: out = rmsnorm(h + res).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hnet_core.config import HNetConfig

from .attention import CausalMHA
from .block import create_block
from .cache import IsotropicState, reserve
from .norm import RMSNorm


class Isotropic(nn.Module):
    def __init__(self, config: HNetConfig, level: int, letters: list[str], device=None, dtype=None):
        super().__init__()
        self.letters = letters
        self.layers = nn.ModuleList([create_block(c, config, level, device=device, dtype=dtype) for c in letters])
        self.rmsnorm = RMSNorm(config.d_model[level], eps=1e-5, device=device, dtype=dtype)

    @property
    def height(self) -> int:
        """Residual branches (mixers + MLPs), used by the official init to scale out_proj/fc2."""
        return sum(2 if c in "MT" else 1 for c in self.letters)

    def allocate_state(self, batch_size: int, max_seqlen: int | None, dtype=None) -> IsotropicState:
        layers = []
        for block in self.layers:
            m = block.mixer
            layers.append(m.allocate_state(batch_size, max_seqlen, dtype) if isinstance(m, CausalMHA)
                          else m.allocate_state(batch_size, dtype))
        device = self.rmsnorm.weight.device
        return IsotropicState(layers=layers, lengths=torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cu_seqlens=None, max_seqlen=None,
                state: IsotropicState | None = None) -> torch.Tensor:
        past = None
        if state is not None:
            # A live cache: attention continues at each sample's position (state.lengths); a fresh
            # one (nothing consumed yet) takes the plain path. Global KV caches grow to fit.
            past = state.lengths if state.max_length > 0 else None
            reserve(state, state.max_length + h.shape[1])
        residual = None
        for i, block in enumerate(self.layers):
            h, residual = block(h, residual, mask=mask, seq_idx=seq_idx, positions=positions, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, state=None if state is None else state.layers[i], past=past)
        if state is not None:
            state.lengths.add_(mask.sum(-1) if mask is not None else h.shape[1])
            state.max_length += h.shape[1]
        return self.rmsnorm(h, residual)

    def step(self, h: torch.Tensor, state: IsotropicState, active: torch.Tensor | None = None) -> torch.Tensor:
        residual = None
        for block, layer_state in zip(self.layers, state.layers):
            if isinstance(block.mixer, CausalMHA):
                h, residual = block.step(h, residual, state=layer_state, positions=state.lengths, active=active)
            else:
                h, residual = block.step(h, residual, state=layer_state, active=active)
        state.lengths.add_(1 if active is None else active.long())
        return self.rmsnorm(h, residual)

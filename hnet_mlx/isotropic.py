"""A flat stack of blocks at one hierarchy level, ending in an RMSNorm (official `Isotropic`).

Encoders, decoders and the innermost main network are all Isotropic stacks. The final norm adds
the last block output to the fp32 residual stream: out = rmsnorm(h + res).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hnet_core.config import HNetConfig

from .attention import CausalMHA
from .block import create_block
from .cache import IsotropicState, reserve
from .norm import RMSNorm


class Isotropic(nn.Module):
    def __init__(self, config: HNetConfig, level: int, letters: list[str]):
        super().__init__()
        self.letters = "".join(letters)  # a str, so MLX does not treat it as a parameter container
        self.layers = [create_block(c, config, level) for c in letters]
        self.rmsnorm = RMSNorm(config.d_model[level], eps=1e-5)

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
        return IsotropicState(layers=layers, lengths=mx.zeros((batch_size,), dtype=mx.int32))

    def __call__(self, h: mx.array, mask: mx.array | None = None, seq_idx: mx.array | None = None,
                 positions: mx.array | None = None, cu_seqlens=None, max_seqlen=None,
                 state: IsotropicState | None = None) -> mx.array:
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
            state.lengths = state.lengths + (mask.sum(-1).astype(mx.int32) if mask is not None else h.shape[1])
            state.max_length += h.shape[1]
        return self.rmsnorm(h, residual)

    def step(self, h: mx.array, state: IsotropicState, active: mx.array | None = None) -> mx.array:
        residual = None
        for block, layer_state in zip(self.layers, state.layers):
            if isinstance(block.mixer, CausalMHA):
                h, residual = block.step(h, residual, state=layer_state, positions=state.lengths, active=active)
            else:
                h, residual = block.step(h, residual, state=layer_state, active=active)
        state.lengths = state.lengths + (1 if active is None else active.astype(mx.int32))
        return self.rmsnorm(h, residual)

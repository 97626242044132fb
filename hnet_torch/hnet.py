"""One level of the hierarchy, recursively (official `HNet`).

An outer level runs  encoder -> routing -> chunk -> inner level -> dechunk -> (+ residual) -> decoder;
the innermost level is a plain Isotropic main network. An inner level wider than its parent
appends its learned `pad_dimension` on entry and returns the first D_parent channels.

The decoder input is  dechunk(...) * STE(selected_probs) + residual_proj(encoder output)  with the
residual in fp32 (paper eq. 7-9). STE's forward is exactly 1, so selected_probs only matters in
the backward pass, where it receives sum_d grad_d * out_d.

With a state, `forward` extends a live cache: every stack, the router and the dechunk EMA carry
on from where each sample stopped, and the inner level is extended with exactly the chunks the
new bytes opened (none at all when no sample has a boundary in the piece).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hnet_core.config import HNetConfig

from .cache import HNetState
from .chunk import ChunkLayer
from .dechunk import DeChunkLayer, packed_seq_idx
from .isotropic import Isotropic
from .routing import RoutingModule, RoutingOutput


class STE(torch.autograd.Function):
    """Forward: ones. Backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def packed_layout(cu_seqlens: torch.Tensor, total: int):
    """seq_idx (1, T), positions within each sequence (1, T), sequence starts (1, T) bool."""
    seq_idx = packed_seq_idx(cu_seqlens, total)
    positions = torch.arange(total, device=cu_seqlens.device)[None] - cu_seqlens[seq_idx].long()
    return seq_idx, positions, positions == 0


class HNet(nn.Module):
    def __init__(self, config: HNetConfig, level: int = 0, device=None, dtype=None):
        super().__init__()
        self.level = level
        self.d_model = config.d_model[level]
        layout = config.levels[level]
        self.is_innermost = layout.is_innermost
        if self.is_innermost:
            self.main_network = Isotropic(config, level, layout.main, device=device, dtype=dtype)
        else:
            self.encoder = Isotropic(config, level, layout.encoder, device=device, dtype=dtype)
            self.main_network = HNet(config, level + 1, device=device, dtype=dtype)
            self.decoder = Isotropic(config, level, layout.decoder, device=device, dtype=dtype)
            self.routing_module = RoutingModule(self.d_model, device=device, dtype=dtype)
            self.chunk_layer = ChunkLayer()
            self.dechunk_layer = DeChunkLayer(self.d_model)
            # The residual is always computed in fp32 (official: created with dtype=float32, zero-init).
            self.residual_proj = nn.Linear(self.d_model, self.d_model, device=device, dtype=torch.float32)
            nn.init.zeros_(self.residual_proj.weight)
        if level > 0 and self.d_model > config.d_model[level - 1]:
            self.pad_dimension = nn.Parameter(torch.zeros(self.d_model - config.d_model[level - 1], device=device, dtype=dtype))
        else:
            self.pad_dimension = None

    def allocate_state(self, batch_size: int, max_seqlen: int | None, dtype=None) -> HNetState:
        if self.is_innermost:
            return HNetState(main=self.main_network.allocate_state(batch_size, max_seqlen, dtype))
        return HNetState(
            encoder=self.encoder.allocate_state(batch_size, max_seqlen, dtype),
            routing=self.routing_module.allocate_state(batch_size, dtype),
            main=self.main_network.allocate_state(batch_size, max_seqlen, dtype),
            dechunk=self.dechunk_layer.allocate_state(batch_size, self.residual_proj.weight.device),
            decoder=self.decoder.allocate_state(batch_size, max_seqlen, dtype),
        )

    def _pad(self, h: torch.Tensor) -> torch.Tensor:
        if self.pad_dimension is None:
            return h
        return torch.cat([h, self.pad_dimension.to(h.dtype).expand(*h.shape[:-1], -1)], dim=-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                state: HNetState | None = None) -> tuple[torch.Tensor, list[RoutingOutput]]:
        """h (B, L, D_parent) with a right-padding mask, or (1, T, D_parent) packed with cu_seqlens."""
        d_parent = h.shape[-1]
        h = self._pad(h)
        kw: dict = {"mask": mask}
        seq_start = None
        if cu_seqlens is not None:
            seq_idx, positions, seq_start = packed_layout(cu_seqlens, h.shape[1])
            kw.update(seq_idx=seq_idx, positions=positions, cu_seqlens=cu_seqlens,
                      max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        if self.is_innermost:
            h = self.main_network(h, state=None if state is None else state.main, **kw)
            return h[..., :d_parent], []

        h = self.encoder(h, state=None if state is None else state.encoder, **kw)  # (B, L, D)
        residual = self.residual_proj(h.to(self.residual_proj.weight.dtype))
        routing = self.routing_module(h, mask=mask, seq_start=seq_start, state=None if state is None else state.routing)
        if cu_seqlens is not None:
            routing.cu_seqlens = cu_seqlens
        inner, inner_mask, inner_cu = self.chunk_layer(h, routing.boundary_mask, cu_seqlens)  # (B, M, D)
        if inner.shape[1] == 0:  # extending a cache by bytes that open no chunk: the inner level waits
            inner_routing = self._not_run(h.shape[0], h.device, length=0)
        else:
            inner, inner_routing = self.main_network(inner, mask=inner_mask, cu_seqlens=inner_cu,
                                                     state=None if state is None else state.main)
        h = self.dechunk_layer(inner, routing.boundary_mask, routing.boundary_prob, mask=mask,
                               inner_cu_seqlens=inner_cu, state=None if state is None else state.dechunk)
        h = (h.to(residual.dtype) * STE.apply(routing.selected_probs)[..., None] + residual).to(h.dtype)
        h = self.decoder(h, state=None if state is None else state.decoder, **kw)
        return h[..., :d_parent], [routing, *inner_routing]

    def step(self, h: torch.Tensor, state: HNetState, active: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, list[RoutingOutput]]:
        """One byte per sample, h (B, 1, D_parent). Samples with active=False keep their state."""
        d_parent = h.shape[-1]
        h = self._pad(h)
        if self.is_innermost:
            return self.main_network.step(h, state.main, active)[..., :d_parent], []

        h = self.encoder.step(h, state.encoder, active)
        residual = self.residual_proj(h.to(self.residual_proj.weight.dtype))
        routing = self.routing_module.step(h, state.routing, active)  # (B,)
        inner_active = routing.boundary_mask
        if bool(inner_active.any()):
            # Every sample goes through the inner network; only boundary samples keep the result.
            inner, inner_routing = self.main_network.step(h, state.main, inner_active)
        else:
            inner, inner_routing = torch.zeros_like(h), self._not_run(h.shape[0], h.device)
        h = self.dechunk_layer.step(inner, inner_active, routing.boundary_prob, state.dechunk, active)
        h = (h.to(residual.dtype) * STE.apply(routing.selected_probs)[:, None, None] + residual).to(h.dtype)
        h = self.decoder.step(h, state.decoder, active)
        return h[..., :d_parent], [routing, *inner_routing]

    def _not_run(self, batch: int, device, length: int | None = None) -> list[RoutingOutput]:
        """Routing outputs of inner stages that no sample reached: (batch,) for a step, or
        (batch, length) for a piece of bytes (length 0: a piece that opened no chunk)."""
        out, node = [], self.main_network
        shape = (batch,) if length is None else (batch, length)
        while not node.is_innermost:
            nan = torch.full(shape, float("nan"), device=device)
            no = torch.zeros(shape, dtype=torch.bool, device=device)
            out.append(RoutingOutput(nan, no, nan, valid=no))
            node = node.main_network
        return out

"""One level of the hierarchy, recursively (official `HNet`).

An outer level runs  encoder -> routing -> chunk -> inner level -> dechunk -> (+ residual) -> decoder;
the innermost level is a plain Isotropic main network. An inner level wider than its parent
appends its learned `pad_dimension` on entry and returns the first D_parent channels.

The decoder input is  dechunk(...) * STE(selected_probs) + residual_proj(encoder output)  with the
residual in fp32 (paper eq. 7-9). STE's forward is exactly 1, so selected_probs only matters in
the backward pass, where it receives sum_d grad_d * out_d.

With a state, `__call__` extends a live cache: every stack, the router and the dechunk EMA carry
on from where each sample stopped, and the inner level is extended with exactly the chunks the
new bytes opened (none at all when no sample has a boundary in the piece).

`step` has no data-dependent Python branch, so the whole decode step compiles into one function:
the inner level runs for every sample and only samples on a boundary keep its result
(`active`, applied with mx.where in every state update).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hnet_core.config import HNetConfig

from .cache import HNetState
from .chunk import ChunkLayer
from .dechunk import DeChunkLayer, packed_seq_idx
from .isotropic import Isotropic
from .routing import RoutingModule, RoutingOutput


@mx.custom_function
def _ste(x: mx.array) -> mx.array:
    return mx.ones_like(x)


@_ste.vjp
def _ste_vjp(primals, cotangent, output):
    return cotangent


class STE:
    """Forward: ones. Backward: the gradient passes straight through (same call as torch's `STE.apply`)."""

    apply = staticmethod(_ste)


def packed_layout(cu_seqlens: mx.array, total: int):
    """seq_idx (1, T), positions within each sequence (1, T), sequence starts (1, T) bool."""
    seq_idx = packed_seq_idx(cu_seqlens, total)
    positions = mx.arange(total)[None] - cu_seqlens[seq_idx]
    return seq_idx, positions, positions == 0


class HNet(nn.Module):
    def __init__(self, config: HNetConfig, level: int = 0):
        super().__init__()
        self.level = level
        self.d_model = config.d_model[level]
        layout = config.levels[level]
        self.is_innermost = layout.is_innermost
        if self.is_innermost:
            self.main_network = Isotropic(config, level, layout.main)
        else:
            self.encoder = Isotropic(config, level, layout.encoder)
            self.main_network = HNet(config, level + 1)
            self.decoder = Isotropic(config, level, layout.decoder)
            self.routing_module = RoutingModule(self.d_model)
            self.chunk_layer = ChunkLayer()
            self.dechunk_layer = DeChunkLayer(self.d_model)
            # The residual is always computed in fp32 (official: created with dtype=float32, zero-init).
            self.residual_proj = nn.Linear(self.d_model, self.d_model)
            self.residual_proj.weight = mx.zeros((self.d_model, self.d_model))
        if level > 0 and self.d_model > config.d_model[level - 1]:
            self.pad_dimension = mx.zeros((self.d_model - config.d_model[level - 1],))
        else:
            self.pad_dimension = None

    def allocate_state(self, batch_size: int, max_seqlen: int | None, dtype=None) -> HNetState:
        if self.is_innermost:
            return HNetState(main=self.main_network.allocate_state(batch_size, max_seqlen, dtype))
        return HNetState(
            encoder=self.encoder.allocate_state(batch_size, max_seqlen, dtype),
            routing=self.routing_module.allocate_state(batch_size, dtype),
            main=self.main_network.allocate_state(batch_size, max_seqlen, dtype),
            dechunk=self.dechunk_layer.allocate_state(batch_size),
            decoder=self.decoder.allocate_state(batch_size, max_seqlen, dtype),
        )

    def _pad(self, h: mx.array) -> mx.array:
        if self.pad_dimension is None:
            return h
        pad = mx.broadcast_to(self.pad_dimension.astype(h.dtype), (*h.shape[:-1], self.pad_dimension.shape[0]))
        return mx.concatenate([h, pad], axis=-1)

    def __call__(self, h: mx.array, mask: mx.array | None = None, cu_seqlens: mx.array | None = None,
                 state: HNetState | None = None) -> tuple[mx.array, list[RoutingOutput]]:
        """h (B, L, D_parent) with a right-padding mask, or (1, T, D_parent) packed with cu_seqlens."""
        d_parent = h.shape[-1]
        h = self._pad(h)
        kw: dict = {"mask": mask}
        seq_start = None
        if cu_seqlens is not None:
            seq_idx, positions, seq_start = packed_layout(cu_seqlens, h.shape[1])
            kw.update(seq_idx=seq_idx, positions=positions, cu_seqlens=cu_seqlens)
        if self.is_innermost:
            h = self.main_network(h, state=None if state is None else state.main, **kw)
            return h[..., :d_parent], []

        h = self.encoder(h, state=None if state is None else state.encoder, **kw)  # (B, L, D)
        residual = self.residual_proj(h.astype(self.residual_proj.weight.dtype))
        routing = self.routing_module(h, mask=mask, seq_start=seq_start, state=None if state is None else state.routing)
        if cu_seqlens is not None:
            routing.cu_seqlens = cu_seqlens
        inner, inner_mask, inner_cu = self.chunk_layer(h, routing.boundary_mask, cu_seqlens)  # (B, M, D)
        if inner.shape[1] == 0:  # extending a cache by bytes that open no chunk: the inner level waits
            inner_routing = self._not_run(h.shape[0], length=0)
        else:
            inner, inner_routing = self.main_network(inner, mask=inner_mask, cu_seqlens=inner_cu,
                                                     state=None if state is None else state.main)
        h = self.dechunk_layer(inner, routing.boundary_mask, routing.boundary_prob, mask=mask,
                               inner_cu_seqlens=inner_cu, state=None if state is None else state.dechunk)
        h = (h.astype(residual.dtype) * STE.apply(routing.selected_probs)[..., None] + residual).astype(h.dtype)
        h = self.decoder(h, state=None if state is None else state.decoder, **kw)
        return h[..., :d_parent], [routing, *inner_routing]

    def step(self, h: mx.array, state: HNetState, active: mx.array | None = None
             ) -> tuple[mx.array, list[RoutingOutput]]:
        """One byte per sample, h (B, 1, D_parent). Samples with active=False keep their state."""
        if self.is_innermost:
            return self.step_main(h, state, active), []
        h_enc, residual, routing = self.step_in(h, state, active)
        # Every sample goes through the inner network; only boundary samples keep the result
        # (torch skips the call when no sample is on a boundary; here that would need a sync).
        inner, inner_routing = self.main_network.step(h_enc, state.main, routing.boundary_mask)
        return self.step_out(inner, residual, routing, state, active, h.shape[-1]), [routing, *inner_routing]

    # The three pieces of `step`, also compiled one by one by HNetForCausalLM's "split" step mode,
    # which decides between them in Python whether any sample reached the inner level.

    def step_main(self, h: mx.array, state: HNetState, active: mx.array | None = None) -> mx.array:
        """Innermost level: the main network's step, (B, 1, D_parent) -> (B, 1, D_parent)."""
        d_parent = h.shape[-1]
        return self.main_network.step(self._pad(h), state.main, active)[..., :d_parent]

    def step_in(self, h: mx.array, state: HNetState, active: mx.array | None = None):
        """Outer level, up to routing: (encoder output (B, 1, D), fp32 residual, routing outputs (B,))."""
        h = self.encoder.step(self._pad(h), state.encoder, active)
        residual = self.residual_proj(h.astype(self.residual_proj.weight.dtype))
        routing = self.routing_module.step(h, state.routing, active)  # (B,)
        return h, residual, routing

    def step_out(self, inner: mx.array, residual: mx.array, routing: RoutingOutput, state: HNetState,
                 active: mx.array | None, d_parent: int) -> mx.array:
        """Outer level, after the inner network: dechunk (eq. 5-6), STE residual (eq. 7-9), decoder."""
        h = self.dechunk_layer.step(inner, routing.boundary_mask, routing.boundary_prob, state.dechunk, active)
        h = (h.astype(residual.dtype) * STE.apply(routing.selected_probs)[:, None, None] + residual).astype(h.dtype)
        h = self.decoder.step(h, state.decoder, active)
        return h[..., :d_parent]

    def _not_run(self, batch: int, length: int) -> list[RoutingOutput]:
        """Routing outputs (batch, length) of inner stages that a piece of bytes did not reach
        (length 0: a piece that opened no chunk)."""
        out, node = [], self.main_network
        while not node.is_innermost:
            nan = mx.full((batch, length), float("nan"))
            no = mx.zeros((batch, length), dtype=mx.bool_)
            out.append(RoutingOutput(nan, no, nan, valid=no))
            node = node.main_network
        return out

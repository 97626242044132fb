"""Inference state, as dataclasses that mirror the module tree (official `HNetState`).

`HNetForCausalLM.allocate_inference_cache(batch_size)` builds one `HNetState` per level; reading
these classes shows the whole cache. Unlike the official cache, every counter is per sample, so a
batch of prompts of different lengths decodes together and each sample's inner levels advance
only on that sample's boundaries. A live cache can be extended by any number of bytes
(`model(ids, mask=mask, cache=cache)` continues each sample where it ended) and grows as it goes:
global attention layers add KV_STEP slots at a time (mlx-lm's KVCache does the same), sliding-
window layers keep a ring of window + 1 slots. `prompt_cache.py` saves and loads these trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass
class MambaState:
    conv: torch.Tensor  # (B, conv_dim, d_conv): the last d_conv inputs of the depthwise conv
    ssm: torch.Tensor  # (B, nheads, headdim, d_state), fp32


@dataclass
class AttentionState:
    k: torch.Tensor  # (B, S, heads, head_dim), rotary already applied
    v: torch.Tensor  # (B, S, heads, head_dim)
    # Sliding-window layers keep a ring buffer of S = window + 1 slots (position t lives in slot
    # t % S); global layers keep position t in slot t, with S >= the positions seen (grown by
    # `reserve`, or max_seqlen slots when the cache was allocated with one).
    ring: bool


LayerState = Union[MambaState, AttentionState]


@dataclass
class IsotropicState:
    layers: list[LayerState]
    lengths: torch.Tensor  # (B,) int64: tokens this stack has consumed, per sample (= next position)
    # A bound on lengths.max() kept as a Python int (exact after a one-sample prefill), so the
    # caches can grow before a step without reading the device.
    max_length: int = 0


@dataclass
class RoutingState:
    has_seen_tokens: torch.Tensor  # (B,) bool
    last_hidden_state: torch.Tensor  # (B, D): encoder output of the previous byte (q side of eq. 4)


@dataclass
class DeChunkState:
    last_value: torch.Tensor  # (B, D) fp32: the EMA output z̄ of the last chunk


@dataclass
class HNetState:
    encoder: IsotropicState | None = None
    routing: RoutingState | None = None
    main: Union["HNetState", IsotropicState, None] = None
    dechunk: DeChunkState | None = None
    decoder: IsotropicState | None = None


@dataclass
class InferenceCache:
    """What `allocate_inference_cache` returns: the level tree plus bookkeeping for the LM."""

    backbone: HNetState
    max_seqlen: int | None  # None: grows without limit; else a limit on bytes per sample
    batch_size: int
    prefilled: bool = False
    lengths: torch.Tensor | None = None  # (B,) bytes consumed per sample
    # Longest sample so far, kept as a Python int so `step` can check max_seqlen without a device sync.
    max_length: int = 0
    config: dict | None = None  # the model config this cache belongs to (HNetConfig.to_dict())
    extra: dict = field(default_factory=dict)


KV_STEP = 256  # global attention caches grow by this many slots at a time (mlx-lm's KVCache.step)


def reserve(state: IsotropicState, needed: int) -> None:
    """Grow every global attention cache of a stack to hold `needed` positions per sample."""
    for layer in state.layers:
        if isinstance(layer, AttentionState) and not layer.ring and layer.k.shape[1] < needed:
            extra = -(-needed // KV_STEP) * KV_STEP - layer.k.shape[1]
            pad = layer.k.new_zeros(layer.k.shape[0], extra, *layer.k.shape[2:])
            layer.k = torch.cat([layer.k, pad], dim=1)
            layer.v = torch.cat([layer.v, pad], dim=1)


def isotropic_states(state: "HNetState | IsotropicState | None") -> list[IsotropicState]:
    """Every Isotropic stack's state in a level tree (encoders, main networks, decoders)."""
    if state is None:
        return []
    if isinstance(state, IsotropicState):
        return [state]
    return [*isotropic_states(state.encoder), *isotropic_states(state.main), *isotropic_states(state.decoder)]

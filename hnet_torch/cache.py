"""Inference state, as dataclasses that mirror the module tree (official `HNetState`).

`HNetForCausalLM.allocate_inference_cache(batch_size, max_seqlen)` builds one `HNetState` per
level; reading these classes shows the whole cache. Unlike the official cache, every counter is
per sample, so a batch of prompts of different lengths decodes together and each sample's inner
levels advance only on that sample's boundaries.
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
    # t % S); global layers keep S = max_seqlen slots.
    ring: bool


LayerState = Union[MambaState, AttentionState]


@dataclass
class IsotropicState:
    layers: list[LayerState]
    lengths: torch.Tensor  # (B,) int64: tokens this stack has consumed, per sample (= next position)


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
    max_seqlen: int
    batch_size: int
    prefilled: bool = False
    lengths: torch.Tensor | None = None  # (B,) bytes consumed per sample
    extra: dict = field(default_factory=dict)

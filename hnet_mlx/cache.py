"""Inference state, as dataclasses that mirror the module tree (official `HNetState`).

`HNetForCausalLM.allocate_inference_cache(batch_size)` builds one `HNetState` per level; reading
these classes shows the whole cache. Every counter is per sample, so a batch of prompts of
different lengths decodes together and each sample's inner levels advance only on that sample's
boundaries. A live cache can be extended by any number of bytes (`model(ids, mask=mask,
cache=cache)` continues each sample where it ended) and grows as it goes: global attention layers
add KV_STEP slots at a time (as mlx-lm's KVCache does), sliding-window layers keep a ring of
window + 1 slots. `prompt_cache.py` saves and loads these trees.

MLX arrays are immutable: layers *replace* the arrays in these dataclasses instead of writing
into them. `state_arrays` / `with_arrays` flatten a state tree to a list of arrays and rebuild
a copy around new arrays, so the whole decode step can be one `mx.compile`d function with the
cache passed in and out as plain arrays (see lm.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Union

import mlx.core as mx


@dataclass
class MambaState:
    conv: mx.array  # (B, conv_dim, d_conv): the last d_conv inputs of the depthwise conv
    ssm: mx.array  # (B, nheads, headdim, d_state), fp32


@dataclass
class AttentionState:
    k: mx.array  # (B, heads, S, head_dim), rotary already applied (MLX's SDPA layout)
    v: mx.array  # (B, heads, S, head_dim)
    # Sliding-window layers keep a ring buffer of S = window + 1 slots (position t lives in slot
    # t % S); global layers keep position t in slot t, with S >= the positions seen (grown by
    # `reserve`, or max_seqlen slots when the cache was allocated with one).
    ring: bool


LayerState = Union[MambaState, AttentionState]


@dataclass
class IsotropicState:
    layers: list[LayerState]
    lengths: mx.array  # (B,) int32: tokens this stack has consumed, per sample (= next position)
    # A bound on lengths.max() kept as a Python int (exact after a one-sample prefill), so the
    # caches can grow before a step without reading the device.
    max_length: int = 0


@dataclass
class RoutingState:
    has_seen_tokens: mx.array  # (B,) bool
    last_hidden_state: mx.array  # (B, D): encoder output of the previous byte (q side of eq. 4)


@dataclass
class DeChunkState:
    last_value: mx.array  # (B, D) fp32: the EMA output z̄ of the last chunk


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
    lengths: mx.array | None = None  # (B,) bytes consumed per sample
    # Longest sample so far, kept as a Python int so `step` can check max_seqlen without a device sync.
    max_length: int = 0
    config: dict | None = None  # the model config this cache belongs to (HNetConfig.to_dict())
    extra: dict = field(default_factory=dict)


KV_STEP = 256  # global attention caches grow by this many slots at a time (mlx-lm's KVCache.step)


def reserve(state: IsotropicState, needed: int) -> None:
    """Grow every global attention cache of a stack to hold `needed` positions per sample."""
    for layer in state.layers:
        if isinstance(layer, AttentionState) and not layer.ring and layer.k.shape[2] < needed:
            extra = -(-needed // KV_STEP) * KV_STEP - layer.k.shape[2]
            b, h, _, d = layer.k.shape
            pad = mx.zeros((b, h, extra, d), dtype=layer.k.dtype)
            layer.k = mx.concatenate([layer.k, pad], axis=2)
            layer.v = mx.concatenate([layer.v, pad], axis=2)


def isotropic_states(state: "HNetState | IsotropicState | None") -> list[IsotropicState]:
    """Every Isotropic stack's state in a level tree (encoders, main networks, decoders)."""
    if state is None:
        return []
    if isinstance(state, IsotropicState):
        return [state]
    return [*isotropic_states(state.encoder), *isotropic_states(state.main), *isotropic_states(state.decoder)]


# -- flattening, for the compiled decode step ------------------------------------------------


def state_arrays(state: Any) -> list[mx.array]:
    """Every array of a state tree, in a fixed order (dataclass fields in declaration order)."""
    out: list[mx.array] = []
    _collect(state, out)
    return out


@functools.cache
def _fields(cls: type) -> tuple[str, ...] | None:
    """Field names of a dataclass type (None for anything else), looked up once per type: the decode
    step flattens and rebuilds its state every byte, and dataclasses.fields() costs a few µs a call."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


def _collect(node: Any, out: list[mx.array]) -> None:
    if isinstance(node, mx.array):
        out.append(node)
    elif isinstance(node, list):
        for item in node:
            _collect(item, out)
    else:
        names = _fields(type(node))
        if names is not None:
            for name in names:
                _collect(getattr(node, name), out)


def with_arrays(state: Any, arrays: list[mx.array]) -> Any:
    """A structural copy of `state` holding `arrays` (in `state_arrays` order) instead of its own."""
    it = iter(arrays)
    new = _rebuild(state, it)
    rest = next(it, None)
    assert rest is None, "more arrays than the state holds"
    return new


def skeleton(state: Any) -> Any:
    """A copy of `state` with every array replaced by a 0-d placeholder: the structure (ring flags,
    nesting) a compiled step needs, without keeping the cache's memory alive."""
    placeholder = mx.array(0)
    return with_arrays(state, [placeholder] * len(state_arrays(state)))


def _rebuild(node: Any, it) -> Any:
    if isinstance(node, mx.array):
        return next(it)
    if isinstance(node, list):
        return [_rebuild(item, it) for item in node]
    names = _fields(type(node))
    if names is None:
        return node
    new = object.__new__(type(node))  # copy.copy, without its generic (and slow) protocol
    new.__dict__.update(node.__dict__)
    for name in names:
        setattr(new, name, _rebuild(getattr(node, name), it))
    return new

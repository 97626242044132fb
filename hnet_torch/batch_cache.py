"""Batch operations on inference caches, for serving many requests at once.

    cache = merge_caches([a, b, c])        # three caches (any batch sizes) -> one, rows in order
    cache = merge_caches([cache, d])       # a running batch takes on new rows (mlx-lm's `extend`)
    cache = filter_cache(cache, [0, 2])    # keep rows 0 and 2 (finished requests leave)
    one = extract_cache(cache, 1)          # row 1 alone, e.g. to keep as a prompt cache

Every counter of a cache is per sample (cache.py), so rows of different lengths share a batch
without touching each other: merging only concatenates along the batch axis. The one thing rows
share is the slot count of a global attention cache (position t in slot t), so the shorter ones
are padded with zeros, which no row ever reads (its attention only sees slots < its length).
Filtering gives back the slots nobody needs any more. Results are new caches; inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from hnet_core.errors import HNetError

from .cache import KV_STEP, AttentionState, InferenceCache, IsotropicState, isotropic_states


def merge_caches(caches: Sequence[InferenceCache]) -> InferenceCache:
    """One cache holding the rows of `caches` in order (each may hold any number of rows)."""
    if not caches:
        raise HNetError("merge_caches needs at least one cache")
    first = caches[0]
    for c in caches[1:]:
        if c.config != first.config:
            raise HNetError("cannot merge caches of different models")
        if c.max_seqlen != first.max_seqlen:
            raise HNetError(f"cannot merge caches of different max_seqlen ({first.max_seqlen} and {c.max_seqlen})")
    backbone = _merge([c.backbone for c in caches])
    return InferenceCache(backbone, first.max_seqlen, sum(c.batch_size for c in caches),
                          prefilled=all(c.prefilled for c in caches),
                          lengths=torch.cat([c.lengths for c in caches]),
                          max_length=max(c.max_length for c in caches),
                          config=first.config, extra={})


def filter_cache(cache: InferenceCache, rows: Sequence[int]) -> InferenceCache:
    """A cache of the given rows only (in the order given); growing attention caches shrink to fit."""
    rows = [int(r) for r in rows]
    if not rows or any(r < 0 or r >= cache.batch_size for r in rows):
        raise HNetError(f"rows must be a non-empty list of indices below {cache.batch_size}, got {rows}")
    index = torch.tensor(rows, dtype=torch.long, device=cache.lengths.device)
    out = InferenceCache(_select(cache.backbone, index), cache.max_seqlen, len(rows), prefilled=cache.prefilled,
                         lengths=cache.lengths[index], max_length=int(cache.lengths[index].max()),
                         config=cache.config, extra={})
    if cache.max_seqlen is None:
        for stack in isotropic_states(out.backbone):
            _shrink(stack)
    return out


def extract_cache(cache: InferenceCache, row: int) -> InferenceCache:
    """Row `row` as a cache of batch size 1."""
    return filter_cache(cache, [row])


def _merge(nodes: list[Any]) -> Any:
    node = nodes[0]
    if isinstance(node, torch.Tensor):
        return torch.cat(nodes, dim=0)
    if isinstance(node, AttentionState) and not node.ring:
        slots = max(n.k.shape[1] for n in nodes)
        return AttentionState(torch.cat([_pad_slots(n.k, slots) for n in nodes]),
                              torch.cat([_pad_slots(n.v, slots) for n in nodes]), ring=False)
    if isinstance(node, IsotropicState):
        return IsotropicState(_merge([n.layers for n in nodes]), torch.cat([n.lengths for n in nodes]),
                              max(n.max_length for n in nodes))
    if dataclasses.is_dataclass(node):
        return type(node)(**{f.name: _merge([getattr(n, f.name) for n in nodes]) for f in dataclasses.fields(node)})
    if isinstance(node, list):
        return [_merge([n[i] for n in nodes]) for i in range(len(node))]
    return node  # None, or a flag every row shares (ring)


def _select(node: Any, index: torch.Tensor) -> Any:
    if isinstance(node, torch.Tensor):
        return node.index_select(0, index)
    if dataclasses.is_dataclass(node):
        return type(node)(**{f.name: _select(getattr(node, f.name), index) for f in dataclasses.fields(node)})
    if isinstance(node, list):
        return [_select(item, index) for item in node]
    return node


def _pad_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    if x.shape[1] == slots:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], slots - x.shape[1], *x.shape[2:])], dim=1)


def _shrink(stack: IsotropicState) -> None:
    """Trim global attention caches to the KV_STEP multiple that holds the longest remaining row."""
    stack.max_length = int(stack.lengths.max())
    keep = -(-stack.max_length // KV_STEP) * KV_STEP
    for layer in stack.layers:
        if isinstance(layer, AttentionState) and not layer.ring and layer.k.shape[1] > keep:
            layer.k, layer.v = layer.k[:, :keep].contiguous(), layer.v[:, :keep].contiguous()

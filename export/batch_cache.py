"""Batch operations on the live states of an OnnxHNet, for serving many requests at once
(the numpy mirror of hnet_torch/batch_cache.py).

    a = model.get_state()                  # after model.prefill(...) / extend / step
    model.set_state(merge_caches([a, b]))  # one batch holding the rows of a, then those of b
    model.set_state(filter_cache(model.get_state(), [0, 2]))
    one = extract_cache(state, 1)

Every state tensor has the batch on axis 0 and every counter (`level{s}.length`) is per sample,
so rows of different lengths share a batch without touching each other. Rows only share the slot
count of a global attention buffer (position t in slot t, axis 1): shorter rows are padded with
zeros, which no row ever reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hnet_core.errors import HNetError


@dataclass
class OnnxState:
    states: dict[str, np.ndarray]  # io.json state name (without past./present.) -> host array, batch first
    position: int  # bytes consumed by the longest row (level 0)
    batch: int


def _growable(name: str, arrays: list[np.ndarray]) -> bool:
    """A global KV buffer: its slot axis may differ between rows' states (a ring's never does)."""
    return (name.endswith(".k") or name.endswith(".v")) and len({a.shape[1] for a in arrays}) > 1


def merge_caches(states: Sequence[OnnxState]) -> OnnxState:
    """One state holding the rows of `states` in order."""
    if not states:
        raise HNetError("merge_caches needs at least one state")
    names = list(states[0].states)
    if any(list(s.states) != names for s in states):
        raise HNetError("cannot merge states of different models")
    merged = {}
    for name in names:
        arrays = [s.states[name] for s in states]
        if _growable(name, arrays):
            slots = max(a.shape[1] for a in arrays)
            arrays = [np.concatenate([a, np.zeros((a.shape[0], slots - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)
                      for a in arrays]
        merged[name] = np.concatenate(arrays, axis=0)
    return OnnxState(merged, max(s.position for s in states), sum(s.batch for s in states))


def filter_cache(state: OnnxState, rows: Sequence[int]) -> OnnxState:
    """A state of the given rows only, in the order given."""
    rows = [int(r) for r in rows]
    if not rows or any(r < 0 or r >= state.batch for r in rows):
        raise HNetError(f"rows must be a non-empty list of indices below {state.batch}, got {rows}")
    index = np.asarray(rows)
    kept = {name: a[index] for name, a in state.states.items()}
    return OnnxState(kept, int(kept["level0.length"].max()), len(rows))


def extract_cache(state: OnnxState, row: int) -> OnnxState:
    """Row `row` as a state of batch size 1."""
    return filter_cache(state, [row])

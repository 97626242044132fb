"""How many CPU threads a decode step uses, decided once per model from its weight shapes.

A decode step multiplies one row per sample by each weight matrix. For a small matrix the work
is a few microseconds, and splitting it across OpenMP / MKL threads costs more than it saves: each
parallel region waits at a barrier for every thread, and on a machine where another process keeps
a core busy that wait is a scheduler time slice (milliseconds). Measured on a 2-core machine with
one core busy, the bundled 5M model: 15 B/s with 2 threads, 177 B/s with 1 (issue 24). Only
matrices large enough to be memory-bound for more than ~a millisecond gain from a second thread.

`step_threads(model)` runs the step with one thread unless the model's largest matrix reaches
PARALLEL_MIN_ELEMENTS; prefill (many rows per matrix) keeps torch's own setting. HNET_STEP_THREADS=N
overrides the choice (0 = torch's current setting).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn as nn

ENV = "HNET_STEP_THREADS"
# 4M fp32 elements = 16 MB: ~1 ms to stream at ~20 GB/s, long enough that a late thread costs
# a fraction of the call rather than many times it. The bundled model's largest is 256 x 704.
PARALLEL_MIN_ELEMENTS = 4 * 1024 * 1024


def step_thread_count(model: nn.Module) -> int:
    """Threads for one decode step of `model`: 1 for small matrices, else torch's current count.
    The shape decision is made on first use and kept on the model (`_step_parallel`)."""
    forced = os.environ.get(ENV, "").strip()
    if forced.isdigit():
        return int(forced) or torch.get_num_threads()
    parallel = model.__dict__.get("_step_parallel")
    if parallel is None:
        largest = max((p.numel() for p in model.parameters() if p.dim() >= 2), default=0)
        parallel = largest >= PARALLEL_MIN_ELEMENTS
        model.__dict__["_step_parallel"] = parallel
    return torch.get_num_threads() if parallel else 1


@contextlib.contextmanager
def step_threads(model: nn.Module) -> Iterator[None]:
    """Run the body with the model's step thread count, then restore the process-wide setting."""
    wanted, before = step_thread_count(model), torch.get_num_threads()
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)

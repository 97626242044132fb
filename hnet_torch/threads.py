"""The decode step's CPU threads (policy and measurements in hnet_core/step_threads.py).

`step_threads(model)` runs one step with one thread unless the model's matrices are large enough
for more; prefill (many rows per matrix) keeps torch's own setting. HNET_STEP_THREADS=N forces N.

torch-only by design: torch owns its intra-op thread pool, so torch needs this switch. MLX runs its
matmuls through OpenBLAS, whose thread count `hnet_mlx/blas.py` (`set_threads`) sets under the same
policy, so hnet_mlx has no threads.py twin.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn as nn

from hnet_core.step_threads import ENV, steps_in_parallel


def step_thread_count(model: nn.Module) -> int:
    """Threads for one decode step of `model` (which has a `config`): 1, or torch's current count."""
    forced = os.environ.get(ENV, "").strip()
    if forced.isdigit():
        return int(forced) or torch.get_num_threads()
    parallel = model.__dict__.get("_step_parallel")
    if parallel is None:  # decided once per model, from its shapes
        parallel = steps_in_parallel(model.config)
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

"""The two measurements every inference benchmark here makes, written once for every backend
(torch, MLX, onnxruntime): the best of several prefills, and teacher-forced decode steps timed
after a warm-up. Backends differ only in the callables they pass."""

from __future__ import annotations

import time
from typing import Any, Callable

WARMUP_STEPS = 4  # untimed decode steps first: lazy initialisation, compiled-step tracing


def best_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the fastest of `repeats` calls of `run` in seconds, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    return best, out


def timed_decode(prefill: Callable[[Any], Any], step: Callable[[Any], Any], ids, prompt_bytes: int, steps: int,
                 warmup: int = WARMUP_STEPS) -> tuple[float, list]:
    """Prefill ids[:, :prompt_bytes], take `warmup` untimed steps on the next columns, then `steps`
    timed ones (teacher-forced: column t is fed at step t); (seconds of the timed steps, their
    outputs). `step` must bring its result to the host (or otherwise finish it) for the time to count."""
    prefill(ids[:, :prompt_bytes])
    for t in range(prompt_bytes, prompt_bytes + warmup):
        step(ids[:, t : t + 1])
    start = prompt_bytes + warmup
    t0 = time.perf_counter()
    outs = [step(ids[:, t : t + 1]) for t in range(start, start + steps)]
    return time.perf_counter() - t0, outs

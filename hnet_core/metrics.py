"""The JSONL metrics log of a training run (`OUT/metrics.jsonl`), one JSON object per line.

    {"kind": "train", "step": 10, "loss": 2.9, "ce": 2.8, "bpb": 4.04, "ratio_loss": [1.02],
     "boundary_rate": [0.18], "compression": [5.6], "lr": 0.001, "grad_norm": 0.8,
     "bytes_per_second": 5123.0, "elapsed": 12.5}
    {"kind": "eval", "step": 250, "loss": 2.1, "bpb": 3.03, "compression": [5.9], "bytes": 65536}

`step` counts completed optimizer steps. `compression[s]` is tokens entering stage s per chunk it
emits (1 / boundary_rate[s]), the quantity the ratio loss pulls toward its target N_s. On resume,
lines past the checkpoint's step are dropped so the curve has no duplicated steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .io import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLog:
    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = os.fspath(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they belong to a run that was cut off after its checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics log; a torn last line (the process died mid-write) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out

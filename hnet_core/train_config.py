"""One training configuration for both trainers (`hnet train` in PyTorch, `hnet-mlx train` in MLX).

The model config (official JSON) says what the network is; this says how to train it. It is
saved as `train_config.json` in the output directory and read back on `--resume`, so a resumed
run continues with exactly the settings it started with.

Objective (paper eq. 10-11): next-byte CE + alpha * sum over stages of the ratio loss with
target compression N_s per stage (official alpha 0.03; N = [6] for one stage, [3, 3] for two).
Schedule: linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * lr, or WSD
(warmup-stable-decay: constant, then a linear decay over the last decay_fraction of the steps).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from .errors import HNetError
from .io import read_json, write_json

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global: samples per optimizer step, across processes
    seq_len: int = 512
    packing: str = "packed"  # packed windows (cu_seqlens) or padded documents (mask)
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio; WSD decays to it
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step (each of batch_size / grad_accum samples)
    alpha: float = 0.03  # ratio-loss weight (official)
    target_ratios: list[float] | None = None  # per stage, outermost first; default [6] / [3, 3] / ...
    lr_multipliers: list[float] | None = None  # per level, outermost first; default all 1
    save_every: int = 500
    eval_every: int = 250
    eval_bytes: int = 65536  # validation bytes scored at each eval
    log_every: int = 10
    keep_last: int = 3
    val_fraction: float = 0.01
    val_max_bytes: int = 1 << 20
    seed: int = 0
    dtype: str = "float32"  # bfloat16 = mixed precision (autocast on CUDA, bf16 compute in MLX)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "eval_every", "log_every", "keep_last")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise HNetError(f"training setting {name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise HNetError(f"training setting seq_len must be at least 2, got {self.seq_len}")
        if self.warmup < 0:
            raise HNetError(f"training setting warmup must be >= 0, got {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HNetError(f"training setting lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise HNetError(f"training setting schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise HNetError(f"training setting dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.packing not in ("packed", "padded"):
            raise HNetError(f"training setting packing must be packed or padded, got {self.packing!r}")
        if self.batch_size % self.grad_accum:
            raise HNetError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise HNetError("min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.alpha < 0:
            raise HNetError("weight_decay, grad_clip and alpha must be >= 0")
        if self.target_ratios is not None and any(not r > 1 for r in self.target_ratios):
            raise HNetError(f"target ratios must each be > 1 (bytes per chunk), got {self.target_ratios}")
        if self.lr_multipliers is not None and any(not m > 0 for m in self.lr_multipliers):
            raise HNetError(f"lr multipliers must be positive, got {self.lr_multipliers}")

    # -- per-model defaults ----------------------------------------------------------------

    def ratios_for(self, num_stages: int) -> list[float]:
        """Per-stage targets N, checked against the model; default [6] for one stage, 3 per stage else."""
        ratios = self.target_ratios
        if ratios is None:
            ratios = [6.0] if num_stages == 1 else [3.0] * num_stages
        if len(ratios) != num_stages:
            raise HNetError(f"--target-ratios needs one value per routing stage ({num_stages}), got {list(ratios)}")
        return [float(r) for r in ratios]

    def multipliers_for(self, num_levels: int) -> list[float]:
        mult = self.lr_multipliers if self.lr_multipliers is not None else [1.0] * num_levels
        if len(mult) != num_levels:
            raise HNetError(f"--lr-multipliers needs one value per level ({num_levels}, outermost first), got {list(mult)}")
        return [float(m) for m in mult]

    # -- schedule --------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            span = max(self.steps - self.warmup, 1)
            t = min(max(step - self.warmup, 0) / span, 1.0)
            return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
        decay_steps = max(int(round(self.steps * self.decay_fraction)), 1)
        decay_start = max(self.steps - decay_steps, self.warmup)
        if step < decay_start:
            return self.lr
        t = min((step - decay_start + 1) / max(self.steps - decay_start, 1), 1.0)
        return self.lr + (floor - self.lr) * t

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise HNetError("a training config must be a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise HNetError(f"bad training config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(read_json(path, "training config not found: {path}",
                                       "training config {path} is not valid JSON ({error})"))

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict(), indent=2)

    def replace(self, **changes) -> "TrainConfig":
        data = self.to_dict()
        data.update(changes)
        return TrainConfig.from_dict(data)

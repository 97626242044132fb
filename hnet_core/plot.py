"""`hnet plot RUN_DIR`: training curves as a PNG (loss, bits per byte, per-stage compression).

    hnet plot runs/a                 # writes runs/a/curves.png
    hnet plot runs/a --out a.png --smooth 20

Reads `metrics.jsonl` (hnet_core/metrics.py). Three panels: train and validation loss; train and
validation bits per byte; per-stage compression (tokens per chunk) with the targets of the run's
train_config.json dashed. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os

import click
import numpy as np

from . import checkpoint as ckpt
from . import io
from .errors import HNetError
from .metrics import read_metrics


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _series(records: list[dict], key: str, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if index is not None:
            v = v[index] if isinstance(v, list) and len(v) > index else None
        if isinstance(v, (int, float)):
            steps.append(r["step"])
            values.append(float(v))
    return np.asarray(steps), np.asarray(values)


def plot_run(run_dir: str, out: str | None = None, smooth: int = 1) -> str:
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, ckpt.METRICS_NAME)
    if not os.path.exists(path):
        raise HNetError(f"no metrics log at {path}; pass a training --out directory (or its metrics.jsonl)")
    io.check_output_path(out or os.path.join(os.path.dirname(path), "curves.png"), "plot")  # before drawing
    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise HNetError(f"{path} holds no training records yet")
    targets = None
    cfg_path = os.path.join(os.path.dirname(path), ckpt.TRAIN_CONFIG_NAME)
    stages = max((len(r.get("compression") or []) for r in records), default=0)
    if os.path.exists(cfg_path) and stages:
        from .train_config import TrainConfig

        with open(cfg_path, encoding="utf-8") as f:
            targets = TrainConfig(target_ratios=json.load(f).get("target_ratios")).ratios_for(stages)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    smoothed = f" (smoothed {smooth})" if smooth > 1 else ""
    panels = ((axes[0], "loss", "loss (nats)", "train CE + alpha * ratio", "validation CE"),
              (axes[1], "bpb", "bits per byte", "train", "validation"))
    for ax, key, label, train_label, val_label in panels:
        s, v = _series(train, key)
        if len(s):
            ax.plot(s, _smooth(v, smooth), label=train_label + smoothed, lw=1.2)
        s, v = _series(evals, key)
        if len(s):
            ax.plot(s, v, "o-", label=val_label, ms=3)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for st in range(stages):
        color = colors[st % len(colors)]
        s, v = _series(train, "compression", st)
        if len(s):
            ax.plot(s, _smooth(v, smooth), color=color, lw=1.2, label=f"stage {st} (train)")
        s, v = _series(evals, "compression", st)
        if len(s):
            ax.plot(s, v, "o", color=color, ms=3, label=f"stage {st} (validation)")
        if targets and st < len(targets):
            ax.axhline(targets[st], color=color, ls="--", lw=0.8, label=f"stage {st} target {targets[st]:g}")
    ax.set_xlabel("step")
    ax.set_title("compression (tokens per chunk)")
    ax.grid(alpha=0.3)
    if stages:
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(os.path.dirname(path))))
    fig.tight_layout()
    out = out or os.path.join(os.path.dirname(path), "curves.png")
    try:
        with io.atomic_file(out, what="plot") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out


@click.command("plot")
@click.argument("run_dir")
@click.option("--out", default=None, help="PNG path (default RUN_DIR/curves.png).")
@click.option("--smooth", type=int, default=1, show_default=True, help="Moving-average window for train curves.")
def plot_command(run_dir: str, out: str | None, smooth: int) -> None:
    """Draw loss, bits per byte and per-stage compression curves of a training run to a PNG."""
    click.echo(plot_run(run_dir, out, smooth))

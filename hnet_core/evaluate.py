"""`hnet eval`: bits per byte of a model on a file, with any backend (torch, mlx, onnx).

    hnet eval --backend torch --model runs/a/model --data held_out.txt --json
    hnet-mlx eval --model runs/a/model --data held_out.txt --max-bytes 100000

Every document of --data (a text file, .xz/.gz, JSONL or a directory, as the trainers read it)
becomes BOS + its bytes, and every byte after BOS is scored exactly once: windows of `window`
bytes advance by `stride`, and each window scores only the bytes the previous one did not, so
every byte (after the first window) is predicted from at least window - stride bytes of context.
Windows never cross documents. bits per byte = total next-byte cross entropy / ln 2 / bytes.

Per-stage compression is measured on the same windows: tokens entering stage s per chunk it
emits (outermost first); `bytes_per_chunk` is their running product (bytes per stage-s chunk).
Backends run masked batches of windows through their own forward (make_forward in hnet_torch,
hnet_mlx and hnet_export's evaluate.py, registered in backends.py); scoring is numpy, shared.
Without --model the bundled demo model is scored; a training run directory stands for its final
model (else its newest checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .data import read_documents
from .errors import HNetError
from .tokenizer import BOS_ID

LN2 = math.log(2.0)
# forward(ids (B, L) int32, mask (B, L) bool) -> (logits (B, L, V) float, [(boundary_mask (B, L_s), valid (B, L_s))])
Forward = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]


@dataclass
class Window:
    doc: int
    start: int  # first token of the window in the document's token list (BOS = 0)
    end: int  # one past the last token
    score_from: int  # first target position scored by this window (>= start + 1)


@dataclass
class EvalReport:
    bits_per_byte: float
    bytes: int
    compression_ratios: list[float]
    bytes_per_chunk: list[float]
    bytes_per_second: float
    nats: float
    seconds: float
    window: int
    stride: int
    windows: int
    documents: int
    backend: str = ""
    model: str = ""
    data: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def plan_windows(lengths: list[int], window: int, stride: int) -> list[Window]:
    """Windows over documents of `lengths` tokens (BOS included) that score each target once."""
    if window < 2:
        raise HNetError(f"--window must be at least 2, got {window}")
    if not 1 <= stride <= window - 1:
        raise HNetError(f"--stride must be between 1 and window - 1 ({window - 1}), got {stride}")
    out = []
    for d, n in enumerate(lengths):
        scored, start = 1, 0
        while scored < n:
            end = min(start + window, n)
            out.append(Window(d, start, end, scored))
            scored = end
            start += stride  # start + window > scored always, so every window scores new bytes
    return out


def load_documents(path: str, max_bytes: int | None = None) -> list[np.ndarray]:
    """BOS + bytes per document, at most max_bytes text bytes in total."""
    docs, total = [], 0
    for doc in read_documents(path, purpose="evaluation"):
        if max_bytes is not None:
            doc = doc[: max(max_bytes - total, 0)]
        if not doc:
            break
        docs.append(np.concatenate([[BOS_ID], np.frombuffer(doc, dtype=np.uint8)]).astype(np.int32))
        total += len(doc)
    if not docs:
        raise HNetError(f"nothing to evaluate in {path} (--max-bytes {max_bytes})")
    return docs


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for rows of logits (N, V), in float64."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(-1))
    return lse - x[np.arange(len(targets)), targets]


def evaluate(forward: Forward, path: str, window: int = 1024, stride: int | None = None, batch_size: int = 4,
             max_bytes: int | None = None, progress: Callable[[int, int], None] | None = None) -> EvalReport:
    docs = load_documents(path, max_bytes)
    stride = stride if stride is not None else max(window // 2, 1)
    plan = plan_windows([len(d) for d in docs], window, stride)
    nats, scored = 0.0, 0
    stage_tokens: list[float] = []
    stage_chunks: list[float] = []
    t0 = time.perf_counter()
    for first in range(0, len(plan), batch_size):
        group = plan[first:first + batch_size]
        L = max(w.end - w.start for w in group)
        ids = np.zeros((len(group), L), dtype=np.int32)
        mask = np.zeros((len(group), L), dtype=bool)
        for row, w in enumerate(group):
            ids[row, : w.end - w.start] = docs[w.doc][w.start:w.end]
            mask[row, : w.end - w.start] = True
        logits, routing = forward(ids, mask)
        for row, w in enumerate(group):
            pos = np.arange(w.score_from, w.end) - w.start  # target positions within the row
            nll = log_softmax_nll(np.asarray(logits[row, pos - 1]), ids[row, pos])
            nats += float(nll.sum())
            scored += len(pos)
        if not stage_tokens:
            stage_tokens, stage_chunks = [0.0] * len(routing), [0.0] * len(routing)
        for s, (boundary, valid) in enumerate(routing):
            v = np.asarray(valid, dtype=bool)
            stage_tokens[s] += float(v.sum())
            stage_chunks[s] += float((np.asarray(boundary, dtype=bool) & v).sum())
        if progress is not None:
            progress(min(first + batch_size, len(plan)), len(plan))
    seconds = time.perf_counter() - t0
    ratios = [t / c if c else float("inf") for t, c in zip(stage_tokens, stage_chunks)]
    return EvalReport(bits_per_byte=nats / LN2 / max(scored, 1), bytes=scored, compression_ratios=ratios,
                      bytes_per_chunk=list(np.cumprod(ratios)) if ratios else [], bytes_per_second=scored / seconds,
                      nats=nats, seconds=seconds, window=window, stride=stride, windows=len(plan), documents=len(docs))


def make_forward(backend: str, model_path: str, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None) -> Forward:
    """The named backend's forward (hnet_torch / hnet_mlx / hnet_export evaluate.make_forward, through
    the registry in backends.py, so this module names no framework)."""
    from .backends import eval_forward

    if not os.path.exists(model_path):
        raise HNetError(f"model not found: {model_path}")
    return eval_forward(backend, model_path, device, dtype, quantize)


def run_eval(backend: str, model_path: str, data: str, max_bytes: int | None, window: int, stride: int | None,
             batch_size: int, as_json: bool, device: str | None = None, dtype: str | None = None,
             quantize: str | None = None) -> EvalReport:
    import click

    if max_bytes is not None and max_bytes < 1:
        raise HNetError(f"--max-bytes must be positive, got {max_bytes}")
    if batch_size < 1:
        raise HNetError(f"--batch-size must be positive, got {batch_size}")
    if model_path is None:
        if backend == "onnx":
            raise HNetError("--backend onnx needs --model: a directory written by `hnet export onnx`")
        from .backends import DEMO_MODEL

        model_path = DEMO_MODEL
    forward = make_forward(backend, model_path, device, dtype, quantize)
    report = evaluate(forward, data, window=window, stride=stride, batch_size=batch_size, max_bytes=max_bytes)
    report.backend, report.model, report.data = backend, model_path, data
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{os.path.basename(os.path.normpath(model_path))} on {os.path.basename(data)} ({backend})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("bits per byte", f"{report.bits_per_byte:.4f}")
        table.add_row("bytes scored", f"{report.bytes:,}")
        for s, (r, b) in enumerate(zip(report.compression_ratios, report.bytes_per_chunk)):
            table.add_row(f"stage {s} compression", f"{r:.2f} tokens/chunk ({b:.2f} bytes/chunk)")
        table.add_row("throughput", f"{report.bytes_per_second:,.0f} bytes/s")
        table.add_row("window / stride", f"{report.window} / {report.stride}")
        Console().print(table)
    return report


def eval_options(func):
    import click

    options = [
        click.option("--model", "model_path", default=None,
                     help="Model directory or a training run directory (an export directory for --backend onnx). "
                          "Default: the bundled demo model."),
        click.option("--data", required=True, help="Text to score: a file (.xz/.gz ok), JSONL or a directory."),
        click.option("--max-bytes", type=int, default=None, help="Score only the first N bytes."),
        click.option("--window", type=int, default=1024, show_default=True, help="Bytes per window."),
        click.option("--stride", type=int, default=None, help="Window step (default window/2)."),
        click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward pass."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Cast the weights (default: float32 in torch, as stored in mlx; onnx: fixed at export)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


try:
    import click
except ImportError:  # pragma: no cover
    click = None

if click is not None:

    @click.command("eval")
    @click.option("--backend", type=click.Choice(["torch", "mlx", "onnx"]), default="torch", show_default=True,
                  help="Which implementation runs the model.")
    @eval_options
    @click.option("--device", default=None, help="torch device or onnx provider.")
    @click.option("--quantize", type=click.Choice(["int8"]), default=None,
                  help="torch on the CPU: int8 Linear weights, as `hnet generate --quantize int8`.")
    def eval_command(backend, model_path, data, max_bytes, window, stride, batch_size, as_json, dtype, device, quantize):
        """Bits per byte of a model on a text, per-stage compression and throughput."""
        run_eval(backend, model_path, data, max_bytes, window, stride, batch_size, as_json, device, dtype, quantize)

"""The training loop both trainers share: schedule, logging, evaluation, checkpoints, resume, Ctrl-C.

A trainer (hnet_torch/train.py, hnet_mlx/train.py) supplies a `TrainerBackend` that knows its
framework: one optimizer step over a list of micro-batches, validation sums, collective sums
across processes, and saving/loading its state. Everything else (which batch comes next, the
learning rate, when to log/evaluate/save, what goes in a checkpoint, how a run resumes, what
happens on NaN or Ctrl-C) lives here once, so both frameworks behave the same.

Exact resume: a checkpoint taken after step s holds the weights, optimizer moments, RNG states
and the data position after step s, and the schedule is a function of the step number, so steps
s+1.. of a resumed run see the same batches and learning rates as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import checkpoint as ckpt
from . import io
from .data import Batch, BatchSampler, eval_batches, load_tokens, split_validation
from .errors import HNetError
from .metrics import MetricsLog
from .train_config import TrainConfig

LN2 = math.log(2.0)
# Settings that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = ("steps", "save_every", "eval_every", "log_every", "keep_last", "eval_bytes")


@dataclass
class StepStats:
    """One optimizer step, summed over every process and micro-batch."""

    loss: float
    ce: float
    ratio_losses: list[float]
    boundary_rates: list[float]
    grad_norm: float
    num_bytes: int
    applied: bool = True  # False when the update was skipped because loss/grads were not finite


@dataclass
class EvalResult:
    loss: float
    bits_per_byte: float
    compression: list[float]
    num_bytes: int


class TrainerBackend(Protocol):
    name: str
    rank: int
    world: int
    num_stages: int

    def train_step(self, batches: list[Batch], lr: float) -> StepStats: ...

    def eval_sums(self, batch: Batch) -> np.ndarray:
        """`eval_vector` of one validation batch."""

    def all_sum(self, values: np.ndarray) -> np.ndarray: ...

    def save(self, directory: str | None) -> dict:
        """Collective. Writes model + optimizer into `directory` (on rank 0, where it is not None);
        returns the backend's part of trainer_state.json (RNG states...)."""

    def load(self, directory: str, state: dict) -> None: ...

    def save_model(self, directory: str | None) -> str | None:
        """Collective; rank 0 writes a plain model directory. Returns None, or the end of the closing
        line where the backend wrote something else (LoRA runs write only their adapters)."""


@dataclass
class RunPlan:
    out: str
    config: TrainConfig
    start_step: int = 0
    resume_from: str | None = None
    resume_state: dict = field(default_factory=dict)
    restart_data: bool = False  # resume weights/optimizer/schedule but start the data order afresh


def plan_run(out: str, config: TrainConfig, resume: str | None, explicit: dict,
             restart_data: bool = False) -> RunPlan:
    """Decide fresh start vs resume and settle the configuration.

    `explicit` holds the settings given on the command line; when resuming, those must agree with
    the saved run except the ones in RESUMABLE_CHANGES. `restart_data` (with a resume) keeps the
    weights, optimizer and schedule but starts the data order at its beginning: the saved position
    only means something for the same bytes, so this is how a run continues on changed data.
    """
    if restart_data and resume is None:
        raise HNetError("--restart-data only applies with --resume (a fresh run starts its data order anyway)")
    io.check_output_path(out, "run directory")  # before any work: a file in the way, no permission
    cfg_path = os.path.join(out, ckpt.TRAIN_CONFIG_NAME)
    if resume is None:
        ckpt.clean_run_directory(out)
        if ckpt.list_checkpoints(out):
            raise HNetError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
        return RunPlan(out, config)
    ckpt.clean_run_directory(out)
    path = ckpt.resolve_resume(out, resume)
    saved = TrainConfig.from_json(cfg_path) if os.path.exists(cfg_path) else config
    saved_dict = saved.to_dict()
    changes = {}
    for key, value in explicit.items():
        if key not in saved_dict or saved_dict[key] == value:
            continue
        if key not in RESUMABLE_CHANGES:
            raise HNetError(f"cannot resume with --{key.replace('_', '-')} {value}: the run was started with "
                            f"{saved_dict[key]}; drop the flag (only {', '.join(RESUMABLE_CHANGES)} may change)")
        changes[key] = value
    if path is None:
        print(f"no checkpoint in {out} yet (it was stopped before its first save): starting again from step 0",
              file=sys.stderr, flush=True)
        return RunPlan(out, saved.replace(**changes) if changes else saved)
    state = ckpt.read_state(path)
    return RunPlan(out, saved.replace(**changes) if changes else saved, int(state["step"]), path, state, restart_data)


def load_data(path: str, config: TrainConfig):
    """(train sampler, validation TokenData) for a run."""
    data = load_tokens(path)
    min_train = config.seq_len if config.packing == "packed" else 1
    train, val = split_validation(data, config.val_fraction, config.val_max_bytes, min_train=min_train)
    sampler = BatchSampler(train, config.seq_len, config.batch_size, config.seed, config.packing)
    return sampler, val


def next_micro_batches(sampler: BatchSampler, config: TrainConfig, rank: int, world: int) -> list[Batch]:
    """This process's micro-batches of the next global batch (batch_size / (world * grad_accum) samples each)."""
    share = config.batch_size // (world * config.grad_accum)
    if share < 1 or config.batch_size % (world * config.grad_accum):
        raise HNetError(f"--batch-size {config.batch_size} must be a multiple of processes x grad-accum "
                        f"({world} x {config.grad_accum})")
    samples = sampler.next_samples()
    out = []
    for micro in range(config.grad_accum):
        first = (micro * world + rank) * share
        out.append(sampler.make_batch(samples[first:first + share]))
    return out


def totals_metrics(totals: np.ndarray, target_ratios: list[float], alpha: float) -> dict:
    """Global loss values from the objective's summed count vector
    [ce_sum, targets, then per stage: boundaries, p_sum, positions] (both frameworks' objective.py)."""
    totals = np.asarray(totals, dtype=np.float64)
    ce = float(totals[0] / max(totals[1], 1.0))
    ratio_values, rates = [], []
    for s, n in enumerate(target_ratios):
        b, p, count = totals[2 + 3 * s], totals[3 + 3 * s], max(totals[4 + 3 * s], 1.0)
        f, g = b / count, p / count
        ratio_values.append(float(n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))))
        rates.append(float(f))
    return {"ce": ce, "ratio_losses": ratio_values, "boundary_rates": rates, "loss": ce + alpha * sum(ratio_values)}


def eval_vector_length(num_stages: int) -> int:
    """Entries of `eval_vector`: CE and targets, then the token count of every level (none without chunking)."""
    return 2 + (num_stages + 1 if num_stages else 0)


def eval_vector(counts: np.ndarray, num_stages: int) -> np.ndarray:
    """[CE nats, targets, positions entering stage 0..S-1, tokens of the innermost level] from the
    objective's count vector [ce_sum, targets, then per stage: boundaries, p_sum, positions]."""
    positions = [counts[4 + 3 * s] for s in range(num_stages)]
    inner = [counts[2 + 3 * (num_stages - 1)]] if num_stages else []
    return np.asarray([counts[0], counts[1], *positions, *inner], dtype=np.float64)


def evaluate(backend: TrainerBackend, batches: list[Batch]) -> EvalResult | None:
    """Validation loss, bits per byte and per-stage compression, summed over all processes.

    Batches are dealt round-robin; where the count does not divide evenly and every process must
    take part in each forward (FSDP), the spare processes score a batch with weight 0."""
    if not batches:
        return None
    local = np.zeros(eval_vector_length(backend.num_stages))
    for first in range(0, len(batches), backend.world):
        j = first + backend.rank
        if j < len(batches):
            local += backend.eval_sums(batches[j])
        elif getattr(backend, "collective_forward", False):
            backend.eval_sums(batches[0])
    sums = backend.all_sum(np.asarray(local, dtype=np.float64))
    nats, targets, tokens = float(sums[0]), float(sums[1]), sums[2:]
    loss = nats / max(targets, 1.0)
    compression = [float(tokens[s] / tokens[s + 1]) if tokens[s + 1] else float("inf") for s in range(backend.num_stages)]
    return EvalResult(loss, loss / LN2, compression, int(sum(b.num_bytes for b in batches)))


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop saves after the current step and exits. It stays in
    force until the final checkpoint and model are written, so a signal during those writes only
    lets them finish.

    A second Ctrl-C or SIGTERM interrupts at once; the write under way removes its temporary and
    the last complete checkpoint stays intact."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _Display:
    """A rich progress bar with a live metrics line under it on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, console=None):
        self.enabled = enabled
        self.live = None
        self.info = ""
        if not enabled:
            return
        from rich.console import Console

        self.console = console or Console(stderr=True)
        if self.console.is_terminal:
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.text import Text

            self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start)
            display = self

            class Info:
                def __rich__(self):
                    return Text(display.info, style="cyan")

            self.live = Live(Group(self.progress, Info()), console=self.console, refresh_per_second=4)
            self.live.start()

    def update(self, step: int, info: str | None, line: str | None) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.progress.update(self.task, completed=step)
            if info is not None:
                self.info = info
        elif line:
            self.console.print(line, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _fmt_list(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in values)


def run(backend: TrainerBackend, plan: RunPlan, sampler: BatchSampler, val, console=None,
        show_progress: bool = True, stop_at: int | None = None, time_limit: float | None = None) -> str:
    """Train from plan.start_step to plan.config.steps; returns the final model directory.

    `stop_at` (a step) and `time_limit` (seconds) end this session early like Ctrl-C does: a
    checkpoint is saved and `--resume` continues the same schedule (for time-limited machines)."""
    cfg, out = plan.config, plan.out
    is_main = backend.rank == 0
    if is_main:
        io.make_dirs(out, "run directory")
        cfg.to_json(os.path.join(out, ckpt.TRAIN_CONFIG_NAME))
    log = MetricsLog(os.path.join(out, ckpt.METRICS_NAME), enabled=is_main)
    step = plan.start_step
    if plan.resume_from is not None:
        backend.load(plan.resume_from, plan.resume_state)
        if not plan.restart_data:
            sampler.load_state_dict(plan.resume_state["data"])
    log.truncate_after(step)  # records of a session cut off after its last checkpoint (or before its first)
    val_batches = eval_batches(val, cfg.seq_len, max(cfg.batch_size // backend.world, 1), cfg.eval_bytes, cfg.packing)
    last_saved = plan.resume_from

    def save(at: int) -> str | None:
        nonlocal last_saved
        backend_state_holder: dict = {}

        def fill(tmp: str) -> dict:
            backend_state_holder.update(backend.save(tmp))
            return {"step": at, "data": sampler.state_dict(), "backend": backend.name, "world_size": backend.world,
                    "train_config": cfg.to_dict(), **backend_state_holder}

        if is_main:
            last_saved = ckpt.write_checkpoint(out, at, fill, cfg.keep_last)
        else:
            backend.save(None)
        return last_saved

    backend_targets = cfg.ratios_for(backend.num_stages)
    display = _Display(cfg.steps, step, show_progress and is_main, console)
    if plan.resume_from is not None:
        display.note(f"resumed from {plan.resume_from} at step {step}")
    window_bytes, window_start = 0, time.perf_counter()
    t0 = time.perf_counter()
    try:
        with _StopRequest() as stop:
            while step < cfg.steps:
                lr = cfg.lr_at(step)
                batches = next_micro_batches(sampler, cfg, backend.rank, backend.world)
                stats = backend.train_step(batches, lr)
                if not (stats.applied and math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
                    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
                    raise HNetError(f"training stopped at step {step + 1}: loss {stats.loss} / grad norm {stats.grad_norm} "
                                    f"is not finite; {where} (resume from it with a lower --lr)")
                step += 1
                window_bytes += stats.num_bytes
                record = None
                if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
                    now = time.perf_counter()
                    rates = [float(r) for r in stats.boundary_rates]
                    record = {"kind": "train", "step": step, "loss": stats.loss, "ce": stats.ce, "bpb": stats.ce / LN2,
                              "ratio_loss": stats.ratio_losses, "boundary_rate": rates,
                              "compression": [1.0 / r if r > 0 else float("inf") for r in rates], "lr": lr,
                              "grad_norm": stats.grad_norm, "bytes_per_second": window_bytes / max(now - window_start, 1e-9),
                              "elapsed": now - t0}
                    log.write(record)
                    window_bytes, window_start = 0, now
                info = line = None
                if record is not None:
                    info = (f"loss {record['loss']:.3f} | bpb {record['bpb']:.3f} | boundary rate "
                            f"{_fmt_list(rates, '{:.3f}')} | compression {_fmt_list(record['compression'])} "
                            f"(target {_fmt_list(backend_targets, '{:g}')}) | {record['bytes_per_second']:,.0f} B/s "
                            f"| lr {lr:.2e} | grad norm {stats.grad_norm:.2f}")
                    line = f"step {step}/{cfg.steps} {info}"
                paused = time.perf_counter()  # evaluation and saving do not count against bytes/s
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    result = evaluate(backend, val_batches)
                    if result is not None:
                        log.write({"kind": "eval", "step": step, "loss": result.loss, "bpb": result.bits_per_byte,
                                   "compression": result.compression, "bytes": result.num_bytes})
                        display.note(f"eval step {step}: val loss {result.loss:.4f} bpb {result.bits_per_byte:.4f} "
                                     f"compression {_fmt_list(result.compression)}")
                saved_now = step % cfg.save_every == 0 and step != cfg.steps
                if saved_now:
                    save(step)
                window_start += time.perf_counter() - paused
                display.update(step, info, line)
                early = (stop_at is not None and step >= stop_at) or (
                    time_limit is not None and time.perf_counter() - t0 >= time_limit)
                if _any_rank(backend, stop.requested or early):
                    path = last_saved if saved_now else save(step)
                    display.close()
                    why = "interrupted" if stop.requested else "stopped early"
                    display.note(f"{why}: saved {path} at step {step}; continue with --resume")
                    return path or ""
            save(step)
            final = os.path.join(out, ckpt.FINAL_MODEL)
            written = backend.save_model(final if is_main else None)
    finally:
        display.close()
    display.note(f"done: {step} steps; " + (written or f"final model in {final}"))
    return final


def _any_rank(backend: TrainerBackend, flag: bool) -> bool:
    if backend.world == 1:
        return flag
    return bool(backend.all_sum(np.asarray([1.0 if flag else 0.0]))[0] > 0)

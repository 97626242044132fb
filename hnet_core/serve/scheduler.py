"""Continuous batching, framework-free: requests join one running batch and leave it when done.

One thread owns the model. Each turn of its loop it
  1. drops requests that were cancelled (client gone, timed out, shutdown) and admits waiting ones
     while the batch has room (`max_batch` counts running and prefilling requests);
  2. reads the next `prefill_step_size` bytes of the oldest admitted prompt into that request's own
     cache; when its prompt is read, samples its first byte and merges the cache into the batch;
  3. takes one decode step for the whole batch and samples every row with the row's own sampler.
A long prompt thus costs the running requests one piece per step, never the whole prompt. Rows of
different lengths never affect each other (the backends' batch caches are per sample), so a
greedy request gets the bytes it would get alone.

The backend is any object with prefill(cache, piece) -> (cache, logits (V,)), merge(caches),
filter(cache, rows) and step(cache, next_bytes (B,)) -> (cache, logits (B, V)): batching.py over
hnet_core.engine's Adapter for torch and MLX, export/serving.py for ONNX. `hnet serve` builds it
and runs the loop (`run`) in the main thread, with the HTTP server in another: MLX aborts the
process at exit when a thread other than the main one ran a model. `start` runs the loop in a thread of its own instead. Results go to
each request's `emit` callback (from the loop's thread): ("text", str) pieces, then
("done", finish_reason, prompt_bytes, generated_bytes) or ("error", http_status, message).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..engine import DEFAULT_PREFILL_STEP
from ..sampling import Sampler, SamplingParams
from ..streaming import TextStream
from ..tokenizer import BOS_ID

Event = tuple


class QueueFull(Exception):
    """More requests wait than --max-queue allows (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


@dataclass
class GenerationRequest:
    prompt: bytes  # without BOS (the scheduler adds it)
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    timeout: float | None = None  # seconds from submission


class Job:
    """A request as the scheduler runs it."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None]):
        self.request, self.emit = request, emit
        self.ids = np.array([BOS_ID, *request.prompt], dtype=np.int64)
        self.fed = 0  # prompt bytes read into the cache
        self.cache: Any = None
        self.sampler = Sampler(request.sampling)
        self.stream = TextStream(request.stop)
        self.history = list(request.prompt)
        self.generated = 0
        self.next_byte = 0
        self.deadline = None if request.timeout is None else time.monotonic() + request.timeout
        self.cancelled = False  # set from other threads; read by the scheduler

    def cancel(self) -> None:
        self.cancelled = True

    def take(self, logits: np.ndarray) -> str | None:
        """Sample, emit the new text; the finish reason once the request is done, else None."""
        byte = int(self.sampler(logits[None], [self.history])[0])
        self.history.append(byte)
        self.generated += 1
        text = self.stream.feed(byte)
        reason = "stop" if self.stream.done else ("length" if self.generated >= self.request.max_tokens else None)
        if reason == "length":
            text += self.stream.finish()
        if text:
            self.emit(("text", text))
        self.next_byte = byte
        return reason


class Scheduler:
    def __init__(self, backend: Any, max_batch: int = 8, max_queue: int = 64, prefill_step_size: int = DEFAULT_PREFILL_STEP):
        self.backend = backend
        self.max_batch, self.max_queue, self.prefill_step_size = max_batch, max_queue, prefill_step_size
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []  # admitted, prompt not fully read; the first one is read now
        self.rows: list[Job] = []  # the running batch, in cache row order
        self.batch: Any = None
        self.accepting = True
        self.steps = 0  # decode steps taken (for tests and logs)
        self.max_rows_seen = 0
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- called from the server's threads ---------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a thread of its own (until `close`)."""
        self._thread = threading.Thread(target=self.run, name="hnet-serve-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Job:
        with self._wake:
            if not self.accepting:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            job = Job(request, emit)
            self.waiting.append(job)
            self._wake.notify()
        return job

    def load(self) -> dict:
        """What the scheduler holds now (for /health and the tests)."""
        with self._wake:
            return {"running": len(self.rows), "prefilling": len(self.prefilling), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                    "max_running_seen": self.max_rows_seen}

    def stop_accepting(self) -> None:
        with self._wake:
            self.accepting = False

    def close(self, grace: float) -> None:
        """Let running requests finish for up to `grace` seconds, then cancel the rest and stop."""
        self.stop_accepting()
        end = time.monotonic() + grace
        while time.monotonic() < end and (self.rows or self.prefilling or self.waiting):
            time.sleep(0.05)
        with self._wake:
            for job in [*self.waiting, *self.prefilling, *self.rows]:
                job.cancel()
                job.emit(("error", 503, "the server is shutting down"))
            self._stop = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- the scheduler thread ---------------------------------------------------------------------

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The loop: until `close`, or until keep_going() is False while there is nothing to do."""
        while True:
            with self._wake:
                if self._stop or not (keep_going() or self.rows or self.prefilling or self.waiting):
                    return
                self._admit()
                if not (self.prefilling or self.rows):
                    self._wake.wait(0.5)
                    continue
            try:
                self._drop_finished()
                if self.prefilling:
                    self._prefill_piece()
                if self.rows:
                    self._decode_step()
            except Exception as e:  # a backend failure must not take the server down: fail these requests
                traceback.print_exc()
                for job in [*self.prefilling, *self.rows]:
                    job.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
                self.prefilling, self.rows, self.batch = [], [], None

    def _admit(self) -> None:
        now = time.monotonic()
        for job in list(self.waiting):
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                self.waiting.remove(job)
                if not job.cancelled:
                    job.emit(("error", 504, "the request timed out while waiting"))
        while self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch:
            self.prefilling.append(self.waiting.popleft())

    def _expired(self, job: Job, now: float) -> bool:
        if job.cancelled:
            return True
        if job.deadline is not None and now > job.deadline:
            job.emit(("error", 504, "the request timed out"))
            return True
        return False

    def _drop_finished(self) -> None:
        now = time.monotonic()
        self.prefilling = [j for j in self.prefilling if not self._expired(j, now)]
        keep = [r for r, job in enumerate(self.rows) if not self._expired(job, now)]
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.batch = [], None
            return
        self.batch = self.backend.filter(self.batch, keep)
        self.rows = [self.rows[r] for r in keep]

    def _prefill_piece(self) -> None:
        job = self.prefilling[0]
        piece = job.ids[job.fed : job.fed + self.prefill_step_size]
        job.cache, logits = self.backend.prefill(job.cache, piece)
        job.fed += len(piece)
        if job.fed < len(job.ids):
            return
        self.prefilling.pop(0)
        reason = job.take(logits)
        if reason is not None:
            job.emit(("done", reason, len(job.request.prompt), job.generated))
            return
        parts = [job.cache] if self.batch is None else [self.batch, job.cache]
        self.batch = self.backend.merge(parts)
        job.cache = None
        self.rows.append(job)
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))

    def _decode_step(self) -> None:
        next_bytes = np.array([job.next_byte for job in self.rows], dtype=np.int64)
        self.batch, logits = self.backend.step(self.batch, next_bytes)
        self.steps += 1
        keep = []
        for r, job in enumerate(self.rows):
            reason = job.take(logits[r])
            if reason is None:
                keep.append(r)
            else:
                job.emit(("done", reason, len(job.request.prompt), job.generated))
        self._keep_rows(keep)

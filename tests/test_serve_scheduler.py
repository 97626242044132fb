"""The serving scheduler on a scripted numpy backend (no model, no HTTP): concurrent requests get what
they get alone, a long prompt is read in pieces between decode steps of the running batch, the batch
never exceeds --max-batch, a cancelled request leaves at the next turn, a full queue and a stopping
server refuse, and a request past its timeout ends with 504."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from hnet_core.sampling import SamplingParams
from hnet_core.serve.scheduler import GenerationRequest, QueueFull, Scheduler, ShuttingDown


class ScriptedBackend:
    """A cache is a list of rows, each the bytes that row has read; the next byte's logits peak at
    a function of the row's own bytes only, so any mixing of rows would change the output."""

    max_seqlen = None

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, int]] = []
        self.delay = delay
        self.lock = threading.Lock()

    @staticmethod
    def _logits(row: list[int]) -> np.ndarray:
        logits = np.zeros(256, dtype=np.float32)
        logits[(sum(row) * 7 + len(row)) % 26 + 97] = 1.0  # a lowercase letter
        return logits

    def prefill(self, cache, piece):
        self.calls.append(("prefill", len(piece)))
        time.sleep(self.delay)
        cache = [[]] if cache is None else cache
        cache[0] += piece.tolist()
        return cache, self._logits(cache[0])

    def merge(self, caches):
        return [row for c in caches for row in c]

    def filter(self, cache, rows):
        return [cache[r] for r in rows]

    def step(self, cache, next_bytes):
        self.calls.append(("step", len(cache)))
        time.sleep(self.delay)
        for row, b in zip(cache, next_bytes.tolist()):
            row.append(b)
        return cache, np.stack([self._logits(row) for row in cache])


def expected(prompt: bytes, max_tokens: int) -> str:
    row, out = [254, *prompt], []
    for _ in range(max_tokens):
        b = int(ScriptedBackend._logits(row).argmax())
        out.append(b)
        row.append(b)
    return bytes(out).decode()


def submit(scheduler: Scheduler, prompt: bytes, max_tokens: int, timeout: float | None = None):
    events: queue.Queue = queue.Queue()
    job = scheduler.submit(GenerationRequest(prompt, max_tokens, SamplingParams(temperature=0), timeout=timeout),
                           events.put)
    return job, events


def collect(events: queue.Queue) -> tuple[str, tuple]:
    text = []
    while True:
        event = events.get(timeout=30)
        if event[0] == "text":
            text.append(event[1])
        else:
            return "".join(text), event


@pytest.fixture
def run():
    started = []

    def make(backend, **kw) -> Scheduler:
        scheduler = Scheduler(backend, **kw)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield make
    for s in started:
        s.close(grace=0)


def test_concurrent_requests_get_what_they_get_alone(run):
    scheduler = run(ScriptedBackend(), max_batch=4, prefill_step_size=3)
    prompts = [b"a", b"hello", b"a longer prompt than the rest", b"xy", b"the fifth", b"six"]
    pending = [submit(scheduler, p, 10 + i) for i, p in enumerate(prompts)]
    for (job, events), (i, p) in zip(pending, enumerate(prompts)):
        text, done = collect(events)
        assert text == expected(p, 10 + i)
        assert done == ("done", "length", len(p), 10 + i)
    assert 1 < scheduler.max_rows_seen <= 4


def test_a_long_prompt_is_read_between_decode_steps(run):
    backend = ScriptedBackend(delay=0.002)
    scheduler = run(backend, max_batch=4, prefill_step_size=4)
    first = submit(scheduler, b"short", 60)
    while not scheduler.rows:
        time.sleep(0.001)
    second = submit(scheduler, b"x" * 40, 5)
    collect(second[1])
    collect(first[1])
    first_step = backend.calls.index(("step", 1))
    pieces = [i for i, call in enumerate(backend.calls) if call[0] == "prefill" and i > first_step]
    assert len(pieces) == 11  # 41 bytes (BOS included) in pieces of 4
    between = [backend.calls[i + 1][0] for i in pieces[:-1]]
    assert between == ["step"] * len(between)  # the running request stepped after every piece


def test_cancelled_request_leaves_and_the_batch_never_exceeds_max_batch(run):
    backend = ScriptedBackend(delay=0.001)
    scheduler = run(backend, max_batch=2, prefill_step_size=64)
    long_job, _ = submit(scheduler, b"a", 10_000)
    others = [submit(scheduler, b"b", 200) for _ in range(3)]
    time.sleep(0.02)
    assert scheduler.load()["waiting"] >= 2  # only one of them fits beside the long one
    long_job.cancel()
    for _, events in others:
        assert collect(events)[0] == expected(b"b", 200)
    assert max(n for kind, n in backend.calls if kind == "step") <= 2
    deadline = time.monotonic() + 5
    while scheduler.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.load()["running"] == 0


def test_full_queue_and_stopping_server_refuse(run):
    scheduler = run(ScriptedBackend(delay=0.01), max_batch=1, max_queue=1)
    submit(scheduler, b"a", 1000)
    time.sleep(0.05)
    submit(scheduler, b"b", 5)
    with pytest.raises(QueueFull):
        submit(scheduler, b"c", 5)
    scheduler.stop_accepting()
    with pytest.raises(ShuttingDown):
        submit(scheduler, b"d", 5)


def test_request_past_its_timeout_ends_with_504(run):
    scheduler = run(ScriptedBackend(delay=0.01), max_batch=1)
    _, events = submit(scheduler, b"a", 100_000, timeout=0.2)
    text, end = collect(events)
    assert end[:2] == ("error", 504)
    assert text  # it had started

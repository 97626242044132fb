"""mlx-lm's batch path on H-Net: our cache has what `BatchGenerator` needs (merge, extend, filter,
extract, prepare/finalize with right padding), so `mlx_lm.server` batches our models, and every
batched request gets the greedy bytes it gets alone from `mlx_lm.generate`: prompts of different
lengths in one batch (right-padded pieces), requests joining a running batch, and a prompt cache
of one request merged with fresh ones."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402

from conftest import TEXT  # noqa: E402
from hnet_core.backends import DEMO_MODEL  # noqa: E402

MAX_TOKENS = 20
PROMPTS = [TEXT[:n] for n in (1, 7, 30, 64, 101)]


@pytest.fixture(scope="module")
def demo():
    import mlx_lm

    return mlx_lm.load(DEMO_MODEL, trust_remote_code=True)


def alone(model, tokenizer, prompt: str) -> str:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, sampler=make_sampler(temp=0.0),
                           prefill_step_size=16)


def run(gen, uids: list[int], results: dict) -> None:
    while responses := gen.next_generated():
        for r in responses:
            if r.finish_reason != "stop":
                results.setdefault(r.uid, []).append(r.token)


def test_server_takes_the_batch_path_for_our_model(demo):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = demo
    assert all(hasattr(c, "merge") for c in make_prompt_cache(model))  # mlx_lm.server's is_batchable test


def test_batch_generate_equals_each_prompt_alone(demo, monkeypatch):
    import mlx_lm

    from hnet_mlx.mlx_lm_model import HNetPromptCache

    model, tokenizer = demo
    paddings = []
    prepare = HNetPromptCache.prepare

    def spy(self, lengths=None, right_padding=None, **kw):
        paddings.append(max(right_padding or [0]))
        return prepare(self, lengths=lengths, right_padding=right_padding, **kw)

    monkeypatch.setattr(HNetPromptCache, "prepare", spy)
    out = mlx_lm.batch_generate(model, tokenizer, [tokenizer.encode(p) for p in PROMPTS], max_tokens=MAX_TOKENS,
                                prefill_step_size=16)
    assert paddings and max(paddings) > 0  # the prompts went in as one right-padded batch
    assert out.texts == [alone(model, tokenizer, p) for p in PROMPTS]


def test_requests_joining_a_running_batch_equal_each_alone(demo):
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = demo
    gen = BatchGenerator(model, max_tokens=MAX_TOKENS, prefill_step_size=16, prefill_batch_size=2,
                         completion_batch_size=8)
    results: dict = {}
    first = gen.insert([tokenizer.encode(p) for p in PROMPTS[:2]])
    for _ in range(5):  # the first two are decoding when the others arrive
        for r in gen.next_generated():
            results.setdefault(r.uid, []).append(r.token)
    later = gen.insert([tokenizer.encode(p) for p in PROMPTS[2:]])
    run(gen, later, results)
    gen.close()
    texts = [tokenizer.decode(results[uid]) for uid in first + later]
    assert texts == [alone(model, tokenizer, p) for p in PROMPTS]


def test_a_prompt_cache_merges_with_fresh_requests(demo):
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = demo
    prefix, suffix = PROMPTS[3], TEXT[64:80]
    cache = make_prompt_cache(model)
    model(mx.array([tokenizer.encode(prefix)]), cache=cache)  # the prefix read once, as the server's cache holds it
    out = mlx_lm.batch_generate(model, tokenizer, [list(suffix.encode()), tokenizer.encode(PROMPTS[1])],
                                max_tokens=MAX_TOKENS, prefill_step_size=16, prompt_caches=[cache, None])
    assert out.texts == [alone(model, tokenizer, prefix + suffix), alone(model, tokenizer, PROMPTS[1])]


def test_extracted_row_continues_like_the_batch(demo):
    """extract(i) gives row i's own cache: a step on it equals that row's step in the batch."""
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = demo
    caches = []
    for p in PROMPTS[1:3]:
        c = make_prompt_cache(model)
        model(mx.array([tokenizer.encode(p)]), cache=c)
        caches.append(c)
    batch = [type(caches[0][0]).merge([c[0] for c in caches])]
    row = [batch[0].extract(1)]
    both = model(mx.array([[65], [66]]), cache=batch)
    one = model(mx.array([[66]]), cache=row)
    assert mx.abs(both[1] - one[0]).max().item() <= 1e-5


# `mlx_lm.server` with its BatchGenerator wrapped so it reports the largest batch it decoded.
SERVER_WRAPPER = """
import sys
import mlx_lm.server as server

class Reporting(server.BatchGenerator):
    seen = 0

    def _next(self):
        out = super()._next()
        size = len(self._generation_batch)
        if size > Reporting.seen:
            Reporting.seen = size
            print(f"BATCH {size}", file=sys.stderr, flush=True)
        return out

server.BatchGenerator = Reporting
sys.argv = ["mlx_lm.server", *sys.argv[1:]]
server.main()
"""


def test_mlx_lm_server_batches_concurrent_requests_with_their_own_answers(demo, tmp_path):
    import ctypes.util
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from serve_helpers import free_port

    from test_mlx_lm_server import complete, request

    model, tokenizer = demo
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ)
    if sys.platform.startswith("linux") and ctypes.util.find_library("openblas"):
        env["LD_PRELOAD"] = "libopenblas.so.0"
    with open(log, "w") as err:
        proc = subprocess.Popen(["timeout", "600", sys.executable, "-c", SERVER_WRAPPER, "--model", DEMO_MODEL,
                                 "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
                                 "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if request(port, "GET", "/health", None, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlx_lm.server did not come up"
            time.sleep(0.5)
        prompts = PROMPTS[1:]
        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda p: complete(port, p, max_tokens=MAX_TOKENS)["choices"][0]["text"], prompts))
        assert texts == [alone(model, tokenizer, p) for p in prompts]
        sizes = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("BATCH ")]
        assert sizes and max(sizes) > 1, log.read_text()[-2000:]  # the batch path, several requests at once
    finally:
        proc.terminate()
        proc.wait(timeout=30)

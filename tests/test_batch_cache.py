"""Batch cache operations (merge / filter / extract): every row of a batch gets what it gets alone.

Each sample is a prompt plus fixed continuation bytes. Alone, it is prefilled in a cache of its
own and stepped through its continuation. In the batch, samples are prefilled alone, then a
seeded random mixture of operations runs: new rows join the running batch (merge), rows leave
(filter) after being taken out one by one (extract) to rejoin later, and the batch steps. Every
step's logits (fp32, max abs <= 1e-5) and boundary decisions of every row must equal the sample's
own at the same position, in torch, MLX and ONNX, on 1- and 2-stage configs and the official
fixture. Prompt lengths differ, so rows of very different lengths share global attention caches,
ring buffers and inner levels that advance on different steps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import FIXTURE_DIR, OFFICIAL_ONNX_MAX_SEQLEN, SMALL_CONFIGS, TEXT, random_torch_model

STEPS = 12  # continuation bytes per sample
TOLERANCE = 1e-5
PROMPT_LENGTHS = [1, 3, 9, 17, 40, 75]  # bytes after BOS; 75 > 64: the global KV caches of rows differ in size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def samples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    data = list(TEXT.encode())
    out = []
    for n in PROMPT_LENGTHS:
        start = int(rng.integers(0, len(data) - n - STEPS))
        out.append(([254] + data[start:start + n], data[start + n:start + n + STEPS]))
    return out


class TorchBackend:
    def __init__(self, model):
        from hnet_torch import batch_cache

        self.model, self.ops = model, batch_cache

    @torch.inference_mode()
    def prefill(self, prompt: list[int]):
        cache = self.model.allocate_inference_cache(batch_size=1)
        self.model(torch.tensor([prompt]), cache=cache)
        return cache

    @torch.inference_mode()
    def step(self, cache, next_bytes: list[int]):
        out = self.model.step(torch.tensor(next_bytes)[:, None], cache)
        return out.logits[:, 0].numpy(), [r.boundary_mask[:, 0].numpy() for r in out.routing], cache


class MLXBackend:
    def __init__(self, torch_model):
        import mlx.core as mx

        from hnet_mlx import batch_cache
        from mlx_helpers import mlx_from_torch

        self.mx, self.model, self.ops = mx, mlx_from_torch(torch_model), batch_cache

    def prefill(self, prompt: list[int]):
        cache = self.model.allocate_inference_cache(batch_size=1)
        self.model(self.mx.array([prompt]), cache=cache)
        return cache

    def step(self, cache, next_bytes: list[int]):
        out = self.model.step(self.mx.array(next_bytes)[:, None], cache)
        return np.array(out.logits[:, 0]), [np.array(r.boundary_mask[:, 0]) for r in out.routing], cache


class OnnxBackend:
    """States are OnnxState values; one OnnxHNet runs them (set_state before each call)."""

    def __init__(self, directory: str):
        from hnet_export import OnnxHNet, batch_cache

        self.model, self.ops = OnnxHNet(directory, provider="cpu", threads=1), batch_cache

    def prefill(self, prompt: list[int]):
        self.model.prefill(np.array([prompt]))
        return self.model.get_state()

    def step(self, state, next_bytes: list[int]):
        self.model.set_state(state)
        out = self.model.step(np.array(next_bytes)[:, None])
        return out.logits[:, 0], [r.boundary_mask[:, 0] for r in out.routing], self.model.get_state()


def alone(backend, prompt: list[int], cont: list[int]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per continuation byte k: (logits, boundaries per stage) after feeding it, with a cache of one."""
    cache, out = backend.prefill(prompt), []
    for byte in cont:
        logits, bounds, cache = backend.step(cache, [byte])
        out.append((logits[0], [b[0] for b in bounds]))
    return out


def run_mixture(backend, seed: int) -> dict:
    """Random merge / filter / extract / step operations; checks every row at every step."""
    rng = np.random.default_rng(seed)
    data = samples(seed)
    reference = [alone(backend, p, c) for p, c in data]
    waiting = [(i, 0, backend.prefill(p)) for i, (p, _) in enumerate(data)]  # (sample, bytes stepped, cache)
    batch, rows = None, []  # rows: [sample, bytes stepped] per batch row
    counts = {"merge": 0, "filter": 0, "extract": 0, "steps": 0, "checked": 0}
    while waiting or rows:
        action = rng.choice(["join", "leave", "step", "step", "step"])
        if action == "join" and waiting:
            k = int(rng.integers(1, min(3, len(waiting)) + 1))
            joining, waiting = waiting[:k], waiting[k:]
            parts = ([batch] if batch is not None else []) + [c for _, _, c in joining]
            batch = backend.ops.merge_caches(parts)
            rows += [[i, n] for i, n, _ in joining]
            counts["merge"] += 1
        elif action == "leave" and len(rows) > 1:
            leaving = sorted(rng.choice(len(rows), size=int(rng.integers(1, len(rows))), replace=False).tolist())
            for r in leaving:  # unfinished rows come back later, from their extracted cache
                i, n = rows[r]
                if n < STEPS:
                    waiting.append((i, n, backend.ops.extract_cache(batch, r)))
                    counts["extract"] += 1
            keep = [r for r in range(len(rows)) if r not in leaving]
            batch, rows = backend.ops.filter_cache(batch, keep), [rows[r] for r in keep]
            counts["filter"] += 1
        elif rows:
            logits, bounds, batch = backend.step(batch, [data[i][1][n] for i, n in rows])
            for r, (i, n) in enumerate(rows):
                want_logits, want_bounds = reference[i][n]
                assert np.abs(logits[r] - want_logits).max() <= TOLERANCE, (i, n)
                assert [bool(b[r]) for b in bounds] == [bool(b) for b in want_bounds], (i, n)
                rows[r][1] += 1
                counts["checked"] += 1
            counts["steps"] += 1
            done = [r for r, (_, n) in enumerate(rows) if n == STEPS]
            if len(done) == len(rows):
                batch, rows = None, []
            elif done:
                keep = [r for r in range(len(rows)) if r not in done]
                batch, rows = backend.ops.filter_cache(batch, keep), [rows[r] for r in keep]
                counts["filter"] += 1
    assert counts["checked"] == len(data) * STEPS
    return counts


def official_torch_model():
    from hnet_torch import load_pretrained

    return load_pretrained(FIXTURE_DIR)


MODELS = {
    "1stage": lambda: random_torch_model(SMALL_CONFIGS["1stage"](), seed=3),
    "2stage": lambda: random_torch_model(SMALL_CONFIGS["2stage"](), seed=3),
    "official": official_torch_model,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def torch_model(request):
    return request.param, MODELS[request.param]()


def check_mixtures(backend) -> None:
    totals = {"merge": 0, "filter": 0, "extract": 0, "steps": 0}
    for seed in range(3):
        counts = run_mixture(backend, seed)
        for key in totals:
            totals[key] += counts[key]
    assert all(totals[k] > 0 for k in totals), totals  # every operation ran


def test_torch_batch_rows_equal_each_sample_alone(torch_model):
    check_mixtures(TorchBackend(torch_model[1]))


def test_mlx_batch_rows_equal_each_sample_alone(torch_model):
    pytest.importorskip("mlx.core")
    check_mixtures(MLXBackend(torch_model[1]))


# The session's shared exports (tests/conftest.py): the 2-stage one other ONNX tests make too, the
# official fixture's; the 1-stage export costs another minute, so it runs in the slow set.
ONNX_EXPORTS = ["2stage", "official", pytest.param("1stage", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ONNX_EXPORTS)
def test_onnx_batch_rows_equal_each_sample_alone(name, request):
    if name == "official":
        directory = request.getfixturevalue("official_onnx_export")
    else:
        options = {"external_data": True} if name == "2stage" else {}
        _, directory = request.getfixturevalue("onnx_export")(name, max_seqlen=128, **options)
    check_mixtures(OnnxBackend(directory))


def test_filter_shrinks_grown_attention_caches():
    from hnet_torch.batch_cache import filter_cache, merge_caches
    from hnet_torch.cache import KV_STEP, AttentionState, isotropic_states

    backend = TorchBackend(random_torch_model(SMALL_CONFIGS["1stage"](), seed=3))
    text = np.random.default_rng(0).integers(0, 254, size=1500).tolist()  # enough chunks to pass KV_STEP slots
    long, short = backend.prefill([254] + text), backend.prefill([254, 66])
    merged = merge_caches([long, short])

    def slots(cache):  # of the global attention layer (the inner level's)
        return max(layer.k.shape[1] for stack in isotropic_states(cache.backbone) for layer in stack.layers
                   if isinstance(layer, AttentionState) and not layer.ring)

    assert slots(merged) > KV_STEP
    assert slots(filter_cache(merged, [1])) < slots(merged)


def test_merge_refuses_another_models_cache():
    from hnet_core.errors import HNetError
    from hnet_torch.batch_cache import merge_caches

    a = TorchBackend(random_torch_model(SMALL_CONFIGS["1stage"](), seed=3)).prefill([254])
    b = TorchBackend(random_torch_model(SMALL_CONFIGS["2stage"](), seed=3)).prefill([254])
    with pytest.raises(HNetError, match="different models"):
        merge_caches([a, b])

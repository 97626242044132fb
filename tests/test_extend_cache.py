"""Extending a live cache piece by piece equals one pass over the whole text (hnet_torch and hnet_mlx).

Every test feeds texts in pieces, `model(piece, mask=m, cache=cache)` after `model(...)`, and checks:
  * the concatenated logits equal one forward pass over the whole text (fp32, <= 1e-4), and every
    stage's boundary decisions are identical;
  * 20 `step`s afterwards give the logits of the same 20 steps after a single prefill.
A batch row is one text with its own split: round j feeds every row its j-th piece (right-padded,
with a mask); a row with no piece left gets an all-false mask row, which must leave it untouched.

Cuts at every position, by construction (test_every_cut_point_*): row c of one batch splits the
text as [0, c) [c, c + k) [c + k, L) for every c, with a middle piece of k = 1, 2 or 3 bytes. So
every cut point of the text occurs, hence a cut right before a boundary (b[c]), right after one
(b[c - 1]) and a middle piece with no boundary at all (no stage-0 boundary in [c, c + k): the inner
levels get no new chunk, the "M = 0" path). `covered_cases` reads those cases from the one-pass
boundaries and the test asserts each occurred, so a model whose routing never produced them fails
rather than passing vacuously.
"""

from __future__ import annotations

import numpy as np
import pytest

from hnet_core.tokenizer import encode

from conftest import SMALL_CONFIGS, TEXT, random_torch_model

ATOL = 1e-4
STEP_BYTES = encode(" and the keeper slept.", add_bos=False)[:20]
PIECE_LENGTHS = (1, 2, 3, 7, 64, 300)


# -- two backends behind one small adapter ------------------------------------------------------


class TorchRunner:
    name = "torch"

    def __init__(self, torch_model):
        import torch

        self.torch = torch
        self.model = torch_model

    def cache(self, batch: int):
        return self.model.allocate_inference_cache(batch_size=batch)

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache=None):
        """-> logits (B, L, V), per stage [(boundary mask, valid)] as numpy."""
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(ids), mask=self.torch.from_numpy(mask), cache=cache)
        return out.logits.numpy(), [(r.boundary_mask.numpy(), _valid(r.valid, r.boundary_mask)) for r in out.routing]

    def step(self, byte_ids: np.ndarray, cache):
        with self.torch.no_grad():
            return self.model.step(self.torch.from_numpy(byte_ids), cache).logits.numpy()[:, 0]


class MlxRunner:
    name = "mlx"

    def __init__(self, torch_model):
        import mlx.core as mx

        from mlx_helpers import mlx_from_torch

        self.mx = mx
        self.model = mlx_from_torch(torch_model)

    def cache(self, batch: int):
        return self.model.allocate_inference_cache(batch_size=batch)

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache=None):
        mx = self.mx
        out = self.model(mx.array(ids.astype(np.int32)), mask=mx.array(mask), cache=cache)
        return np.array(out.logits), [(np.array(r.boundary_mask), _valid(None if r.valid is None else np.array(r.valid),
                                                                         np.array(r.boundary_mask))) for r in out.routing]

    def step(self, byte_ids: np.ndarray, cache):
        return np.array(self.model.step(self.mx.array(byte_ids.astype(np.int32)), cache).logits)[:, 0]


def _valid(valid, boundary_mask):
    return np.ones(np.shape(boundary_mask), dtype=bool) if valid is None else np.asarray(valid)


RUNNERS = {"torch": TorchRunner, "mlx": MlxRunner}
_MODELS: dict = {}


def runner(backend: str, config_name: str):
    """One model per (backend, config) for the whole module: the same weights in both backends."""
    key = (backend, config_name)
    if key not in _MODELS:
        if backend == "mlx":
            pytest.importorskip("mlx.core")
        _MODELS[key] = RUNNERS[backend](random_torch_model(SMALL_CONFIGS[config_name]()))
    return _MODELS[key]


# -- feeding pieces -------------------------------------------------------------------------------


def padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    L = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), L), dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return ids, mask


def feed_in_rounds(run, texts: list[list[int]], splits: list[list[int]]):
    """Feed texts[b] cut into pieces of lengths splits[b], round by round on one cache.
    Returns (cache, per-row logits (len, V), per-row per-stage boundary decisions)."""
    B = len(texts)
    cache = run.cache(B)
    starts = [np.concatenate([[0], np.cumsum(s)]).astype(int) for s in splits]
    logits = [[] for _ in range(B)]
    stages: list[list[list[np.ndarray]]] = [[] for _ in range(B)]
    for j in range(max(len(s) for s in splits)):
        rows = [texts[b][starts[b][j] : starts[b][j + 1]] if j < len(splits[b]) else [] for b in range(B)]
        ids, mask = padded(rows)
        out, routing = run.forward(ids, mask, cache)
        for b in range(B):
            logits[b].append(out[b, : len(rows[b])])
            for s, (bm, valid) in enumerate(routing):
                if len(stages[b]) <= s:
                    stages[b].append([])
                stages[b][s].append(bm[b][valid[b]])
    return cache, [np.concatenate(l) for l in logits], [[np.concatenate(x) for x in st] for st in stages]


def one_pass(run, text: list[int]):
    """Logits (L, V) and per-stage boundary decisions of a single forward, and a cache prefilled at once."""
    cache = run.cache(1)
    ids, mask = padded([text])
    out, routing = run.forward(ids, mask, cache)
    return cache, out[0], [bm[0][valid[0]] for bm, valid in routing]


def steps(run, cache, batch: int) -> np.ndarray:
    """(20, B, V): the same 20 bytes stepped into every sample."""
    return np.stack([run.step(np.full((batch, 1), b, dtype=np.int64), cache) for b in STEP_BYTES])


def check_pieces_equal_one_pass(run, texts: list[list[int]], splits: list[list[int]]) -> float:
    """Assert pieces == one pass and steps after == steps after one prefill; return the max logit diff."""
    cache, logits, stages = feed_in_rounds(run, texts, splits)
    after = steps(run, cache, len(texts))
    worst = 0.0
    reference: dict = {}
    for b, text in enumerate(texts):
        key = tuple(text)
        if key not in reference:
            ref_cache, ref_logits, ref_stages = one_pass(run, text)
            reference[key] = (ref_logits, ref_stages, steps(run, ref_cache, 1)[:, 0])
        ref_logits, ref_stages, ref_steps = reference[key]
        diff = float(np.abs(logits[b] - ref_logits).max())
        assert diff <= ATOL, (b, splits[b], diff)
        for s, (got, want) in enumerate(zip(stages[b], ref_stages)):
            assert np.array_equal(got, want), f"row {b} split {splits[b]}: stage {s} boundaries differ"
        step_diff = float(np.abs(after[:, b] - ref_steps).max())
        assert step_diff <= ATOL, (b, splits[b], step_diff)
        worst = max(worst, diff, step_diff)
    return worst


def random_split(rng: np.random.Generator, length: int, choices=PIECE_LENGTHS) -> list[int]:
    out = []
    while sum(out) < length:
        out.append(int(min(rng.choice(choices), length - sum(out))))
    return out


def covered_cases(boundaries: np.ndarray, cut_rows: list[tuple[int, int]]) -> set[str]:
    """Which cut situations the rows (c, k) create for stage-0 boundaries b of the one pass."""
    cases = set()
    for c, k in cut_rows:
        if boundaries[c]:
            cases.add("cut right before a boundary")
        if boundaries[c - 1]:
            cases.add("cut right after a boundary")
        if not boundaries[c : c + k].any():
            cases.add("piece with no boundary")
    return cases


# -- tests ----------------------------------------------------------------------------------------


EVERY_CUT_CASES = [("torch", name) for name in sorted(SMALL_CONFIGS)] + [
    pytest.param("mlx", name, marks=[] if name == "2stage" else [pytest.mark.slow]) for name in sorted(SMALL_CONFIGS)]


@pytest.mark.parametrize("backend,config_name", EVERY_CUT_CASES)
def test_every_cut_point_equals_one_pass(backend, config_name, one_torch_thread):
    run = runner(backend, config_name)
    text = encode(TEXT[:30])
    L = len(text)
    rows = [(c, k) for k in (1, 2, 3) for c in range(1, L - k)]
    splits = [[c, k, L - c - k] for c, k in rows]
    check_pieces_equal_one_pass(run, [text] * len(rows), splits)
    _, _, ref_stages = one_pass(run, text)
    assert covered_cases(ref_stages[0], rows) == {"cut right before a boundary", "cut right after a boundary",
                                                  "piece with no boundary"}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("config_name", sorted(SMALL_CONFIGS))
def test_random_ragged_splits_equal_one_pass(backend, config_name, one_torch_thread):
    """Batch 3, texts of different lengths, seeded random piece lengths from 1, 2, 3, 7, 64, 300."""
    run = runner(backend, config_name)
    rng = np.random.default_rng(9)
    texts = [encode(TEXT[:n]) for n in (17, 160, 90)]
    splits = [random_split(rng, len(t)) for t in texts]
    check_pieces_equal_one_pass(run, texts, splits)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("config_name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("piece", [*PIECE_LENGTHS, "mixed"])
def test_seeded_splits_of_several_lengths_equal_one_pass(backend, config_name, piece, one_torch_thread):
    """Batch 1 and batch 3 ragged, texts of 5 to 700 bytes, fixed or mixed piece lengths."""
    run = runner(backend, config_name)
    rng = np.random.default_rng(abs(hash((config_name, str(piece)))) % 2**32)
    long_text = (TEXT + " ") * 4
    for lengths in [(5,), (120,), (700,), (40, 300, 700)]:
        texts = [encode(long_text[: n - 1]) for n in lengths]
        choices = PIECE_LENGTHS if piece == "mixed" else (piece,)
        splits = [random_split(rng, len(t), choices) for t in texts]
        check_pieces_equal_one_pass(run, texts, splits)


@pytest.mark.parametrize("config_name", sorted(SMALL_CONFIGS))
def test_torch_and_mlx_agree_on_the_same_pieces(config_name, one_torch_thread):
    torch_run, mlx_run = runner("torch", config_name), runner("mlx", config_name)
    rng = np.random.default_rng(3)
    texts = [encode(TEXT[:n]) for n in (60, 25)]
    splits = [random_split(rng, len(t), (1, 3, 7, 64)) for t in texts]
    t_cache, t_logits, t_stages = feed_in_rounds(torch_run, texts, splits)
    m_cache, m_logits, m_stages = feed_in_rounds(mlx_run, texts, splits)
    for b in range(len(texts)):
        assert np.abs(t_logits[b] - m_logits[b]).max() <= ATOL
        for s in range(len(t_stages[b])):
            assert np.array_equal(t_stages[b][s], m_stages[b][s])
    assert np.abs(steps(torch_run, t_cache, 2) - steps(mlx_run, m_cache, 2)).max() <= ATOL


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_all_false_mask_row_leaves_that_sample_untouched(backend, one_torch_thread):
    run = runner(backend, "2stage")
    a, b = encode(TEXT[:40]), encode(TEXT[:25])
    cache = run.cache(2)
    run.forward(*padded([a[:20], b[:10]]), cache)
    run.forward(*padded([a[20:], []]), cache)  # sample 1 gets nothing this round
    run.forward(*padded([[], b[10:]]), cache)  # and sample 0 nothing in this one
    got = steps(run, cache, 2)
    for row, text in enumerate([a, b]):
        ref_cache, _, _ = one_pass(run, text)
        assert np.abs(got[:, row] - steps(run, ref_cache, 1)[:, 0]).max() <= ATOL


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_max_seqlen_is_a_limit_and_caches_grow_without_it(backend, one_torch_thread):
    from hnet_core.errors import HNetError

    run = runner(backend, "1stage")
    text = encode(TEXT)
    limited = run.model.allocate_inference_cache(batch_size=1, max_seqlen=len(text))
    run.forward(*padded([text]), limited)
    with pytest.raises(HNetError, match=f"max_seqlen {len(text)}"):
        run.step(np.array([[65]]), limited)
    growing = run.cache(1)
    for start in range(0, len(text), 64):
        run.forward(*padded([text[start : start + 64]]), growing)
    _, ref_logits, _ = one_pass(run, text)
    stepped = [run.step(np.array([[b]]), growing) for b in STEP_BYTES]  # past any preallocated size
    assert len(stepped) == 20 and growing.max_length == len(text) + 20


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_official_fixture_fed_in_pieces_reproduces_the_recorded_outputs(backend, one_torch_thread):
    """The official model's recorded logits and boundaries, whatever the split of the prompt."""
    from conftest import FIXTURE_DIR

    expected = np.load(f"{FIXTURE_DIR}/expected.npz", allow_pickle=False)
    if backend == "torch":
        from hnet_torch import load_pretrained

        run = TorchRunner(load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json"))
    else:
        pytest.importorskip("mlx.core")
        from hnet_torch import load_pretrained

        run = MlxRunner(load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json"))
    text = expected["single_L100.input_ids"][0].tolist()
    splits = [[1] * 10 + [90], [7] * 14 + [2], [33, 1, 1, 65], [50, 50]]
    _, logits, stages = feed_in_rounds(run, [text] * len(splits), splits)
    for b in range(len(splits)):
        assert np.abs(logits[b] - expected["single_L100.logits"][0]).max() <= ATOL
        assert np.array_equal(stages[b][0], expected["single_L100.stage0.boundary_mask"][0])
    # generation: the prompt in pieces, then the recorded greedy steps
    prompt = expected["gen.prompt_ids"][0].tolist()
    cache, logits, _ = feed_in_rounds(run, [prompt], [[5, 1, 20]])
    assert np.abs(logits[0] - expected["gen.prefill_logits"][0]).max() <= ATOL
    fed = expected["gen.generated_ids"]
    for k in range(len(fed)):
        step = run.step(np.array([[int(fed[k])]]), cache)
        assert np.abs(step[0] - expected["gen.step_logits"][k]).max() <= ATOL


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_steps_that_grow_a_global_attention_cache_equal_one_pass(backend, one_torch_thread):
    """Global attention at the byte level: 20 steps after 250 bytes cross the first KV_STEP (256)
    allocation, so the cache grows inside `step` (MLX: the compiled step is retraced)."""
    config = SMALL_CONFIGS["1stage"]().to_dict()
    config["attn_cfg"]["window_size"] = [-1, -1]
    from hnet_core.config import HNetConfig

    torch_model = random_torch_model(HNetConfig.from_dict(config))
    run = TorchRunner(torch_model) if backend == "torch" else (pytest.importorskip("mlx.core") and MlxRunner(torch_model))
    text = encode((TEXT + " ") * 2)[:270]
    _, ref_logits, _ = one_pass(run, text)
    cache = run.cache(1)
    run.forward(*padded([text[:200]]), cache)
    run.forward(*padded([text[200:250]]), cache)
    got = np.stack([run.step(np.array([[b]]), cache)[0] for b in text[250:]])
    assert np.abs(got - ref_logits[250:]).max() <= ATOL


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_generate_reads_ragged_prompts_in_pieces_like_one_pass(backend, one_torch_thread):
    """prefill_step_size cuts a batch of prompts of different lengths into pieces (a short prompt's
    last byte lands in an early piece): the greedy bytes are those of a single-piece prefill."""
    run = runner(backend, "2stage")
    generate = __import__("hnet_torch" if backend == "torch" else "hnet_mlx").generate
    prompts = [TEXT[:9], TEXT[:47], TEXT[:23]]
    whole = generate(run.model, prompts, max_tokens=12, temperature=0)
    for step in (1, 4, 16):
        assert generate(run.model, prompts, max_tokens=12, temperature=0, prefill_step_size=step) == whole

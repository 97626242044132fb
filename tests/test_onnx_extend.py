"""OnnxHNet.extend: a live state continued by pieces of any length gives what one prefill gives.

For random splits of ragged batches (piece lengths 1, 2, 3, 7, 64 and seeded mixtures) on a
1-stage config (a sliding window of 6 < a 64-byte piece; global attention inside) and a 2-stage
config (windows 5 and 3; a stage with no pad_dimension), the concatenated logits equal one prefill
and torch's one pass, every stage's boundary decisions are identical, and decode steps afterwards
equal those after a single prefill. Splitting into 1-byte pieces cuts before and after every
boundary and feeds pieces that make no chunk at all: the test counts that those cases occurred.
One export per config serves the module (exports are slow)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hnet_torch
from conftest import greedy_bytes
from hnet_core.cli import main as hnet_main
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams
from hnet_export import OnnxHNet, stream_generate

MAX_SEQLEN = 128
TEXT_LEN = 100  # + 20 decode steps fits MAX_SEQLEN
SPLITS = {
    "ones": [1],
    "twos": [2],
    "threes": [3],
    "sevens": [7],
    "64": [64],
    "mixture": "random",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The 2-stage export is the one tests/test_onnx_configs.py makes (shared in a session); the 1-stage
# export costs another minute, so it runs in the slow set.
EXPORTS = {"2stage": {"external_data": True}, "1stage": {}}


@pytest.fixture(scope="module", params=["2stage", pytest.param("1stage", marks=pytest.mark.slow)])
def exported(request, onnx_export):
    name = request.param
    model, out = onnx_export(name, max_seqlen=MAX_SEQLEN, **EXPORTS[name])
    return name, model, out


def load(out_dir: str) -> OnnxHNet:
    return OnnxHNet(out_dir, provider="cpu", threads=1)


def ragged(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (batch, TEXT_LEN))
    ids[:, 0] = 254
    lengths = np.array([TEXT_LEN] + list(rng.integers(1, TEXT_LEN + 1, batch - 1)))
    return ids, np.arange(TEXT_LEN)[None] < lengths[:, None]


def cuts(split, seed: int) -> list[int]:
    if split == "random":
        rng = np.random.default_rng(seed)
        sizes = rng.choice([1, 2, 3, 7, 64], size=TEXT_LEN)
    else:
        sizes = split * TEXT_LEN
    out = [0]
    for size in sizes:
        if out[-1] >= TEXT_LEN:
            break
        out.append(min(out[-1] + int(size), TEXT_LEN))
    return out


def real_entries(outputs, stage: int, row: int) -> np.ndarray:
    """Boundary decisions of one sample at one stage over pieces, padding dropped."""
    return np.concatenate([o.routing[stage].boundary_mask[row][o.routing[stage].valid[row]] for o in outputs])


def feed_in_pieces(model: OnnxHNet, ids: np.ndarray, mask: np.ndarray, points: list[int]) -> list:
    return [model.extend(ids[:, a:b], mask[:, a:b]) for a, b in zip(points[:-1], points[1:])]


# The default run keeps the ragged batch of every split and the batch of one for the mixture; the rest is slow.
CASES = [pytest.param(split, batch, marks=() if batch == 3 or split == "mixture" else pytest.mark.slow)
         for split in sorted(SPLITS) for batch in (1, 3)]


@pytest.mark.parametrize("split,batch", CASES)
def test_pieces_equal_one_prefill_and_torch_then_steps_continue(exported, split, batch, record_property):
    name, torch_model, out_dir = exported
    ids, mask = ragged(batch, seed=batch)
    points = cuts(SPLITS[split], seed=len(split) + batch)
    single = load(out_dir)
    one = single.prefill(ids, mask)
    pieces = load(out_dir)
    outs = feed_in_pieces(pieces, ids, mask, points)
    logits = np.concatenate([o.logits for o in outs], axis=1)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), mask=torch.from_numpy(mask))
    diff_prefill = float(np.abs(logits - one.logits)[mask].max())
    diff_torch = float(np.abs(logits - ref.logits.numpy())[mask].max())
    record_property("max_abs_diff_vs_prefill", diff_prefill)
    record_property("max_abs_diff_vs_torch", diff_torch)
    assert diff_prefill <= 1e-4 and diff_torch <= 1e-4
    for s in range(torch_model.config.num_stages):
        for row in range(batch):
            whole = one.routing[s].boundary_mask[row][one.routing[s].valid[row]]
            assert np.array_equal(real_entries(outs, s, row), whole), (s, row)
            theirs = ref.routing[s].boundary_mask[row]
            if ref.routing[s].valid is not None:
                theirs = theirs[ref.routing[s].valid[row]]
            assert np.array_equal(whole, theirs.numpy()), (s, row)
    feed = np.random.default_rng(7).integers(0, 256, (20, batch, 1))
    for k in range(len(feed)):
        a, b = pieces.step(feed[k]), single.step(feed[k])
        assert np.abs(a.logits - b.logits).max() <= 1e-4, k
        for s in range(torch_model.config.num_stages):
            assert np.array_equal(a.routing[s].boundary_mask, b.routing[s].boundary_mask), (k, s)


def test_one_byte_pieces_cut_at_and_between_boundaries(exported):
    """The cases a cut can fall into all occur when every byte is its own piece."""
    name, torch_model, out_dir = exported
    ids, mask = ragged(3, seed=11)
    outs = feed_in_pieces(load(out_dir), ids, mask, list(range(TEXT_LEN + 1)))
    stage0 = np.concatenate([o.routing[0].boundary_mask for o in outs], axis=1)  # (B, L)
    real = mask[:, 1:]
    assert (stage0[:, 1:] & real).any(), "no cut right before a boundary"
    assert (stage0[:, :-1] & ~stage0[:, 1:] & real).any(), "no cut right after a boundary"
    assert (~stage0[:, 1:] & real).any(), "no piece without any chunk"
    assert any(not o.routing[0].boundary_mask.any() for o in outs[1:]), "the inner level never got an empty piece"
    if len(outs[0].routing) > 1:
        assert any(not o.routing[1].valid.any() for o in outs[1:])  # ... which it ran as one masked entry


def test_greedy_bytes_after_pieces_equal_torch(exported):
    _, torch_model, out_dir = exported
    prompts = ["Hello there, a longer prompt in pieces", "Hi"]
    greedy = SamplingParams(temperature=0)

    theirs = greedy_bytes(hnet_torch.stream_generate(torch_model, prompts, max_tokens=30, sampling=greedy))
    for size in (1, 3, 7):
        ours = greedy_bytes(stream_generate(load(out_dir), prompts, max_tokens=30, sampling=greedy, prefill_step_size=size))
        assert ours == theirs, size


def test_extend_on_a_fresh_object_is_a_prefill_and_rows_without_bytes_stay(exported):
    _, _, out_dir = exported
    ids, mask = ragged(3, seed=5)
    a, b = load(out_dir).extend(ids, mask), load(out_dir).prefill(ids, mask)
    assert np.array_equal(a.logits, b.logits)
    # A later piece where one sample has no byte leaves that sample exactly as it was.
    first, second = load(out_dir), load(out_dir)
    first.prefill(ids[:, :10], np.ones((3, 10), bool))
    second.prefill(ids[:, :10], np.ones((3, 10), bool))
    piece_mask = np.array([[True] * 4, [False] * 4, [True, True, False, False]])
    first.extend(ids[:, 10:14], piece_mask)
    nxt = np.array([[1], [2], [3]])
    assert np.abs(first.step(nxt).logits[1] - second.step(nxt).logits[1]).max() <= 1e-5


def test_extend_errors_are_clear(exported, tmp_path):
    _, _, out_dir = exported
    model = load(out_dir)
    model.prefill(np.full((2, 100), 65), None)
    with pytest.raises(HNetError, match=r"extend takes input_ids of shape \(2, length\)"):
        model.extend(np.full((3, 4), 65))
    with pytest.raises(HNetError, match="exceed this export's max_seqlen 128"):
        model.extend(np.full((2, 29), 65))
    with pytest.raises(HNetError, match="right-padded"):
        model.extend(np.full((2, 2), 65), np.array([[False, True], [True, True]]))
    old = tmp_path / "old"  # an export from before extend.onnx existed
    shutil.copytree(out_dir, old)
    meta = json.load(open(old / "export.json"))
    del meta["graphs"]["extend"]
    (old / "export.json").write_text(json.dumps(meta))
    os.remove(old / "extend.onnx")
    model = load(str(old))
    model.prefill(np.full((1, 5), 65))
    with pytest.raises(HNetError, match="no extend.onnx.*re-export"):
        model.extend(np.full((1, 5), 65))


def test_cli_generation_beyond_max_seqlen_and_raw_prompt_bytes(exported):
    _, torch_model, out_dir = exported
    result = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", out_dir, "--prompt", "x" * 100,
                                            "-m", "40"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "exceeds this export's max_seqlen 128" in result.output
    raw = b"\xff\xfe caf\xc3"
    result = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", out_dir, "--prompt",
                                            os.fsdecode(raw), "-m", "8", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == hnet_torch.generate(torch_model, raw, max_tokens=8, temperature=0) + "\n"


def test_pieces_with_io_binding_equal_plain_runs(exported):
    """The I/O-binding path (states kept in onnxruntime buffers, as on CUDA) gives the same pieces."""
    _, _, out_dir = exported
    ids, mask = ragged(3, seed=13)
    points = cuts("random", seed=13)
    plain = feed_in_pieces(load(out_dir), ids, mask, points)
    bound_model = OnnxHNet(out_dir, provider="cpu", threads=1, io_binding=True)
    bound = feed_in_pieces(bound_model, ids, mask, points)
    for a, b in zip(plain, bound):
        assert np.array_equal(a.logits, b.logits)
    assert bound_model.step(ids[:, :1]).logits.shape == (3, 1, 256)

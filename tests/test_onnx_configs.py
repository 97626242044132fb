"""ONNX export of the 2- and 3-stage small configs: prefill and decode steps agree with torch on
ragged batches (every routing stage's decisions identical), greedy generation, a weights file
shared by all graphs, and the 2-stage step with nested ONNX `If`s (step_cond.onnx)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

import hnet_torch
from conftest import greedy_bytes
from hnet_core.sampling import SamplingParams
from hnet_export import OnnxHNet, stream_generate
from hnet_export.exporter import WEIGHTS_FILE

MAX_SEQLEN = 128
# Each export takes most of a minute on 2 cores, so the default run has one per config: the 2-stage one
# is the export tests/test_onnx_extend.py uses (same options), so its step_cond.onnx (nested ONNX `If`s)
# is checked here too; the slow run adds it without the shared weights file.
OPTIONS = {"2stage": {"external_data": True, "batch_variants": True}, "3stage": {"batch_variants": False},
           "2stage_cond": {"batch_variants": True}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["2stage", "3stage", pytest.param("2stage_cond", marks=pytest.mark.slow)])
def exported(request, onnx_export):
    name = request.param
    model, out = onnx_export(name.split("_")[0], max_seqlen=MAX_SEQLEN, **OPTIONS[name])  # shared with test_onnx_extend
    return name, model, out


def _ragged(length: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (batch, length))
    ids[:, 0] = 254
    lengths = np.array([length] + list(rng.integers(1, length + 1, batch - 1)))
    return ids, np.arange(length)[None] < lengths[:, None]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 64])
def test_every_stage_agrees_with_torch(exported, length, batch):
    name, torch_model, out_dir = exported
    stages = torch_model.config.num_stages
    ids, mask = _ragged(length, batch, seed=length + batch)
    variants = ["where", "cond"] if OPTIONS[name].get("batch_variants") else ["where"]
    for variant in variants:
        model = OnnxHNet(out_dir, provider="cpu", threads=1, step_variant=variant)
        out = model.prefill(ids, mask)
        cache = torch_model.allocate_inference_cache(batch, MAX_SEQLEN)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids), mask=torch.from_numpy(mask), cache=cache)
        assert np.abs(out.logits - ref.logits.numpy())[mask].max() <= 1e-4
        for s in range(stages):
            r, t = out.routing[s], ref.routing[s]
            valid = t.valid.numpy()
            assert r.boundary_mask.shape == valid.shape
            assert np.array_equal(r.valid, valid)
            assert np.array_equal(r.boundary_mask, t.boundary_mask.numpy())
            assert np.abs(r.boundary_prob - t.boundary_prob.numpy())[valid].max() <= 1e-5
        feed = np.random.default_rng(length * batch).integers(0, 256, (16, batch, 1))
        ran = np.zeros(stages, dtype=int)
        for k in range(len(feed)):
            out = model.step(feed[k])
            with torch.no_grad():
                ref = torch_model.step(torch.from_numpy(feed[k]), cache)
            assert np.abs(out.logits - ref.logits.numpy()).max() <= 1e-4, (variant, k)
            for s in range(stages):
                r, t = out.routing[s], ref.routing[s]
                valid = np.ones((batch, 1), bool) if t.valid is None else t.valid.numpy()  # stage 0 always runs
                assert np.array_equal(r.valid, valid), (variant, k, s)
                assert np.array_equal(r.boundary_mask, t.boundary_mask.numpy()), (variant, k, s)
                assert np.abs(r.boundary_prob - t.boundary_prob.numpy())[valid].max(initial=0) <= 1e-5
                assert np.isnan(r.boundary_prob[~valid]).all()
                ran[s] += int(valid.sum())
        assert ran[-1] > 0, "the innermost routing stage never ran; pick inputs with more boundaries"


def test_greedy_generation_is_byte_identical_to_torch(exported):
    _, torch_model, out_dir = exported
    prompts = ["Hello there", "The spiral stairs every evening"]
    greedy = SamplingParams(temperature=0)

    ours = greedy_bytes(stream_generate(OnnxHNet(out_dir, provider="cpu", threads=1), prompts, max_tokens=40, sampling=greedy))
    theirs = greedy_bytes(hnet_torch.stream_generate(torch_model, prompts, max_tokens=40, sampling=greedy))
    assert ours == theirs and [len(r) for r in ours] == [40, 40]


def test_shared_weights_file_holds_each_weight_once(exported):
    name, torch_model, out_dir = exported
    if not OPTIONS[name].get("external_data"):
        assert WEIGHTS_FILE not in os.listdir(out_dir)
        return
    meta = json.load(open(os.path.join(out_dir, "export.json")))
    assert meta["external_data"] == WEIGHTS_FILE
    weight_bytes = sum(v.numel() * v.element_size() for v in torch_model.state_dict().values())
    size = os.path.getsize(os.path.join(out_dir, WEIGHTS_FILE))
    assert weight_bytes * 0.95 < size < weight_bytes * 1.05
    for file in meta["graphs"].values():
        model = onnx.load(os.path.join(out_dir, file), load_external_data=False)
        inline = sum(len(t.raw_data) for t in model.graph.initializer)
        assert inline < 0.05 * weight_bytes  # only small constants; the weights live in the shared file
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all(e.value == WEIGHTS_FILE for t in external for e in t.external_data if e.key == "location")

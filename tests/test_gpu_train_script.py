"""bench/quality/gpu_train.py: the weights brought back from the device machine in pieces come back whole."""

from __future__ import annotations

import os

import pytest

from conftest import config_2stage, random_torch_model


@pytest.fixture(scope="module")
def gpu_train():
    from bench.quality import gpu_train

    return gpu_train


def test_plan_steps_fills_the_time_left_with_a_margin(gpu_train):
    # 1 MB/s for 100 s at 0.85 margin, 64 KiB per step -> 1296 steps
    assert gpu_train.plan_steps(1e6, 100, 65536) == 1296
    assert gpu_train.plan_steps(10.0, 1, 65536) == 1  # never zero steps


def test_weights_split_into_pieces_unpack_to_the_same_float16_model(gpu_train, tmp_path):
    import torch

    from hnet_torch import load_pretrained, save_pretrained

    model = random_torch_model(config_2stage())
    run = tmp_path / "run"
    save_pretrained(model, run / "model")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "train_config.json").write_text("{}")
    returned = tmp_path / "returned"
    returned.mkdir()
    # more than 10 pieces: they must join in numeric order (part10 after part9, not after part1)
    info = gpu_train.export_weights(str(run), str(returned), piece_bytes=5_000)
    assert len(info["pieces"]) > 10 and all(os.path.getsize(returned / p) <= 5_000 for p in info["pieces"])
    for name in ("metrics.jsonl", "train_config.json"):
        (returned / name).write_text((run / name).read_text())
    gpu_train.unpack(str(returned), str(tmp_path / "unpacked"))
    back = load_pretrained(str(tmp_path / "unpacked" / "model"))
    want = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    got = back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k].to(torch.float16), want[k]), k
    assert (tmp_path / "unpacked" / "metrics.jsonl").exists()

"""The per-byte limits of bench/bench_decode.py: weights counted per level, inner levels weighted by
the share of steps that reached them."""

import math

import pytest

from bench import bench_decode
from hnet_core.official import expected_shapes

from conftest import config_2stage


def test_level_weights_cover_every_tensor_once_and_one_embedding_row():
    config = config_2stage()
    shapes = expected_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    vocab, d0 = shapes["embeddings.weight"]
    per_level = bench_decode.level_weights(config)
    assert len(per_level) == config.num_levels and all(w > 0 for w in per_level)
    assert sum(per_level) == 4 * (total - vocab * d0 + d0)


def test_limits_count_inner_levels_only_on_the_steps_that_reached_them():
    config = config_2stage()
    w = bench_decode.level_weights(config)
    machine = {"bandwidth": 1e9, "matmul": 1e10}
    never = bench_decode.limits(config, {"reached": [0.0, 0.0], "decode_Bps": 100.0}, 1, machine)
    half = bench_decode.limits(config, {"reached": [0.5, 0.25], "decode_Bps": 100.0}, 1, machine)
    assert never["weight_MB_per_step"] * 1e6 == pytest.approx(w[0])
    assert half["weight_MB_per_step"] * 1e6 == pytest.approx(w[0] + 0.5 * w[1] + 0.25 * w[2])
    assert half["limit_bw_Bps"] == pytest.approx(1e9 / (w[0] + 0.5 * w[1] + 0.25 * w[2]))
    batch4 = bench_decode.limits(config, {"reached": [0.5, 0.25], "decode_Bps": 100.0}, 4, machine)
    assert batch4["limit_bw_Bps"] == pytest.approx(4 * half["limit_bw_Bps"])
    assert half["reached_fraction"] == pytest.approx(100.0 / min(half["limit_bw_Bps"], half["limit_flops_Bps"]))

"""HNetConfig reads the official JSON configs unchanged, writes them back, and rejects bad ones clearly."""

import json
import math

import pytest

from hnet_core import OFFICIAL_NAMES, HNetConfig, HNetError, official_config
from hnet_core.official import detect_official

from conftest import FIXTURE_DIR

BASE = {
    "arch_layout": ["m4", ["T1m4", ["T27"], "m4T1"], "m4"],
    "d_model": [1024, 1536, 2048], "d_intermediate": [0, 4096, 5504], "vocab_size": 256,
    "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2},
    "attn_cfg": {"num_heads": [16, 16, 16], "rotary_emb_dim": [32, 48, 64], "window_size": [1023, 1023, -1]},
    "tie_embeddings": False,
}


def test_official_configs_round_trip_unchanged(tmp_path):
    for name in OFFICIAL_NAMES:
        cfg = official_config(name)
        path = tmp_path / f"{name}.json"
        cfg.to_json(path)
        assert json.loads(path.read_text()) == cfg.to_dict()
        assert HNetConfig.from_json(path).to_dict() == cfg.to_dict()


def test_fixture_config_reads_and_writes_back_identically(tmp_path):
    original = json.load(open(f"{FIXTURE_DIR}/config.json"))
    cfg = HNetConfig.from_dict(original)
    assert cfg.to_dict() == original
    assert cfg.num_stages == 1 and cfg.num_levels == 2
    assert cfg.mlp_hidden(1) == 256  # 192 rounded up to a multiple of 128 (official SwiGLU)


def test_unknown_keys_survive_a_round_trip():
    data = dict(BASE, routing_cfg={"multiheaded": False})
    assert HNetConfig.from_dict(data).to_dict()["routing_cfg"] == {"multiheaded": False}


def test_nested_layout_parses_into_levels():
    cfg = HNetConfig.from_dict(BASE)
    assert cfg.num_stages == 2
    assert cfg.levels[0].encoder == ["m"] * 4 and cfg.levels[1].decoder == ["m"] * 4 + ["T"]
    assert cfg.levels[2].main == ["T"] * 27


@pytest.mark.parametrize("change, message", [
    ({"arch_layout": ["m4", ["X2"], "m4"]}, "unknown layer letter 'X'"),
    ({"arch_layout": ["m4", ["T2"]]}, "arch_layout has 2 entries"),
    ({"arch_layout": ["m4", "T2", "m4"]}, "arch_layout[1] must be a list"),
    ({"arch_layout": ["m4", ["T2x"], "m4"]}, "cannot parse 'T2x'"),
    ({"d_model": [1024, 1536]}, "d_model must be a list with one entry per level (3 levels"),
    ({"d_intermediate": [0, 4096]}, "d_intermediate must be a list with one entry per level"),
    ({"attn_cfg": {"num_heads": [16, 16], "rotary_emb_dim": [32, 48, 64], "window_size": [1023, 1023, -1]}},
     "attn_cfg.num_heads must have one entry per level (3)"),
    ({"attn_cfg": {"num_heads": [16, 7, 16], "rotary_emb_dim": [32, 48, 64], "window_size": [1023, 1023, -1]}},
     "attn_cfg.num_heads[1]=7 must divide d_model[1]=1536"),
    ({"d_model": [1024, 960, 2048]}, "d_model[1]=960 is smaller than d_model[0]=1024"),
    ({"d_intermediate": [0, 0, 5504]}, "d_intermediate[1] must be > 0 because level 1 has M/T blocks"),
    ({"ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2, "headdim": 32}},
     "ssm_cfg has unknown key 'headdim'"),
    ({"d_model": [1000, 1536, 2048]}, "must be a multiple of the Mamba2 head dim 64"),
])
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(ValueError) as err:
        HNetConfig.from_dict(dict(BASE, **change))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_field_and_bad_json_are_clear(tmp_path):
    with pytest.raises(HNetError, match="missing required field 'd_model'"):
        HNetConfig.from_dict({k: v for k, v in BASE.items() if k != "d_model"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HNetError, match="is not valid JSON"):
        HNetConfig.from_json(bad)
    with pytest.raises(HNetError, match="config file not found"):
        HNetConfig.from_json(tmp_path / "nope.json")


def test_official_checkpoints_are_recognised_by_their_tensors():
    """Names and shapes come from the model itself (hnet_torch, instantiated on the meta device: no
    memory for 700M+ parameters), not from expected_shapes(), so a mistake in either shows up here."""
    torch = pytest.importorskip("torch")
    from hnet_torch import HNetForCausalLM

    for name in OFFICIAL_NAMES:
        with torch.device("meta"):
            model = HNetForCausalLM(official_config(name))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert len(shapes) > 100 and sum(math.prod(s) for s in shapes.values()) > 600e6, name
        assert detect_official(shapes) == name
        shapes.pop("lm_head.weight")
        assert detect_official(shapes) is None, name  # one tensor missing: not that checkpoint any more


def test_a_checkpoint_of_no_official_config_is_unknown():
    torch = pytest.importorskip("torch")
    weights = torch.load(f"{FIXTURE_DIR}/model.pt", weights_only=True, map_location="meta")
    assert detect_official({k: tuple(v.shape) for k, v in weights.items()}) is None

"""Loading official .pt files and our safetensors directories, and the one-line errors for bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hnet_core import HNetError, mlx_lm_files
from hnet_core.io import INDEX_NAME
import hnet_torch
from hnet_torch import load_pretrained, save_pretrained

from conftest import FIXTURE_DIR, TEXT, config_2stage, random_torch_model
from hnet_core.tokenizer import encode
from precision import relative_error, unflipped_positions

PT = f"{FIXTURE_DIR}/model.pt"
CFG = f"{FIXTURE_DIR}/config.json"


def test_round_trip_official_pt_to_safetensors_dir_is_identical(tmp_path):
    model = load_pretrained(PT, config=CFG)
    save_pretrained(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == sorted(["config.json", "model.safetensors", *mlx_lm_files.EXTRA_FILES])
    reloaded = load_pretrained(tmp_path / "m")
    official = torch.load(PT, weights_only=True)
    assert list(reloaded.state_dict()) == list(official)
    for k, v in official.items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert json.load(open(tmp_path / "m" / "config.json")) == {**json.load(open(CFG)), **mlx_lm_files.config_keys()}  # + the keys mlx-lm reads


def test_saved_directories_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_pretrained(random_torch_model(config_2stage()), tmp_path / "m")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "m").st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(tmp_path / "m" / "config.json").st_mode & 0o777) == oct(0o644)


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = random_torch_model(config_2stage())
    save_pretrained(model, tmp_path / "m", max_shard_bytes=100_000)
    files = os.listdir(tmp_path / "m")
    assert INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 1
    reloaded = load_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v)


def test_save_refuses_to_overwrite_without_force(tmp_path):
    model = random_torch_model(config_2stage())
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(HNetError, match="already exists.*--force"):
        save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m", force=True)


def test_bf16_load_keeps_residual_proj_in_fp32_and_stays_close_to_fp32():
    model = load_pretrained(PT, config=CFG, dtype="bfloat16")
    assert model.embeddings.weight.dtype == torch.bfloat16
    assert model.backbone.residual_proj.weight.dtype == torch.float32
    ids = torch.tensor([encode(TEXT[:100])])
    with torch.no_grad():
        out, ref = model(ids), load_pretrained(PT, config=CFG)(ids)
    keep = unflipped_positions([r.boundary_mask.numpy() for r in ref.routing],
                               [r.boundary_mask.numpy() for r in out.routing], np.ones(tuple(ids.shape), bool))
    assert keep.sum() >= ids.numel() // 2
    lb, lr = out.logits.float().numpy(), ref.logits.numpy()
    assert relative_error(lb, lr, keep) <= 0.03  # as MLX's bf16 (tests/test_convert.py)
    assert relative_error(0.5 * lr, lr, keep) > 0.03  # the same check rejects halved logits


def _save_sd(tmp_path, sd, name="bad.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def test_errors_name_the_problem(tmp_path):
    sd = torch.load(PT, weights_only=True)
    cases = []
    missing = dict(sd)
    missing.pop("backbone.residual_proj.bias")
    cases.append((_save_sd(tmp_path, missing, "missing.pt"), CFG, "missing tensor 'backbone.residual_proj.bias'"))
    extra = dict(sd, **{"backbone.extra.weight": torch.zeros(2)})
    cases.append((_save_sd(tmp_path, extra, "extra.pt"), CFG, "unexpected tensor 'backbone.extra.weight'"))
    wrong = dict(sd, **{"lm_head.weight": torch.zeros(256, 32)})
    cases.append((_save_sd(tmp_path, wrong, "wrong.pt"), CFG, "'lm_head.weight' has shape (256, 32) but the config implies (256, 64)"))
    other_cfg = tmp_path / "other.json"
    other_cfg.write_text(json.dumps(dict(json.load(open(CFG)), d_model=[64, 128])))
    cases.append((PT, str(other_cfg), "the config does not match the weights"))
    cases.append((PT, None, "not one of the official H-Net checkpoints"))
    cases.append((str(tmp_path / "nope.pt"), CFG, "model not found"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(PT, "rb").read()[:50_000])
    cases.append((str(truncated), CFG, "truncated or not a checkpoint"))
    notsd = _save_sd(tmp_path, [torch.zeros(1)], "list.pt")
    cases.append((notsd, CFG, "does not hold a state dict of tensors"))
    for path, cfg, message in cases:
        with pytest.raises(HNetError) as err:
            load_pretrained(path, config=cfg)
        assert message in str(err.value), (path, str(err.value))
        assert "\n" not in str(err.value)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    path = tmp_path / "evil.pt"
    torch.save({"embeddings.weight": Evil()}, path)
    for load in (load_pretrained, hnet_torch.load_weights):
        with pytest.raises(HNetError, match="cannot read|refusing to load it"):
            load(path, config=CFG)


def test_truncated_safetensors_dir_is_reported(tmp_path):
    save_pretrained(load_pretrained(PT, config=CFG), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(HNetError, match="truncated"):
        load_pretrained(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    (tmp_path / "m").mkdir()
    with pytest.raises(HNetError, match="is not a model directory"):
        load_pretrained(tmp_path / "m")


def test_a_directory_with_an_official_pt_and_config_loads():
    model = load_pretrained(FIXTURE_DIR)  # model.pt + config.json, as the official release lays them out
    official = torch.load(PT, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())


def test_init_follows_the_official_scheme():
    from hnet_core import official_config
    from hnet_torch import HNetForCausalLM

    cfg = config_2stage()
    torch.manual_seed(0)
    model = HNetForCausalLM(cfg)
    model.init_weights()
    bb = model.backbone
    assert torch.equal(bb.routing_module.q_proj_layer.weight, torch.eye(32))  # identity kept
    assert torch.count_nonzero(bb.residual_proj.weight) == 0  # zero kept
    assert torch.count_nonzero(bb.main_network.pad_dimension) == 0 if bb.main_network.pad_dimension is not None else True
    assert abs(model.embeddings.weight.std().item() - 1.0) < 0.1
    # out_proj scaled by 1/sqrt(n): n = level-0 enc+dec heights (2) for level 0
    assert abs(bb.encoder.layers[0].mixer.out_proj.weight.std().item() - 0.02 / 2**0.5) < 0.003
    inner_main = bb.main_network.main_network.main_network
    n = 2 + (bb.main_network.encoder.height + bb.main_network.decoder.height) + inner_main.height
    assert abs(inner_main.layers[1].mlp.fc2.weight.std().item() - 0.02 / n**0.5) < 0.003
    assert official_config("hnet_1stage_L").num_stages == 1


def test_lr_multipliers_follow_levels():
    model = random_torch_model(config_2stage())
    mult = model.lr_multipliers([3.0, 1.7, 0.9])
    assert mult["embeddings.weight"] == 3.0 and mult["lm_head.weight"] == 3.0
    assert mult["backbone.encoder.layers.0.mixer.in_proj.weight"] == 3.0
    assert mult["backbone.main_network.routing_module.q_proj_layer.weight"] == 1.7
    assert mult["backbone.main_network.main_network.main_network.layers.0.norm1.weight"] == 0.9
    assert mult["backbone.main_network.main_network.pad_dimension"] == 0.9
    with pytest.raises(HNetError, match="one learning-rate multiplier per level"):
        model.lr_multipliers([1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_and_bf16_checkpoints_load_exactly(tmp_path, dtype):
    # torch.save keeps views as (storage, offset, strides): a transposed weight and a slice of a
    # shared storage must come back as the same values, read straight into the model or cast
    sd = {k: v.to(dtype) for k, v in torch.load(PT, weights_only=True).items()}
    name = "lm_head.weight"
    sd[name] = sd[name].t().contiguous().t()
    assert not sd[name].is_contiguous()
    bias = "backbone.residual_proj.bias"
    sd[bias] = torch.cat([torch.zeros(3, dtype=dtype), sd[bias]])[3:]  # offset into a longer storage
    path = _save_sd(tmp_path, sd, "strided.pt")
    for model_dtype in ("float32", "bfloat16"):
        state = load_pretrained(path, config=CFG, dtype=model_dtype).state_dict()
        for k, v in sd.items():
            assert torch.equal(state[k].float(), v.to(state[k].dtype).float()), (k, model_dtype)

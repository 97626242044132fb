"""The official checkpoints: their shipped configs, the tensor names and shapes a config implies,
and recognising a checkpoint from its tensors alone.

`expected_shapes(config)` is the framework-free statement of the official state-dict layout
(torch names and torch shapes); the tests hold both backends to it.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from .config import MAMBA_HEADDIM, HNetConfig
from .errors import HNetError

OFFICIAL_NAMES = (
    "hnet_1stage_L",
    "hnet_2stage_L",
    "hnet_1stage_XL",
    "hnet_2stage_XL",
    "hnet_2stage_XL_chinese",
    "hnet_2stage_XL_code",
)


def official_config(name: str) -> HNetConfig:
    if name not in OFFICIAL_NAMES:
        raise HNetError(f"unknown official model {name!r}; known: {', '.join(OFFICIAL_NAMES)}")
    text = resources.files("hnet_core").joinpath("configs", name + ".json").read_text(encoding="utf-8")
    return HNetConfig.from_dict(json.loads(text))


def _block_shapes(prefix: str, letter: str, d: int, config: HNetConfig, level: int) -> dict[str, tuple]:
    out: dict[str, tuple] = {prefix + "norm1.weight": (d,)}
    if letter in "mM":
        s = config.ssm_cfg.at(level)
        d_inner = s["expand"] * d
        nheads = d_inner // MAMBA_HEADDIM
        conv_dim = d_inner + 2 * s["d_state"]
        out.update({
            prefix + "mixer.dt_bias": (nheads,),
            prefix + "mixer.A_log": (nheads,),
            prefix + "mixer.D": (nheads,),
            prefix + "mixer.in_proj.weight": (2 * d_inner + 2 * s["d_state"] + nheads, d),
            prefix + "mixer.conv1d.weight": (conv_dim, 1, s["d_conv"]),
            prefix + "mixer.conv1d.bias": (conv_dim,),
            prefix + "mixer.norm.weight": (d_inner,),
            prefix + "mixer.out_proj.weight": (d, d_inner),
        })
    else:
        out.update({prefix + "mixer.Wqkv.weight": (3 * d, d), prefix + "mixer.out_proj.weight": (d, d)})
    if letter in "MT":
        h = config.mlp_hidden(level)
        out.update({prefix + "norm2.weight": (d,), prefix + "mlp.fc1.weight": (2 * h, d), prefix + "mlp.fc2.weight": (d, h)})
    return out


def _isotropic_shapes(prefix: str, letters: list[str], d: int, config: HNetConfig, level: int) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for i, letter in enumerate(letters):
        out.update(_block_shapes(f"{prefix}layers.{i}.", letter, d, config, level))
    out[prefix + "rmsnorm.weight"] = (d,)
    return out


def _hnet_shapes(prefix: str, config: HNetConfig, level: int) -> dict[str, tuple]:
    d = config.d_model[level]
    lv = config.levels[level]
    out: dict[str, tuple] = {}
    if level > 0 and d > config.d_model[level - 1]:
        out[prefix + "pad_dimension"] = (d - config.d_model[level - 1],)
    if lv.is_innermost:
        out.update(_isotropic_shapes(prefix + "main_network.", lv.main, d, config, level))
        return out
    out.update(_isotropic_shapes(prefix + "encoder.", lv.encoder, d, config, level))
    out.update(_hnet_shapes(prefix + "main_network.", config, level + 1))
    out.update(_isotropic_shapes(prefix + "decoder.", lv.decoder, d, config, level))
    out.update({
        prefix + "routing_module.q_proj_layer.weight": (d, d),
        prefix + "routing_module.k_proj_layer.weight": (d, d),
        prefix + "residual_proj.weight": (d, d),
        prefix + "residual_proj.bias": (d,),
    })
    return out


def expected_shapes(config: HNetConfig) -> dict[str, tuple]:
    """Official state-dict names -> torch shapes, in the official order."""
    v, d0 = config.vocab_size, config.d_model[0]
    out: dict[str, tuple] = {"embeddings.weight": (v, d0)}
    out.update(_hnet_shapes("backbone.", config, 0))
    out["lm_head.weight"] = (v, d0)
    return out


def detect_official(shapes: dict[str, tuple]) -> str | None:
    """Name of the official checkpoint whose tensor names and shapes equal `shapes`, else None."""
    want = {k: tuple(v) for k, v in shapes.items()}
    for name in OFFICIAL_NAMES:
        if expected_shapes(official_config(name)) == want:
            return name
    return None


def config_for_weights(shapes: dict[str, tuple], config_path: str | os.PathLike | None) -> HNetConfig:
    """The config to use for a weights file: the given JSON, or the recognised official one."""
    if config_path is not None:
        return HNetConfig.from_json(config_path)
    name = detect_official(shapes)
    if name is None:
        raise HNetError(
            "these weights are not one of the official H-Net checkpoints "
            f"({', '.join(OFFICIAL_NAMES)}); pass the model's config JSON with --config"
        )
    return official_config(name)


def check_shapes(config: HNetConfig, shapes: dict[str, tuple], source: str) -> None:
    """Raise one clear line for the first missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(config)
    for k in want:
        if k not in shapes:
            raise HNetError(f"{source} is missing tensor {k!r} required by the config; is the config right for these weights?")
    for k in shapes:
        if k not in want:
            raise HNetError(f"{source} has unexpected tensor {k!r} not in this config; is the config right for these weights?")
    for k, shape in want.items():
        if tuple(shapes[k]) != tuple(shape):
            raise HNetError(
                f"{source}: tensor {k!r} has shape {tuple(shapes[k])} but the config implies {tuple(shape)}; "
                "the config does not match the weights"
            )

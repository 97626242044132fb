"""LoRA adapters on the Linear layers of an MLX H-Net, and `hnet-mlx fuse` to merge them (MLX-specific:
LoRA fine-tuning is `hnet-mlx finetune`'s; the torch trainer fine-tunes all weights, so no torch twin).

    n = apply_lora(model, rank=8, layers=("in_proj", "out_proj", "Wqkv", "fc1", "fc2"), scale=2.0)
    ... train: only lora_a / lora_b are trainable ...
    save_adapters(model, "adapters/", settings)
    fused = fuse_lora(model)                   # plain Linear layers again: W + scale * (A B)^T

A LoRA layer computes  y = W x + scale * B^T (A^T x)  with A (in, r) drawn uniform in
+-1/sqrt(in) and B (r, out) zero, so an adapted model starts out identical to its base (Hu et al.
2021). `--lora-layers` names the Linear layers to adapt by attribute name (Mamba2 in_proj /
out_proj, attention Wqkv / out_proj, SwiGLU fc1 / fc2 by default; also q_proj_layer,
k_proj_layer, residual_proj, lm_head, or `all`).

Adapter directory: `adapters.safetensors` (the lora_a / lora_b arrays by module path) and
`adapter_config.json` (base model, rank, scale, layers). `hnet-mlx fuse --adapters DIR` writes a
plain model directory (torch layout, loadable by hnet_torch and hnet_mlx alike).
"""

from __future__ import annotations

import json
import math
import os

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from hnet_core import checkpoint as ckpt
from hnet_core import io
from hnet_core.errors import HNetError

DEFAULT_LAYERS = ("in_proj", "out_proj", "Wqkv", "fc1", "fc2")
ALL_LAYERS = DEFAULT_LAYERS + ("q_proj_layer", "k_proj_layer", "residual_proj", "lm_head")
ADAPTERS_NAME = "adapters.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        self.base = base
        self.scale = scale
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        update = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.base(x) + (self.scale * update).astype(x.dtype)

    def fused(self) -> nn.Linear:
        w = self.base.weight
        delta = (self.scale * (self.lora_a @ self.lora_b)).T  # (out, in)
        has_bias = "bias" in self.base
        out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        out.weight = (w.astype(mx.float32) + delta).astype(w.dtype)
        if has_bias:
            out.bias = self.base.bias
        return out


def parse_layers(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_LAYERS
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if names == ("all",):
        return ALL_LAYERS
    unknown = [n for n in names if n not in ALL_LAYERS]
    if unknown:
        raise HNetError(f"--lora-layers: unknown layer {unknown[0]!r}; choose from {', '.join(ALL_LAYERS)} or all")
    return names


def _children(model: nn.Module):
    """(parent, attribute, module path) of every Linear reachable as an attribute."""
    for path, module in model.named_modules():
        for key, child in module.children().items():
            if isinstance(child, nn.Linear) and not isinstance(module, LoRALinear):
                yield module, key, f"{path}.{key}" if path else key


def apply_lora(model: nn.Module, rank: int, layers: tuple[str, ...] = DEFAULT_LAYERS, scale: float = 2.0) -> list[str]:
    """Wrap the chosen Linear layers in LoRALinear, freeze everything else; returns the adapted paths."""
    if rank < 1:
        raise HNetError(f"--lora-rank must be >= 1, got {rank}")
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        raise HNetError("LoRA here needs a float model; convert the checkpoint without -q/--quantize")
    model.freeze()
    adapted = []
    for parent, key, path in list(_children(model)):
        if key in layers:
            setattr(parent, key, LoRALinear(getattr(parent, key), rank, scale))
            adapted.append(path)
    if not adapted:
        raise HNetError(f"--lora-layers {','.join(layers)} matches no Linear layer of this model")
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return adapted


def fuse_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear with the merged weight (in place)."""
    for _, module in list(model.named_modules()):
        for key, child in list(module.children().items()):
            if isinstance(child, LoRALinear):
                setattr(module, key, child.fused())
    model.unfreeze()
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def save_adapters(model: nn.Module, directory: str, settings: dict) -> None:
    """Write adapters.safetensors + adapter_config.json into an existing directory."""
    mx.save_safetensors(os.path.join(directory, ADAPTERS_NAME), adapter_weights(model), metadata={"format": "hnet-lora"})
    io.atomic_write_text(os.path.join(directory, ADAPTER_CONFIG_NAME), json.dumps(settings, indent=2) + "\n")


def read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.exists(path):
        raise HNetError(f"{directory} holds no LoRA adapters ({ADAPTER_CONFIG_NAME} missing); "
                        "pass a finetune --out directory, its adapters/ folder or a checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HNetError(f"{path} is not valid JSON ({e})") from None


def load_adapters(model: nn.Module, directory: str) -> None:
    path = os.path.join(directory, ADAPTERS_NAME)
    if not os.path.exists(path):
        raise HNetError(f"adapter weights not found: {path}")
    weights = mx.load(path)
    mine = adapter_weights(model)
    if sorted(weights) != sorted(mine):
        raise HNetError(f"{path} does not fit this model's LoRA layers (rank/layers differ from adapter_config.json?)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise HNetError(f"{path}: {k} has shape {tuple(v.shape)}, this model needs {tuple(mine[k].shape)}")
    model.update(tree_unflatten(list(weights.items())))


def find_adapter_dir(path: str) -> str:
    """A finetune run directory (its adapters/ or latest checkpoint), or an adapter directory itself."""
    for candidate in (path, os.path.join(path, "adapters")):
        if os.path.exists(os.path.join(candidate, ADAPTER_CONFIG_NAME)):
            return candidate
    latest = ckpt.latest_checkpoint(path)
    if latest and os.path.exists(os.path.join(latest, ADAPTER_CONFIG_NAME)):
        return latest
    raise HNetError(f"no LoRA adapters found in {path}; pass a finetune --out directory or an adapter folder")


def load_adapted(model_path: str | None, adapter_dir: str):
    """(adapted model, adapter settings): the base model with the adapters of `adapter_dir` applied."""
    from .loading import load_pretrained

    settings = read_adapter_config(adapter_dir)
    base = model_path or settings.get("base_model")
    if not base:
        raise HNetError("the adapter config names no base model; pass --model BASE")
    model = load_pretrained(base)
    apply_lora(model, int(settings["rank"]), tuple(settings["layers"]), float(settings["scale"]))
    load_adapters(model, adapter_dir)
    return model, settings


def write_torch_layout_model(model, directory: str, force: bool = False) -> None:
    """A plain model directory in torch layout: hnet_torch.load_pretrained and hnet_mlx.load both read it."""
    from .loading import ordered_weights, torch_layout, write_model_dir

    weights = torch_layout(ordered_weights(model))
    with io.atomic_directory(directory, force=force) as tmp:
        write_model_dir(tmp, weights, model.config, "pt")


@click.command("fuse")
@click.option("--adapters", "adapters", required=True,
              help="LoRA adapters: a finetune --out directory, its adapters/ folder or a checkpoint.")
@click.option("--model", "model_path", default=None, help="Base model directory (default: the one the adapters name).")
@click.option("--out", "out", required=True, help="Output model directory.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def fuse_command(adapters: str, model_path: str | None, out: str, force: bool) -> None:
    """Merge LoRA adapters into their base model and write a plain model directory."""
    adapter_dir = find_adapter_dir(adapters)
    model, settings = load_adapted(model_path, adapter_dir)
    fuse_lora(model)
    write_torch_layout_model(model, out, force=force)
    click.echo(f"fused {len(settings.get('adapted', []))} LoRA layers (rank {settings['rank']}) into {out}")

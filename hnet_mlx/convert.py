"""`hnet convert`: H-Net weights between PyTorch and MLX (MLX-specific; no torch twin).

    hnet convert torch-to-mlx hnet_2stage_XL.pt mlx_model/                 # official checkpoint
    hnet convert torch-to-mlx cartesia-ai/hnet_2stage_XL mlx_model/ -q      # HF repo id, 4-bit
    hnet convert torch-to-mlx torch_dir/ mlx_model/ --dtype bfloat16
    hnet convert mlx-to-torch mlx_model/ torch_dir/

SRC for torch-to-mlx is an official `.pt` state dict (config recognised for the six official
checkpoints, else pass --config), one of our torch safetensors model directories, or a Hugging
Face repo id (fetched with huggingface_hub into its cache; HF_HUB_OFFLINE=1 uses the cache only).
Layout changes happen in `loading.sanitize` / `loading.torch_layout` only. Quantization is MLX's
own `nn.quantize` (affine, per-group scales and biases) of the Linear layers `loading.quantizable`
picks, recorded in config.json so `hnet_mlx.load` needs no flags. DST is written atomically and
never overwritten without --force. mlx-to-torch moves axes only, so fp32 round trips are bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import click
import mlx.core as mx
import numpy as np

from hnet_core import io
from hnet_core.checkpoint import resolve_model_path
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.official import check_shapes, config_for_weights

from . import loading
from .lm import HNetForCausalLM

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.uint32: "uint32"}


@dataclass
class ConversionSummary:
    """What the summary table shows (also returned by the Python functions, for tests and scripts)."""

    source: str
    destination: str
    parameters: int
    dtypes: list[str]
    disk_bytes: int
    config: HNetConfig
    quantization: dict | None = None
    notes: list[str] = field(default_factory=list)


# -- reading the source -------------------------------------------------------------------------


def _read_pt(path: str) -> dict[str, mx.array]:
    """An official .pt state dict, read without torch by hnet_core.torch_zip (which refuses anything
    but tensors); bf16 comes back as fp32 and is cast back exactly."""
    from hnet_core.torch_zip import read_state_dict

    if not os.path.exists(path):
        raise HNetError(f"checkpoint not found: {path}")
    out = {}
    for name, tensor in read_state_dict(path).items():
        array = mx.array(tensor.array)
        out[name] = array.astype(mx.bfloat16) if tensor.dtype == "bfloat16" else array
    return out


def _checkpoint_in(directory: str) -> str:
    """The single .pt-like file of a downloaded repo."""
    found = sorted(f for f in os.listdir(directory) if f.endswith(loading.TORCH_SUFFIXES))
    if len(found) != 1:
        raise HNetError(f"{directory} holds {len(found)} PyTorch checkpoint files ({', '.join(found) or 'none'}) "
                        "and no model.safetensors; expected exactly one")
    return os.path.join(directory, found[0])


def read_source(src: str, config_path: str | None = None, revision: str | None = None
                ) -> tuple[dict[str, mx.array], HNetConfig, str]:
    """(weights in MLX layout, config, description) from a .pt, a model directory or a HF repo id."""
    src = resolve_model_path(src)  # a training run directory -> its final model or newest checkpoint
    description = src
    if not os.path.exists(src):
        if loading.looks_like_repo_id(src):
            directory = loading.fetch_hf_repo(src, revision)
            description = f"{src} (Hugging Face, {directory})"
            src = directory if io.is_model_dir(directory) else _checkpoint_in(directory)
            if config_path is None and not io.is_model_dir(directory):
                candidate = os.path.join(directory, io.CONFIG_NAME)
                config_path = candidate if os.path.exists(candidate) else None
        else:
            raise HNetError(f"source not found: {src} (give a .pt checkpoint, a model directory or a Hugging Face repo id)")
    if os.path.isdir(src):
        if not io.is_model_dir(src):
            raise HNetError(f"{src} is not a model directory (expected {io.CONFIG_NAME} and {io.WEIGHTS_NAME})")
        weights = loading.read_safetensors_dir(src)
        config = HNetConfig.from_json(config_path or os.path.join(src, io.CONFIG_NAME))
    elif src.endswith(".safetensors"):
        io.read_safetensors_header(src)
        weights = dict(mx.load(src))
        config = config_for_weights({k: tuple(v.shape) for k, v in loading.torch_layout(weights).items()}, config_path)
    else:
        weights = _read_pt(src)
        config = config_for_weights({k: tuple(v.shape) for k, v in weights.items()}, config_path)
    if config.quantization is not None:
        raise HNetError(f"{src} is already quantized; convert the original (unquantized) checkpoint instead")
    weights = loading.sanitize(weights)
    check_shapes(config, loading.logical_shapes(weights, None), src)
    return weights, config, description


# -- converting -------------------------------------------------------------------------------


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    console=Console(stderr=True), transient=False)


def _summary(source: str, destination: str, weights: dict[str, mx.array], config: HNetConfig,
             disk_bytes: int, quantization: dict | None) -> ConversionSummary:
    logical = loading.logical_shapes(weights, quantization)
    parameters = sum(int(np.prod(s)) for s in logical.values())
    dtypes = sorted({DTYPE_NAMES.get(w.dtype, str(w.dtype)) for w in weights.values() if w.dtype != mx.uint32})
    if quantization is not None:
        dtypes.append("quantized weights packed in uint32")
    return ConversionSummary(source, destination, parameters, dtypes, disk_bytes, config, quantization)


def torch_to_mlx(src: str, dst: str, config: str | None = None, dtype: str | None = None, quantize: bool = False,
                 q_bits: int = 4, q_group_size: int = 64, q_embedding: bool = False, q_lm_head: bool = False,
                 force: bool = False, revision: str | None = None, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES,
                 progress: bool = False) -> ConversionSummary:
    """Convert `src` (see module docstring) into an MLX model directory `dst`."""
    if q_bits not in (4, 8):
        raise HNetError(f"--q-bits must be 4 or 8, got {q_bits}")
    if q_group_size not in (32, 64, 128):
        raise HNetError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
    target = loading.resolve_dtype(dtype)
    _check_destination(dst, force)
    weights, cfg, description = read_source(src, config, revision)
    if target is not None:
        weights = loading.cast_weights(weights, target)
    quantization = None
    if quantize:
        quantization = {"group_size": q_group_size, "bits": q_bits, "mode": "affine",
                        "embedding": q_embedding, "lm_head": q_lm_head}
        model = HNetForCausalLM(cfg)
        model.load_weights([(k, v) for k, v in weights.items() if not (cfg.tie_embeddings and k == "lm_head.weight")],
                           strict=True)
        loading.quantize_model(model, quantization)
        cfg = HNetConfig.from_dict({**cfg.to_dict(), "quantization": quantization})
        model.config = cfg
        weights = loading.ordered_weights(model)
    size = _write(dst, weights, cfg, "mlx", force, max_shard_bytes, progress)
    return _summary(description, dst, weights, cfg, size, quantization)


def mlx_to_torch(src: str, dst: str, force: bool = False, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES,
                 progress: bool = False) -> ConversionSummary:
    """Convert an MLX model directory back to our torch safetensors directory (bit-identical)."""
    _check_destination(dst, force)
    weights, cfg = loading.load_weights(src)
    if cfg.quantization is not None:
        raise HNetError(f"{src} is quantized ({cfg.quantization.get('bits')}-bit); mlx-to-torch needs an unquantized "
                        "model: convert the original checkpoint again without -q")
    weights = loading.torch_layout(weights)
    size = _write(dst, weights, cfg, "pt", force, max_shard_bytes, progress)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in weights.items()}, dst)
    return _summary(src, dst, weights, cfg, size, None)


def _write(dst: str, weights: dict[str, mx.array], cfg: HNetConfig, fmt: str, force: bool, max_shard_bytes: int,
           progress: bool) -> int:
    """Compute every tensor (casts, quantization: MLX is lazy) with a progress bar, then write DST atomically."""
    bar = _progress() if progress else None
    with io.atomic_directory(dst, force=force) as tmp:
        if bar is None:
            mx.eval(list(weights.values()))
            return loading.write_model_dir(tmp, weights, cfg, fmt, max_shard_bytes)
        with bar:
            task = bar.add_task("converting tensors", total=len(weights))
            for w in weights.values():
                mx.eval(w)
                bar.advance(task)
            task = bar.add_task("writing safetensors", total=len(weights))
            return loading.write_model_dir(tmp, weights, cfg, fmt, max_shard_bytes,
                                           on_tensor=lambda n: bar.advance(task, n))


def _check_destination(dst: str, force: bool) -> None:
    """Refuse early (before any reading) to overwrite a non-empty DST without --force."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise HNetError(f"output path {dst} exists and is not a directory; choose another path")
    io.check_output_path(dst, "output directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise HNetError(f"output directory {dst} already exists and is not empty; pass --force to overwrite it")


# -- the click group ----------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_summary(summary: ConversionSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = summary.config
    table = Table(title="converted", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("source", summary.source)
    table.add_row("destination", summary.destination)
    table.add_row("parameters", f"{summary.parameters:,}")
    table.add_row("dtype", ", ".join(summary.dtypes))
    q = summary.quantization
    table.add_row("quantization", "none" if q is None else
                  f"{q['bits']}-bit, group {q['group_size']} (embedding: {'yes' if q['embedding'] else 'no'}, "
                  f"lm_head: {'yes' if q['lm_head'] else 'no'})")
    table.add_row("size on disk", _human_bytes(summary.disk_bytes))
    table.add_row("stages", str(cfg.num_stages))
    for level, layout in enumerate(cfg.levels):
        if layout.is_innermost:
            layers = f"main {''.join(layout.main)}"
        else:
            layers = f"encoder {''.join(layout.encoder)}, decoder {''.join(layout.decoder)}"
        table.add_row(f"level {level}", f"d_model {cfg.d_model[level]}: {layers}")
    Console().print(table)


def _run(fn, *args, **kwargs) -> None:
    try:
        print_summary(fn(*args, **kwargs))
    except HNetError as e:
        raise click.ClickException(str(e)) from None


@click.group(name="convert")
def convert() -> None:
    """Convert H-Net weights between PyTorch and MLX."""


@convert.command("torch-to-mlx")
@click.argument("src")
@click.argument("dst")
@click.option("--config", "config_path", default=None, help="Model config JSON (not needed for the official checkpoints).")
@click.option("--dtype", type=click.Choice(sorted(loading.DTYPES)), default=None,
              help="Cast float weights (default: keep the source dtype). residual_proj stays float32.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize Linear layers with MLX's affine quantization.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default=None, help="Bits per weight (default 4).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default=None, help="Group size (default 64).")
@click.option("--q-embedding/--no-q-embedding", default=False, help="Also quantize the byte embedding.")
@click.option("--q-lm-head/--no-q-lm-head", default=False, help="Also quantize the LM head.")
@click.option("--revision", default=None, help="Hugging Face revision (branch, tag or commit) for a repo id SRC.")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
def torch_to_mlx_command(src, dst, config_path, dtype, quantize, q_bits, q_group_size, q_embedding, q_lm_head,
                         revision, force) -> None:
    """Convert an official .pt, a torch model directory or a HF repo id SRC into an MLX model directory DST."""
    if not quantize and (q_bits or q_group_size or q_embedding or q_lm_head):
        raise click.UsageError("--q-bits / --q-group-size / --q-embedding / --q-lm-head need -q/--quantize")
    _run(torch_to_mlx, src, dst, config=config_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits or 4),
         q_group_size=int(q_group_size or 64), q_embedding=q_embedding, q_lm_head=q_lm_head, force=force,
         revision=revision, progress=True)


@convert.command("mlx-to-torch")
@click.argument("src")
@click.argument("dst")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
def mlx_to_torch_command(src, dst, force) -> None:
    """Convert an MLX model directory SRC into a torch model directory DST (loads with hnet_torch)."""
    _run(mlx_to_torch, src, dst, force=force, progress=True)

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
Both directions stream: one source tensor is read, converted and written at a time (`_write`), so
memory holds about one tensor whatever the model's size (docs/checkpoints.md, "Memory").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import click
import mlx.core as mx
import numpy as np

from hnet_core import io, mlx_lm_files
from hnet_core.checkpoint import resolve_model_path
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.official import check_shapes, config_for_weights
from hnet_core.safetensors_writer import TensorSpec, write_safetensors
from hnet_core.stored_tensor import StoredTensor, safetensors_entries

from . import loading

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.uint32: "uint32"}
# stored dtype name <-> MLX dtype (a float64 tensor becomes float32: MLX computes in float32 at most)
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "uint32": mx.uint32,
             "int64": mx.int64, "int32": mx.int32, "int16": mx.int16, "int8": mx.int8, "uint8": mx.uint8,
             "bool": mx.bool_}
STORED_NAMES = {dtype: name for name, dtype in MX_DTYPES.items()}


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


def _read_pt(path: str) -> Loaders:
    """An official .pt state dict, read without torch by hnet_core.torch_zip (which refuses anything
    but tensors and reads no tensor data yet)."""
    from hnet_core.torch_zip import read_state_dict

    if not os.path.exists(path):
        raise HNetError(f"checkpoint not found: {path}")
    return Loaders(read_state_dict(path))


def _read_safetensors(paths: list[str]) -> Loaders:
    stored: dict[str, StoredTensor] = {}
    for path in paths:
        stored.update(safetensors_entries(path, io.read_safetensors_header(path)))
    return Loaders(stored)


class Loaders(dict):
    """Source weights, one tensor at a time: the dict holds lazy MLX stand-ins of the right shape and
    dtype (never evaluated: recognising the config, checking shapes and planning the output need
    nothing more) and `load(name)` reads the real tensor from the file."""

    def __init__(self, stored: dict[str, StoredTensor]):
        super().__init__({name: mx.zeros(t.shape, MX_DTYPES.get(t.dtype, mx.float32)) for name, t in stored.items()})
        self.stored = stored

    def load(self, name: str) -> mx.array:
        stored = self.stored[name]
        array = stored.read()  # as stored: bf16 arrives as its uint16 bits
        if stored.dtype == "float64":  # MLX computes in float32 at most
            return mx.array(array.astype(np.float32))
        array = mx.array(array)
        return array.view(mx.bfloat16) if stored.dtype == "bfloat16" else array


def _checkpoint_in(directory: str) -> str:
    """The single .pt-like file of a downloaded repo."""
    found = sorted(f for f in os.listdir(directory) if f.endswith(loading.TORCH_SUFFIXES))
    if len(found) != 1:
        raise HNetError(f"{directory} holds {len(found)} PyTorch checkpoint files ({', '.join(found) or 'none'}) "
                        "and no model.safetensors; expected exactly one")
    return os.path.join(directory, found[0])


def read_source(src: str, config_path: str | None = None, revision: str | None = None
                ) -> tuple[Loaders, HNetConfig, str]:
    """(source weights as `Loaders`, config, description) from a .pt, a model directory or a HF repo id;
    shapes are checked, no tensor data is read yet."""
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
        weights = _read_safetensors(io.weight_files(src))
        config = HNetConfig.from_json(config_path or os.path.join(src, io.CONFIG_NAME))
    elif src.endswith(".safetensors"):
        weights = _read_safetensors([src])
        config = config_for_weights({k: tuple(v.shape) for k, v in loading.torch_layout(weights).items()}, config_path)
    else:
        weights = _read_pt(src)
        config = config_for_weights({k: tuple(v.shape) for k, v in weights.items()}, config_path)
    if config.quantization is not None:
        raise HNetError(f"{src} is already quantized; convert the original (unquantized) checkpoint instead")
    check_shapes(config, loading.logical_shapes(loading.sanitize(weights), None), src)
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
    """Convert `src` (see module docstring) into an MLX model directory `dst`, one tensor at a time."""
    if q_bits not in (4, 8):
        raise HNetError(f"--q-bits must be 4 or 8, got {q_bits}")
    if q_group_size not in (32, 64, 128):
        raise HNetError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
    target = loading.resolve_dtype(dtype)
    _check_destination(dst, force)
    weights, cfg, description = read_source(src, config, revision)
    quantization, layers = None, set()
    if quantize:
        quantization = {"group_size": q_group_size, "bits": q_bits, "mode": "affine",
                        "embedding": q_embedding, "lm_head": q_lm_head}
        if (q_embedding or q_lm_head) and cfg.d_model[0] % q_group_size:
            raise HNetError(f"--q-embedding / --q-lm-head need the outer width d_model[0] = {cfg.d_model[0]} to be a "
                            f"multiple of --q-group-size {q_group_size}; pick a group size that divides it")
        layers = loading.quantized_layers(cfg, quantization)
        cfg = HNetConfig.from_dict({**cfg.to_dict(), "quantization": quantization})

    def convert_one(name: str, w: mx.array) -> dict[str, mx.array]:
        w = loading.sanitize({name: w})[name]
        if target is not None:
            w = loading.cast_weights({name: w}, target)[name]
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer in layers:
            return {f"{layer}.{part}": a for part, a in loading.quantize_weight(w, quantization).items()}
        return {name: w}

    sources = {name: name for name in weights}
    if cfg.tie_embeddings:  # the model has no lm_head: the file's lm_head is the embedding (as the model saves it)
        sources["lm_head.weight"] = "embeddings.weight"
        tied = convert_one

        def convert_one(name: str, w: mx.array) -> dict[str, mx.array]:
            if name == "lm_head.weight":
                return {name: tied("embeddings.weight", w)["embeddings.weight"]}
            return tied(name, w)

    outputs, size = _write(dst, weights, sources, convert_one, cfg, "mlx", force, max_shard_bytes, progress)
    return _summary(description, dst, outputs, cfg, size, quantization)


def mlx_to_torch(src: str, dst: str, force: bool = False, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES,
                 progress: bool = False) -> ConversionSummary:
    """Convert an MLX model directory back to our torch safetensors directory (bit-identical)."""
    _check_destination(dst, force)
    directory = resolve_model_path(src)
    if loading.looks_like_repo_id(directory):
        directory = loading.fetch_hf_repo(directory)
    _, cfg = loading.load_weights(directory)  # a model directory, its config and every shape checked (lazily)
    if cfg.quantization is not None:
        raise HNetError(f"{src} is quantized ({cfg.quantization.get('bits')}-bit); mlx-to-torch needs an unquantized "
                        "model: convert the original checkpoint again without -q")
    weights = _read_safetensors(io.weight_files(directory))
    outputs, size = _write(dst, weights, {name: name for name in weights},
                           lambda name, w: loading.torch_layout({name: w}), cfg, "pt", force, max_shard_bytes, progress)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in outputs.items()}, dst)
    return _summary(src, dst, outputs, cfg, size, None)


def _write(dst: str, weights: Loaders, sources: dict[str, str], convert_one, cfg: HNetConfig, fmt: str, force: bool,
           max_shard_bytes: int, progress: bool) -> tuple[dict[str, mx.array], int]:
    """Write DST atomically, computing one source tensor's outputs at a time: `convert_one(name, w)`
    maps source tensor `sources[name]` to its output tensors. It runs once on the lazy stand-ins to
    plan the files (names, shapes, dtypes, shards), then once per tensor on the real data, which is
    dropped as soon as it is written. Returns (the outputs as stand-ins, bytes written)."""
    planned = {}
    for name, source in sources.items():
        planned.update({out: (name, a) for out, a in convert_one(name, weights[source]).items()})
    order = loading.ordered_names(list(planned), cfg)
    outputs = {out: planned[out][1] for out in order}
    specs = {out: TensorSpec(out, STORED_NAMES[a.dtype], tuple(a.shape)) for out, a in outputs.items()}
    shards = io.plan_shards({out: spec.nbytes for out, spec in specs.items()}, max_shard_bytes)
    names = io.shard_file_names(len(shards))
    current: dict = {"name": None, "outputs": {}}
    bar = _progress() if progress else None
    task = bar.add_task("converting tensors", total=len(specs)) if bar is not None else None

    def data(spec: TensorSpec) -> memoryview:
        name = planned[spec.name][0]
        if current["name"] != name:  # the next source tensor: read it, convert it, drop the last one
            current["name"], current["outputs"] = None, {}
            mx.clear_cache()  # MLX keeps freed buffers for reuse; a converter never reuses them
            computed = convert_one(name, weights.load(sources[name]))
            mx.eval(list(computed.values()))
            current["name"], current["outputs"] = name, computed
        array = current["outputs"].pop(spec.name)
        if bar is not None:
            bar.advance(task)
        # numpy reads MLX's buffer (bf16 as its bits) and copies only what is strided (a moved conv1d axis)
        return memoryview(np.ascontiguousarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array))

    with io.atomic_directory(dst, force=force) as tmp, (bar or contextlib.nullcontext()):
        weight_map = {}
        for shard, file_name in zip(shards, names):
            write_safetensors(os.path.join(tmp, file_name), [specs[out] for out in shard], data, {"format": fmt})
            weight_map.update({out: file_name for out in shard})
        if len(shards) > 1:
            io.write_index(tmp, weight_map, sum(spec.nbytes for spec in specs.values()))
        mlx_lm_files.write_model_files(tmp, cfg.to_dict())  # config.json + what mlx-lm needs beside it
        size = sum(os.path.getsize(os.path.join(tmp, n)) for n in names)
    return outputs, size


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

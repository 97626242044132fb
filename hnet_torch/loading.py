"""Loading and saving weights: official `.pt` state dicts and our safetensors model directory.

    model = load_pretrained("hnet_2stage_XL.pt")                    # official; config recognised
    model = load_pretrained("model.pt", config="config.json")
    model = load_pretrained("model_dir/")                           # config.json + model.safetensors
    save_pretrained(model, "model_dir/")                            # atomic, sharded above 5 GB

`.pt` files are read with hnet_core.torch_zip's restricted unpickler (tensors only; a legacy pre-zip
file with `torch.load(weights_only=True)`): never unpickle untrusted data. `load_pretrained` reads
one tensor at a time into the model's own storage, so it needs the model's memory plus one tensor.
Every problem (missing file, truncated file, wrong tensors, wrong config) is one HNetError line.
"""

from __future__ import annotations

import math
import os
import zipfile

import torch

from hnet_core import io, mlx_lm_files
from hnet_core.checkpoint import resolve_model_path
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.official import check_shapes, config_for_weights
from hnet_core.stored_tensor import StoredTensor, safetensors_entries
from hnet_core.torch_zip import read_state_dict as _read_zip_checkpoint

from .lm import HNetForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# stored dtype name -> torch dtype; bf16 has no numpy twin, so its bits are read through an int16 view
STORED_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                 "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool, "uint32": torch.uint32}
BITS = {torch.bfloat16: torch.int16}
DIRECT_BUILD_MAX_PARAMETERS = 16_000_000  # load_pretrained: larger models are built on the meta device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise HNetError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def read_torch_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a `.pt` file (weights_only), with one-line errors."""
    if not os.path.exists(path):
        raise HNetError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated zip, not a torch file, or a pickle that weights_only refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HNetError(f"cannot read {path} as a PyTorch state dict (truncated or not a checkpoint?): {reason[:160]}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # a training checkpoint wrapping the state dict
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HNetError(f"{path} does not hold a state dict of tensors")
    return data


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in io.weight_files(directory):
        io.read_safetensors_header(path)  # clear error for truncated files before safetensors' own
        try:
            tensors.update(load_file(path))
        except Exception as e:
            raise HNetError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    return tensors


def _checkpoint_path(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None
                     ) -> tuple[str, str | os.PathLike | HNetConfig | None]:
    """(file or model directory to read, config) for a path the user gave."""
    path = resolve_model_path(path)  # a training run directory -> its final model or newest checkpoint
    if not os.path.exists(path):
        raise HNetError(f"model not found: {path} (give a model directory or a .pt checkpoint)")
    if os.path.isdir(path) and not io.is_model_dir(path):
        # A directory holding one official checkpoint (model.pt) and, optionally, its config.json.
        pts = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".pth", ".bin")))
        if len(pts) != 1:
            raise HNetError(f"{path} is not a model directory (expected {io.CONFIG_NAME} and {io.WEIGHTS_NAME}, "
                            "or a single .pt checkpoint)")
        if config is None and os.path.exists(os.path.join(path, io.CONFIG_NAME)):
            config = os.path.join(path, io.CONFIG_NAME)
        path = os.path.join(path, pts[0])
    return path, config


def load_weights(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None = None
                 ) -> tuple[dict[str, torch.Tensor], HNetConfig]:
    """(state dict, config) from an official .pt (+ optional config) or one of our model directories."""
    path, config = _checkpoint_path(path, config)
    if os.path.isdir(path):
        weights = read_safetensors_dir(path)
        cfg = config if isinstance(config, HNetConfig) else HNetConfig.from_json(config or os.path.join(path, io.CONFIG_NAME))
    else:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            io.read_safetensors_header(path)
            weights = load_file(path)
        else:
            weights = read_torch_checkpoint(path)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        cfg = config if isinstance(config, HNetConfig) else config_for_weights(shapes, config)
    if cfg.quantization is not None:
        raise HNetError(f"{path} holds quantized MLX weights; load it with hnet_mlx.load or convert it with `hnet convert mlx-to-torch`")
    check_shapes(cfg, {k: tuple(v.shape) for k, v in weights.items()}, path)
    return weights, cfg


def load_pretrained(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None = None,
                    dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> HNetForCausalLM:
    """An eval-mode HNetForCausalLM with the weights of `path` (see module docstring).

    The model is built without storage (meta device; a small one on its device), given
    uninitialised storage in its own dtype, and each tensor is read from the file straight into it
    (or through one tensor-sized buffer when it changes dtype or device): memory holds the model
    plus one tensor, never a second copy."""
    stored, cfg = stored_weights(path, config)
    torch_dtype = resolve_dtype(dtype)
    # A small model is built straight on its device. On the meta device the constructors' init
    # arithmetic runs through torch's Python references, whose first call imports torch._dynamo: a
    # second of every `hnet` start with the bundled model. A large model builds on meta all the
    # same, where skipping its init saves more than that. Either way its storage is allocated once.
    parameters = sum(t.numel() if isinstance(t, torch.Tensor) else math.prod(t.shape) for t in stored.values())
    build_on = "meta" if parameters > DIRECT_BUILD_MAX_PARAMETERS else torch.device(device or "cpu")
    with torch.device(build_on):
        model = HNetForCausalLM(cfg, dtype=torch_dtype)
    if build_on == "meta":
        model = model.to_empty(device=device or "cpu")  # to_empty unties: tie afterwards
    if cfg.tie_embeddings:  # lm_head's own storage is dropped untouched; the embedding is filled once
        model.lm_head.weight = model.embeddings.weight
    params = dict(model.state_dict(keep_vars=True))
    unexpected = set(stored) - set(params)
    if unexpected:  # check_shapes already guarantees this; kept as an invariant
        raise AssertionError(f"state dict mismatch after shape check: {sorted(unexpected)}")
    with torch.no_grad():
        for name, target in params.items():
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue  # the embedding's storage
            _fill(target, stored[name])
    return model.eval()


def _fill(target: torch.Tensor, stored: StoredTensor | torch.Tensor) -> None:
    """Copy one stored tensor into `target` (residual_proj stays fp32 whatever the model dtype, so the
    dtype is decided per parameter)."""
    if isinstance(stored, torch.Tensor):  # a legacy checkpoint, already in memory
        target.copy_(stored)
        return
    source_dtype = STORED_DTYPES[stored.dtype]
    if target.dtype == source_dtype and target.device.type == "cpu" and target.is_contiguous():
        bits = target.detach()  # straight from the file into the model's storage:
        stored.read_into((bits.view(BITS[source_dtype]) if source_dtype in BITS else bits).numpy())
        return
    array = torch.from_numpy(stored.read())
    target.copy_(array.view(torch.bfloat16) if stored.dtype == "bfloat16" else array)


def stored_weights(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None = None
                   ) -> tuple[dict[str, StoredTensor | torch.Tensor], HNetConfig]:
    """Like `load_weights`, but where each tensor is in the file instead of the tensors: nothing is read
    but names, dtypes and shapes. A legacy (pre-zip) .pt, which only torch.load reads, is read whole.
    (No MLX twin: mx.load already reads safetensors lazily, and MLX never loads a .pt, it converts it.)"""
    path, config = _checkpoint_path(path, config)
    if os.path.isdir(path):
        if not io.is_model_dir(path):
            raise HNetError(f"{path} is not a model directory (expected {io.CONFIG_NAME} and {io.WEIGHTS_NAME})")
        stored = {}
        for file in io.weight_files(path):
            stored.update(safetensors_entries(file, io.read_safetensors_header(file)))
        cfg = config if isinstance(config, HNetConfig) else HNetConfig.from_json(config or os.path.join(path, io.CONFIG_NAME))
    elif path.endswith(".safetensors"):
        stored = safetensors_entries(path, io.read_safetensors_header(path))
        cfg = None
    elif zipfile.is_zipfile(path):
        stored = _read_zip_checkpoint(path)
        cfg = None
    else:
        return load_weights(path, config)
    if cfg is None:
        shapes = {k: v.shape for k, v in stored.items()}
        cfg = config if isinstance(config, HNetConfig) else config_for_weights(shapes, config)
    if cfg.quantization is not None:
        raise HNetError(f"{path} holds quantized MLX weights; load it with hnet_mlx.load or convert it with `hnet convert mlx-to-torch`")
    check_shapes(cfg, {k: tuple(v.shape) for k, v in stored.items()}, path)
    return stored, cfg


def save_pretrained(model: HNetForCausalLM, directory: str | os.PathLike, force: bool = False,
                    max_shard_bytes: int = io.DEFAULT_SHARD_BYTES) -> None:
    """Write config.json + model.safetensors (sharded above max_shard_bytes), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # safetensors refuses shared storage
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    shards = io.plan_shards(sizes, max_shard_bytes)
    names = io.shard_file_names(len(shards))
    with io.atomic_directory(directory, force=force) as tmp:
        weight_map = {}
        for shard, name in zip(shards, names):
            save_file({k: state[k] for k in shard}, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            io.write_index(tmp, weight_map, sum(sizes.values()))
        mlx_lm_files.write_model_files(tmp, model.config.to_dict())  # config.json + mlx-lm's tokenizer files

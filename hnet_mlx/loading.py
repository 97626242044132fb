"""Loading and saving MLX weights: our safetensors model directory (and nothing that needs torch).

    model, config = load("model_dir/")                 # config.json + model.safetensors (or sharded)
    model, config = load("someone/hnet-mlx-4bit")     # a converted model on the Hugging Face Hub
    model = load_pretrained("model_dir/", dtype="float16")
    save_pretrained(model, "model_dir/")               # atomic, sharded above 5 GB

An MLX model directory is our torch directory format with two differences: the conv1d weights
are in MLX layout, and a quantized model records `quantization` in config.json. The layout
difference is handled in exactly one place per direction: `sanitize` (official/torch -> MLX) and
`torch_layout` (MLX -> torch). A torch-layout directory also loads here (sanitize is applied to
whatever is read); a torch `.pt` file does not: convert it first with `hnet convert torch-to-mlx`.
Every problem (missing file, truncated file, wrong tensors, wrong config) is one HNetError line.
"""

from __future__ import annotations

import os
import re
import zipfile

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from hnet_core import io, mlx_lm_files
from hnet_core.checkpoint import resolve_model_path
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.official import check_shapes, expected_shapes

from .lm import HNetForCausalLM

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Layers that stay in full precision when quantizing: the routing projections decide the chunk
# boundaries (p > 0.5 is a hard threshold, so small errors flip boundaries) and residual_proj is
# computed in fp32 by design (official). Both are d x d, a small share of the parameters.
NEVER_QUANTIZED = ("routing_module.", "residual_proj")


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """None (keep the stored dtype), or the mx dtype named float32 / float16 / bfloat16."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise HNetError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# -- layout: the one place per direction --------------------------------------------------------


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Official/torch layout -> MLX layout. The only difference: the depthwise conv1d weight,
    torch (C, 1, K) -> MLX (C, K, 1). Tensors already in MLX layout pass unchanged, so this is
    safe on either."""
    out = {}
    for name, w in weights.items():
        if name.endswith("conv1d.weight") and w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1:
            w = w.swapaxes(1, 2)
        out[name] = w
    return out


def torch_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """MLX layout -> official/torch layout (the exact inverse of `sanitize`)."""
    out = {}
    for name, w in weights.items():
        if name.endswith("conv1d.weight") and w.ndim == 3 and w.shape[2] == 1 and w.shape[1] != 1:
            w = w.swapaxes(1, 2)
        out[name] = w
    return out


def logical_shapes(weights: dict[str, mx.array], quantization: dict | None) -> dict[str, tuple]:
    """Torch-layout shape of every logical tensor (a quantized weight counts as its float matrix)."""
    shapes: dict[str, tuple] = {}
    for name, w in torch_layout(weights).items():
        if quantization and name.endswith(".scales"):
            base = name[: -len(".scales")]
            shapes[base + ".weight"] = (w.shape[0], w.shape[1] * int(quantization["group_size"]))
        elif quantization and name.endswith(".biases") and name[: -len(".biases")] + ".scales" in weights:
            continue
        elif quantization and name.endswith(".weight") and name[: -len(".weight")] + ".scales" in weights:
            continue
        else:
            shapes[name] = tuple(w.shape)
    return shapes


# -- quantization -----------------------------------------------------------------------------


def quantizable(path: str, module: nn.Module, quantization: dict) -> bool:
    """Which layers `hnet convert -q` quantizes: Linear layers of the encoders / decoders / main
    networks (and the embedding / LM head when asked), whose input width the group size divides."""
    if not hasattr(module, "to_quantized") or any(k in path for k in NEVER_QUANTIZED):
        return False
    if path == "embeddings":
        return bool(quantization.get("embedding", False))
    if path == "lm_head":
        return bool(quantization.get("lm_head", False))
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % int(quantization["group_size"]) == 0


def quantized_layers(config: HNetConfig, quantization: dict) -> set[str]:
    """The paths of the layers `quantizable` picks in a model of `config`. MLX creates parameters
    lazily, so building the model here computes no weights."""
    model = HNetForCausalLM(config)
    return {path for path, module in model.named_modules() if quantizable(path, module, quantization)}


def quantize_weight(weight: mx.array, quantization: dict) -> dict[str, mx.array]:
    """One layer's weight quantized as nn.quantize does it ({"weight", "scales", "biases"}), so a
    converter can quantize one tensor at a time instead of a whole model."""
    packed, scales, *biases = mx.quantize(weight, int(quantization["group_size"]), int(quantization["bits"]),
                                          mode=quantization.get("mode", "affine"))
    return {"weight": packed, "scales": scales, **({"biases": biases[0]} if biases else {})}


def quantize_model(model: HNetForCausalLM, quantization: dict, weights: dict[str, mx.array] | None = None) -> None:
    """Replace layers by MLX's quantized ones in place: those `quantizable` picks, or, when loading,
    exactly those with stored `.scales` (so loading needs nothing but config.json)."""
    if weights is not None:
        def predicate(path, module):
            return f"{path}.scales" in weights
    else:
        def predicate(path, module):
            return quantizable(path, module, quantization)
    nn.quantize(model, group_size=int(quantization["group_size"]), bits=int(quantization["bits"]),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


# -- reading ----------------------------------------------------------------------------------


def looks_like_repo_id(path: str) -> bool:
    """'owner/name' that is not a local path: a Hugging Face repo id."""
    return bool(HF_REPO_ID.match(path)) and not path.startswith((".", "/")) and not os.path.exists(path)


def fetch_hf_repo(repo_id: str, revision: str | None = None) -> str:
    """Local snapshot directory of a Hugging Face repo (downloaded into the HF cache if needed).
    HF_HUB_OFFLINE=1 reads the cache only; HF_HUB_CACHE chooses the cache directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HNetError(f"{repo_id!r} looks like a Hugging Face repo id; install huggingface_hub to fetch it "
                        "(pip install 'hnet-mlx[hub]') or give a local path") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                 local_files_only=offline,
                                 allow_patterns=["*.json", "*.pt", "*.pth", "*.bin", "*.safetensors"])
    except Exception as e:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise HNetError(f"{repo_id!r} is not a local path, and fetching it as a Hugging Face repo {where} failed: "
                        f"{reason}") from None


def is_torch_checkpoint(path: str) -> bool:
    return os.path.isfile(path) and (path.endswith(TORCH_SUFFIXES) or zipfile.is_zipfile(path))


def read_safetensors_dir(directory: str) -> dict[str, mx.array]:
    tensors: dict[str, mx.array] = {}
    for path in io.weight_files(directory):
        io.read_safetensors_header(path)  # clear error for truncated files before MLX's own
        try:
            tensors.update(mx.load(path))
        except Exception as e:
            raise HNetError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    return tensors


def load_weights(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None = None
                 ) -> tuple[dict[str, mx.array], HNetConfig]:
    """(weights in MLX layout, config) from one of our model directories, shapes checked."""
    path = resolve_model_path(path)  # a training run directory -> its final model or newest checkpoint
    if looks_like_repo_id(path):  # an already converted MLX model on the Hugging Face Hub
        path = fetch_hf_repo(path)
    if not os.path.exists(path):
        raise HNetError(f"model not found: {path} (give a model directory made by `hnet convert torch-to-mlx`)")
    if is_torch_checkpoint(path):
        raise HNetError(
            f"{path} is a PyTorch checkpoint; convert it first with `hnet convert torch-to-mlx {path} OUT_DIR` "
            "and load OUT_DIR"
        )
    if not os.path.isdir(path) or not io.is_model_dir(path):
        raise HNetError(f"{path} is not a model directory (expected {io.CONFIG_NAME} and {io.WEIGHTS_NAME})")
    cfg = config if isinstance(config, HNetConfig) else HNetConfig.from_json(config or os.path.join(path, io.CONFIG_NAME))
    weights = sanitize(read_safetensors_dir(path))
    check_shapes(cfg, logical_shapes(weights, cfg.quantization), path)
    return weights, cfg


def load_pretrained(path: str | os.PathLike, config: str | os.PathLike | HNetConfig | None = None,
                    dtype: str | mx.Dtype | None = None) -> HNetForCausalLM:
    """An HNetForCausalLM with the weights of `path`; `dtype` casts the float weights (default: as
    stored), residual_proj is float32 either way (as torch's `load_pretrained` makes it)."""
    weights, cfg = load_weights(path, config)
    weights = cast_weights(weights, resolve_dtype(dtype))
    model = HNetForCausalLM(cfg)
    if cfg.quantization is not None:
        quantize_model(model, cfg.quantization, weights)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model.eval()


def load(path: str | os.PathLike, dtype: str | mx.Dtype | None = None) -> tuple[HNetForCausalLM, HNetConfig]:
    """`(model, config)` from a converted model directory (mlx-lm's `load` convention)."""
    model = load_pretrained(path, dtype=dtype)
    return model, model.config


def cast_weights(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast floating tensors to `dtype` (None: keep their dtype); residual_proj is always fp32
    (official), packed ints stay."""
    out = {}
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating):
            # A checkpoint stored in half precision (the bundled model) holds residual_proj in it too:
            # left so, the residual would be computed in float16 (and by MLX's slow half-precision gemm).
            target = mx.float32 if "residual_proj" in name else dtype
            w = w if target is None else w.astype(target)
        out[name] = w
    return out


# -- writing ----------------------------------------------------------------------------------


def ordered_weights(model: HNetForCausalLM) -> dict[str, mx.array]:
    """The model's arrays in the official state-dict order (quantized triples together)."""
    params = dict(tree_flatten(model.parameters()))
    if model.config.tie_embeddings:
        params["lm_head.weight"] = params["embeddings.weight"]
    return {name: params[name] for name in ordered_names(list(params), model.config)}


def ordered_names(names: list[str], config: HNetConfig) -> list[str]:
    """Tensor names in the official state-dict order, a layer's tensors together (quantized triples)."""
    order = {name.rsplit(".", 1)[0]: i for i, name in enumerate(expected_shapes(config))}
    return sorted(names, key=lambda name: (order.get(name.rsplit(".", 1)[0], len(order)), name))


def write_model_dir(tmp: str, weights: dict[str, mx.array], config: HNetConfig, fmt: str,
                    max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, on_tensor=None) -> int:
    """Write `weights` (+ config.json, and the tokenizer / model_file that make it an mlx-lm model
    directory too) into the directory `tmp`; returns the bytes written by the weights."""
    sizes = {k: v.nbytes for k, v in weights.items()}
    shards = io.plan_shards(sizes, max_shard_bytes)
    names = io.shard_file_names(len(shards))
    weight_map = {}
    for shard, name in zip(shards, names):
        mx.save_safetensors(os.path.join(tmp, name), {k: weights[k] for k in shard}, metadata={"format": fmt})
        weight_map.update({k: name for k in shard})
        if on_tensor is not None:
            on_tensor(len(shard))
    if len(shards) > 1:
        io.write_index(tmp, weight_map, sum(sizes.values()))
    mlx_lm_files.write_model_files(tmp, config.to_dict())  # config.json + what mlx-lm needs beside it
    return sum(os.path.getsize(os.path.join(tmp, n)) for n in names)


def save_pretrained(model: HNetForCausalLM, directory: str | os.PathLike, force: bool = False,
                    max_shard_bytes: int = io.DEFAULT_SHARD_BYTES) -> None:
    """Write config.json + model.safetensors (MLX layout, sharded above max_shard_bytes), atomically."""
    weights = ordered_weights(model)
    with io.atomic_directory(directory, force=force) as tmp:
        write_model_dir(tmp, weights, model.config, "mlx", max_shard_bytes)

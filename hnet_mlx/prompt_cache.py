"""Prompt caches on disk (the format is hnet_core/prompt_cache.py's, shared with hnet_torch).

    cache, meta = cache_prompt(model, long_document)          # read once, in pieces (hnet_core.engine)
    save_prompt_cache("doc.safetensors", cache, meta)
    cache, meta = load_prompt_cache("doc.safetensors", model, return_metadata=True)

A cache saved here loads in hnet_torch and the other way round; a cache made for another config is
refused with one HNetError (at load when `model` is given, else when the model first uses it).
The file keeps attention k/v as (B, S, heads, head_dim), torch's layout; MLX's is (B, heads, S, d).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from hnet_core import engine
from hnet_core.prompt_cache import check_config, flatten_cache, read_prompt_cache, unflatten_cache, write_prompt_cache

from . import cache as cache_classes
from .cache import InferenceCache
from .lm import HNetForCausalLM

CLASSES = {name: getattr(cache_classes, name) for name in
           ("InferenceCache", "HNetState", "IsotropicState", "MambaState", "AttentionState", "RoutingState",
            "DeChunkState")}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "int64": mx.int32, "bool": mx.bool_}
KV_FIELDS = ("k", "v")  # AttentionState fields stored in the other layout


def _to_numpy(x: mx.array, owner: str, field: str) -> tuple[np.ndarray, str]:
    dtype = str(x.dtype).removeprefix("mlx.core.")
    if owner == "AttentionState" and field in KV_FIELDS:
        x = x.swapaxes(1, 2)  # (B, heads, S, d) -> (B, S, heads, d)
    if x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)  # exact; numpy has no bfloat16
    elif mx.issubdtype(x.dtype, mx.integer):
        return np.array(x).astype(np.int64), "int64"
    return np.array(x), dtype


def export_cache(cache: InferenceCache) -> tuple[dict, dict[str, np.ndarray]]:
    """(tree, arrays) of the file format (hnet_core/prompt_cache.py) for `cache`."""
    return flatten_cache(cache, lambda x: isinstance(x, mx.array), _to_numpy)


def import_cache(tree: dict, arrays: dict[str, np.ndarray], config: dict) -> InferenceCache:
    """The cache `tree` and `arrays` describe, belonging to a model of `config`."""
    def from_numpy(a: np.ndarray, dtype: str, owner: str, field: str) -> mx.array:
        x = mx.array(a).astype(DTYPES[dtype])
        return x.swapaxes(1, 2) if owner == "AttentionState" and field in KV_FIELDS else x

    cache = unflatten_cache(tree, arrays, CLASSES, from_numpy)
    cache.config = config
    return cache


def save_prompt_cache(path: str | os.PathLike, cache: InferenceCache, metadata: dict | None = None) -> None:
    """Write `cache` (and JSON-serialisable `metadata`) to one safetensors file, atomically."""
    if cache.config is None:
        raise ValueError("this cache has no model config; allocate it with model.allocate_inference_cache")
    write_prompt_cache(path, *export_cache(cache), cache.config, metadata)


def load_prompt_cache(path: str | os.PathLike, model: HNetForCausalLM | None = None, return_metadata: bool = False):
    """The cache saved at `path` (after checking it was made for `model`'s config when given), and
    with return_metadata also the metadata saved with it."""
    header, arrays = read_prompt_cache(path)
    if model is not None:
        check_config(header["config"], model.config_dict, where=f"prompt cache {os.fspath(path)}")
    cache = import_cache(header["tree"], arrays, model.config_dict if model is not None else header["config"])
    return (cache, header["metadata"]) if return_metadata else cache


def cache_prompt(model: HNetForCausalLM, prompt: str | bytes, prefill_step_size: int | None = None
                 ) -> tuple[InferenceCache, dict]:
    """hnet_core.engine.cache_prompt on `model`: a new cache that has read `prompt`, and its metadata."""
    from .generate import Adapter

    return engine.cache_prompt(Adapter(model), prompt, prefill_step_size)

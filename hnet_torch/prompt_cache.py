"""Prompt caches on disk (the format is hnet_core/prompt_cache.py's, shared with hnet_mlx).

    cache, meta = cache_prompt(model, long_document)          # read once, in pieces (hnet_core.engine)
    save_prompt_cache("doc.safetensors", cache, meta)
    cache, meta = load_prompt_cache("doc.safetensors", model, return_metadata=True)

A cache saved here loads in hnet_mlx and the other way round; a cache made for another config is
refused with one HNetError (at load when `model` is given, else when the model first uses it).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hnet_core import engine
from hnet_core.prompt_cache import check_config, flatten_cache, read_prompt_cache, unflatten_cache, write_prompt_cache

from . import cache as cache_classes
from .cache import InferenceCache
from .lm import HNetForCausalLM

CLASSES = {name: getattr(cache_classes, name) for name in
           ("InferenceCache", "HNetState", "IsotropicState", "MambaState", "AttentionState", "RoutingState",
            "DeChunkState")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "bool": torch.bool}


def _to_numpy(x: torch.Tensor, owner: str, field: str) -> tuple[np.ndarray, str]:
    dtype = str(x.dtype).removeprefix("torch.")
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()  # exact; numpy has no bfloat16
    elif not x.dtype.is_floating_point and x.dtype != torch.bool:
        x, dtype = x.long(), "int64"
    return x.numpy(), dtype


def export_cache(cache: InferenceCache) -> tuple[dict, dict[str, np.ndarray]]:
    """(tree, arrays) of the file format (hnet_core/prompt_cache.py) for `cache`."""
    return flatten_cache(cache, lambda x: isinstance(x, torch.Tensor), _to_numpy)


def import_cache(tree: dict, arrays: dict[str, np.ndarray], config: dict, device: torch.device) -> InferenceCache:
    """The cache `tree` and `arrays` describe, on `device`, belonging to a model of `config`."""
    def from_numpy(a: np.ndarray, dtype: str, owner: str, field: str) -> torch.Tensor:
        return torch.from_numpy(np.array(a)).to(device=device, dtype=DTYPES[dtype])

    cache = unflatten_cache(tree, arrays, CLASSES, from_numpy)
    cache.config = config
    return cache


def save_prompt_cache(path: str | os.PathLike, cache: InferenceCache, metadata: dict | None = None) -> None:
    """Write `cache` (and JSON-serialisable `metadata`) to one safetensors file, atomically."""
    if cache.config is None:
        raise ValueError("this cache has no model config; allocate it with model.allocate_inference_cache")
    write_prompt_cache(path, *export_cache(cache), cache.config, metadata)


def load_prompt_cache(path: str | os.PathLike, model: HNetForCausalLM | None = None, return_metadata: bool = False):
    """The cache saved at `path` (on `model`'s device when given, after checking it was made for
    `model`'s config), and with return_metadata also the metadata saved with it."""
    header, arrays = read_prompt_cache(path)
    if model is not None:
        check_config(header["config"], model.config_dict, where=f"prompt cache {os.fspath(path)}")
    device = model.embeddings.weight.device if model is not None else torch.device("cpu")
    cache = import_cache(header["tree"], arrays, model.config_dict if model is not None else header["config"], device)
    return (cache, header["metadata"]) if return_metadata else cache


def cache_prompt(model: HNetForCausalLM, prompt: str | bytes, prefill_step_size: int | None = None
                 ) -> tuple[InferenceCache, dict]:
    """hnet_core.engine.cache_prompt on `model`: a new cache that has read `prompt`, and its metadata."""
    from .generate import Adapter

    return engine.cache_prompt(Adapter(model), prompt, prefill_step_size)

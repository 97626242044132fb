"""Prompt caches on disk: one file format for hnet_torch and hnet_mlx (framework-free, numpy only).

A prompt cache is an `InferenceCache` (see hnet_torch/cache.py, hnet_mlx/cache.py: the same
dataclasses in both) written as one safetensors file:
  * tensors: every array of the cache tree, named by its path ("backbone.encoder.layers.0.conv",
    "lengths", ...), in the canonical layout: attention k/v as (B, S, heads, head_dim) (hnet_torch's
    layout; hnet_mlx transposes), integers as int64, bfloat16 as float32 (exact; numpy has no
    bfloat16) with the original dtype recorded;
  * metadata["hnet_prompt_cache"]: JSON with the format name and version, the model config the
    cache belongs to (HNetConfig.to_dict()), the tree's shape (class names, list lengths, Python
    scalars such as ring flags and length bounds) and the caller's own metadata.
The file is written to a temporary name and renamed (never half-written) and read with
safetensors (no pickle). Each backend's `save_prompt_cache` / `load_prompt_cache` only converts
arrays; walking the tree and checking the format and config happen here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from . import io
from .errors import HNetError

FORMAT = "hnet-prompt-cache"
VERSION = 1
META_KEY = "hnet_prompt_cache"
SKIPPED_FIELDS = ("config", "extra")  # InferenceCache fields that are not state (config goes in the metadata)

# to_numpy(array, owner class name, field name) -> (numpy array in the canonical layout, dtype name)
ToNumpy = Callable[[Any, str, str], "tuple[np.ndarray, str]"]
# from_numpy(numpy array, dtype name, owner class name, field name) -> backend array
FromNumpy = Callable[[np.ndarray, str, str, str], Any]


def flatten_cache(cache: Any, is_array: Callable[[Any], bool], to_numpy: ToNumpy) -> tuple[dict, dict[str, np.ndarray]]:
    """(tree description, {path: array}) for a cache dataclass tree."""
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str, owner: str, name: str) -> Any:
        if is_array(node):
            arr, dtype = to_numpy(node, owner, name)
            arrays[path] = np.ascontiguousarray(arr)
            return {"array": path, "dtype": dtype}
        if dataclasses.is_dataclass(node):
            fields = {f.name: walk(getattr(node, f.name), f"{path}.{f.name}" if path else f.name, type(node).__name__, f.name)
                      for f in dataclasses.fields(node) if not (path == "" and f.name in SKIPPED_FIELDS)}
            return {"type": type(node).__name__, "fields": fields}
        if isinstance(node, list):
            return {"list": [walk(item, f"{path}.{i}", owner, name) for i, item in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        raise TypeError(f"cannot store {type(node).__name__} at {path} in a prompt cache")

    return walk(cache, "", "", ""), arrays


def unflatten_cache(tree: dict, arrays: dict[str, np.ndarray], classes: dict[str, type], from_numpy: FromNumpy) -> Any:
    """The cache dataclass tree described by `tree`, built from the backend's `classes`."""

    def build(node: dict, owner: str, name: str) -> Any:
        if "array" in node:
            if node["array"] not in arrays:
                raise HNetError(f"prompt cache is missing tensor {node['array']!r}; the file is damaged")
            return from_numpy(arrays[node["array"]], node["dtype"], owner, name)
        if "type" in node:
            cls = classes.get(node["type"])
            if cls is None:
                raise HNetError(f"prompt cache holds an unknown state {node['type']!r}; was it written by a newer version?")
            return cls(**{k: build(v, node["type"], k) for k, v in node["fields"].items()})
        if "list" in node:
            return [build(item, owner, name) for item in node["list"]]
        return node["value"]

    return build(tree, "", "")


def write_prompt_cache(path: str | os.PathLike, tree: dict, arrays: dict[str, np.ndarray], config: dict,
                       metadata: dict | None = None) -> None:
    """Write atomically (temporary file + rename); an unwritable path is an HNetError."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    try:
        json.dumps(metadata or {})
    except TypeError as e:
        raise HNetError(f"prompt cache metadata must be JSON-serialisable: {e}") from None
    header = {"format": FORMAT, "version": VERSION, "config": config, "tree": tree, "metadata": metadata or {}}
    if os.path.isdir(path):
        raise HNetError(f"{path} is a directory; give a file name for the prompt cache (e.g. prompt.safetensors)")
    try:
        with io.atomic_file(path, what="the prompt cache") as tmp:
            save_file(arrays, tmp, metadata={META_KEY: json.dumps(header)})
    except OSError as e:
        raise HNetError(f"cannot write the prompt cache to {path}: {e.strerror or e}") from None


def read_prompt_cache(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header: format, version, config, tree, metadata; arrays) of a prompt cache file."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise HNetError(f"prompt cache file {path} does not exist; write one with `cache-prompt`")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(path)
    except Exception as e:  # safetensors raises its own error types (SafetensorError) for a damaged file
        raise HNetError(f"{path} is not a readable safetensors file ({e}); give a file written by `cache-prompt`") from None
    try:
        header = json.loads(meta[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise HNetError(f"{path} is not an H-Net prompt cache (no {META_KEY} metadata); write one with `cache-prompt`") from None
    if header.get("format") != FORMAT or not isinstance(header.get("version"), int):
        raise HNetError(f"{path} is not an H-Net prompt cache; write one with `cache-prompt`")
    if header["version"] > VERSION:
        raise HNetError(f"{path} is a prompt cache of format version {header['version']}; this version reads up "
                        f"to {VERSION}: upgrade hnet-mlx")
    return header, arrays


def config_mismatch(cache_config: dict, model_config: dict) -> str | None:
    """None if equal, else a short description of the first difference."""
    if cache_config == model_config:
        return None
    for key in sorted(set(cache_config) | set(model_config)):
        if cache_config.get(key) != model_config.get(key):
            return f"{key} is {json.dumps(cache_config.get(key))} in the cache, {json.dumps(model_config.get(key))} in the model"
    return "the configs differ"


def check_config(cache_config: dict | None, model_config: dict, where: str = "this cache") -> None:
    """Refuse a cache made for another model, with one line naming the difference."""
    if cache_config is None or cache_config is model_config:
        return
    diff = config_mismatch(cache_config, model_config)
    if diff is not None:
        raise HNetError(f"{where} belongs to a model with another config ({diff}); use it with the model it "
                        "was made with, or make a new one for this model")


def save_with(adapter: Any, path: str | os.PathLike, cache: Any, metadata: dict | None = None) -> None:
    """Write `cache` through a generation adapter (hnet_core.engine.Adapter): any backend's cache."""
    write_prompt_cache(path, *adapter.export_cache(cache), adapter.config, metadata)


def load_with(adapter: Any, path: str | os.PathLike) -> tuple[Any, dict]:
    """(cache, metadata) of the file at `path`, for the adapter's model (another model's cache is refused)."""
    header, arrays = read_prompt_cache(path)
    check_config(header["config"], adapter.config, where=f"prompt cache {os.fspath(path)}")
    return adapter.import_cache(header["tree"], arrays), header["metadata"]


# -- prompt files for the CLI (`cache-prompt`, `generate --prompt-cache-file`) -------------------

CONTEXT_BYTES = 1024  # bytes of the cached text kept for the repetition penalty's history (its window is 64)


def split_prompt(prompt: str | bytes) -> tuple[list[int], dict]:
    """What `cache-prompt` reads into the cache: BOS + prompt except its last byte; and the metadata
    to continue it. A cache holds state, not the logits of the last byte it read, so that byte is
    held back (`pending`) and read again in front of the continuation; `context` keeps the tail of
    the cached text for the repetition penalty."""
    from .tokenizer import encode

    ids = encode(prompt)
    return ids[:-1], {"pending": ids[-1:], "context": ids[:-1][-CONTEXT_BYTES:], "cached_bytes": len(ids) - 1}


def continuation(metadata: dict, more: str | bytes) -> tuple[bytes, list[int]]:
    """(bytes to feed the loaded cache, history for the sampler) for continuing a cache-prompt file
    with `more`: generating from them equals generating from the cached text followed by `more`."""
    pending = metadata.get("pending")
    if not isinstance(pending, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in pending):
        raise HNetError("this prompt cache was not written by `cache-prompt` (no pending byte in its metadata); "
                        "write it with `cache-prompt --prompt-file`")
    data = more.encode("utf-8") if isinstance(more, str) else bytes(more)
    return bytes(pending) + data, list(metadata.get("context", []))

"""Loading a model for a named backend (torch, mlx, onnx), imported only when asked for.

Every backend offers the same generation contract:
    stream_generate(model, prompts, max_tokens=, sampling=, stop=) -> yields GenerationStep, returns GenerationStats
so the CLIs render output and statistics the same way whichever framework computed the logits,
and the same evaluation forward (`eval_forward`, from each backend's own evaluate module):
    make_forward(model_path, device=, dtype=) -> forward(ids, mask) -> (logits, [(boundary, valid)])
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import HNetError

BACKENDS = ("torch", "mlx", "onnx")
# The small English model shipped with the package (see demo_model/MODEL_CARD.md); used when no model is given.
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
_EXTRA = {"torch": "torch", "mlx": "mlx", "onnx": "onnx"}
# backend -> module whose make_forward(model_path, device, dtype) serves hnet_core.evaluate
EVAL_MODULES = {"torch": "hnet_torch.evaluate", "mlx": "hnet_mlx.evaluate", "onnx": "hnet_export.evaluate"}


@dataclass
class LoadedModel:
    backend: str
    model: Any
    stream_generate: Callable
    # -> (bytes, what was measured), or None. The backends measure different things (the process's peak
    # resident set, the MLX or CUDA allocator's peak), so `-v` names the one it reports.
    peak_memory: Callable[[], tuple[int, str] | None]


def _import(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HNetError(
            f"the {backend} backend is not available ({e}); install it with pip install 'hnet-mlx[{_EXTRA[backend]}]'"
        ) from None


RSS_PEAK = "peak resident memory of the process"


def _rss_peak() -> tuple[int, str] | None:
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), RSS_PEAK
    except Exception:
        return None


def load_model(backend: str, path: str, config: str | None = None, dtype: str | None = None,
               device: str | None = None) -> LoadedModel:
    if backend not in BACKENDS:
        raise HNetError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        torch_api = _import("hnet_torch", backend)
        import torch

        model = torch_api.load_pretrained(path, config=config, dtype=dtype, device=device)

        def peak() -> tuple[int, str] | None:
            if model.embeddings.weight.is_cuda:
                return int(torch.cuda.max_memory_allocated()), "peak memory allocated by torch on the GPU"
            return _rss_peak()

        return LoadedModel(backend, model, torch_api.stream_generate, peak)
    if backend == "mlx":
        mlx_api = _import("hnet_mlx", backend)
        if config is not None:
            raise HNetError("the mlx backend reads config.json from the model directory; convert with `hnet convert torch-to-mlx` first")
        if dtype is None and os.path.abspath(path) == DEMO_MODEL:
            dtype = "float32"  # stored in float16 to stay small; MLX's CPU half-precision matmul is slow
        model, _ = mlx_api.load(path, dtype=dtype) if dtype else mlx_api.load(path)
        import mlx.core as mx

        def mlx_peak() -> tuple[int, str] | None:
            allocated = int(mx.get_peak_memory())
            return (allocated, "peak memory allocated by MLX during generation") if allocated else _rss_peak()

        return LoadedModel(backend, model, mlx_api.stream_generate, mlx_peak)
    onnx_api = _import("hnet_export", backend)
    if config is not None or dtype is not None:
        raise HNetError("the onnx backend reads its settings from the exported directory; --config/--dtype apply at export time")
    if os.path.abspath(path) == DEMO_MODEL:  # the bundled model's export, built on first use, then cached
        path = importlib.import_module("hnet_export.cache").bundled_export()
    model = onnx_api.OnnxHNet(path, provider=device or "auto")
    return LoadedModel(backend, model, onnx_api.stream_generate, _rss_peak)


def eval_forward(backend: str, path: str, device: str | None = None, dtype: str | None = None) -> Callable:
    """The backend's evaluation forward: (ids (B, L) int32, mask (B, L) bool) -> (logits (B, L, V) float32,
    [(boundary_mask (B, L_s), valid (B, L_s)) per stage]), all numpy."""
    if backend not in BACKENDS:
        raise HNetError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "mlx" and dtype is None and os.path.abspath(path) == DEMO_MODEL:
        dtype = "float32"  # as in load_model: the demo is stored in float16, slow on MLX's CPU
    return _import(EVAL_MODULES[backend], backend).make_forward(path, device=device, dtype=dtype)

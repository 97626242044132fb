"""Loading a model for a named backend (torch, mlx, onnx), imported only when asked for.

Every backend offers a generation adapter (hnet_core.engine.Adapter: its `Adapter(model)` in
hnet_torch.generate, hnet_mlx.generate, hnet_export.generate), so one engine generates, reads
prompts in pieces, keeps prompt caches and reports statistics whichever framework computes the logits,
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
    adapter: Any  # hnet_core.engine.Adapter for `model`


def _import(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HNetError(
            f"the {backend} backend is not available ({e}); install it with pip install 'hnet-mlx[{_EXTRA[backend]}]'"
        ) from None


# -- --device, checked once for every command and backend before anything is loaded. Each backend
# names its devices differently (torch: cpu, cuda, cuda:N, mps; onnx: its providers auto, cpu, cuda;
# mlx: cpu, gpu), so the backend's framework is asked what this machine has (imported only when a
# device is given, so `--backend onnx` still never imports torch), and a device it lacks is one line
# listing what it has.


def available_devices(backend: str) -> list[str]:
    """The --device values that work for `backend` on this machine."""
    if backend == "torch":
        import torch

        out = ["cpu"]
        if torch.cuda.is_available():
            out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            out.append("mps")
        return out
    if backend == "onnx":
        import onnxruntime as ort

        return ["auto", "cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    if backend == "mlx":
        import mlx.core as mx

        return ["cpu"] + (["gpu"] if mx.metal.is_available() else [])
    raise HNetError(f"backend must be one of torch, mlx, onnx, got {backend!r}")


def check_device(backend: str, device: str | None) -> str | None:
    """`device` unchanged when this machine has it for `backend` (None: the backend's default);
    otherwise an HNetError naming what is available here."""
    if device is None:
        return None
    available = available_devices(backend)
    if device in available:
        return device
    known = {"torch": ("cpu", "cuda", "mps"), "onnx": ("auto", "cpu", "cuda"), "mlx": ("cpu", "gpu")}[backend]
    kind = device.split(":")[0]
    why = "is not available here" if kind in known else f"is not a {backend} device"
    raise HNetError(f"--device {device} {why}; available here for the {backend} backend: {', '.join(available)}")


def load_model(backend: str, path: str, config: str | None = None, dtype: str | None = None,
               device: str | None = None) -> LoadedModel:
    if backend not in BACKENDS:
        raise HNetError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = check_device(backend, device)
    if backend == "torch":
        torch_api = _import("hnet_torch", backend)
        model = torch_api.load_pretrained(path, config=config, dtype=dtype, device=device)
        return LoadedModel(backend, model, _import("hnet_torch.generate", backend).Adapter(model))
    if backend == "mlx":
        mlx_api = _import("hnet_mlx", backend)
        if config is not None:
            raise HNetError("the mlx backend reads config.json from the model directory; convert with `hnet convert torch-to-mlx` first")
        if dtype is None and os.path.abspath(path) == DEMO_MODEL:
            dtype = "float32"  # stored in float16 to stay small; MLX's CPU half-precision matmul is slow
        import mlx.core as mx

        if device is not None:
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        model, _ = mlx_api.load(path, dtype=dtype) if dtype else mlx_api.load(path)
        return LoadedModel(backend, model, _import("hnet_mlx.generate", backend).Adapter(model))
    onnx_api = _import("hnet_export", backend)
    if config is not None or dtype is not None:
        raise HNetError("the onnx backend reads its settings from the exported directory; --config/--dtype apply at export time")
    if os.path.abspath(path) == DEMO_MODEL:  # the bundled model's export, built on first use, then cached
        path = importlib.import_module("hnet_export.cache").bundled_export()
    model = onnx_api.OnnxHNet(path, provider=device or "auto")
    model.warm_up(batch=1)  # so the first generated byte costs what the others do
    return LoadedModel(backend, model, _import("hnet_export.generate", backend).Adapter(model))


def eval_forward(backend: str, path: str, device: str | None = None, dtype: str | None = None) -> Callable:
    """The backend's evaluation forward: (ids (B, L) int32, mask (B, L) bool) -> (logits (B, L, V) float32,
    [(boundary_mask (B, L_s), valid (B, L_s)) per stage]), all numpy."""
    if backend not in BACKENDS:
        raise HNetError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = check_device(backend, device)
    if backend == "mlx" and dtype is None and os.path.abspath(path) == DEMO_MODEL:
        dtype = "float32"  # as in load_model: the demo is stored in float16, slow on MLX's CPU
    return _import(EVAL_MODULES[backend], backend).make_forward(path, device=device, dtype=dtype)

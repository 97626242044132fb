"""`--device`, checked once for every command and backend before anything is loaded.

Each backend names its devices differently (torch: cpu, cuda, cuda:N, mps; onnx: its providers cpu,
cuda, auto; mlx: cpu, gpu), so this file asks the backend's framework what this machine has and
answers a device it does not have with one line listing what it does. The frameworks are imported
here only when a device is given, so `hnet generate --backend onnx` still never imports torch.
"""

from __future__ import annotations

from .errors import HNetError


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

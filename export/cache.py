"""The bundled model's ONNX export, built once per user and reused.

`hnet generate --backend onnx` without `--model` runs `bundled_export()`: the first call exports
the bundled demo model into the user's cache directory (with a progress line), later calls return
that directory at once. The directory's name carries a hash of the weights, the config and the
code that writes the graphs (export/ and hnet_torch/ sources, torch/onnx versions), so a changed
model or exporter builds a new export and removes the stale one.

The cache lives in $HNET_CACHE, else $XDG_CACHE_HOME/hnet-mlx, else ~/.cache/hnet-mlx. Building
needs torch (the exporter traces the torch model); reading the cache needs only onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
from typing import Callable

from hnet_core.errors import HNetError

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hnet_core", "demo_model")
_PACKAGES = ("torch", "onnx", "onnxscript", "onnx_ir")  # their versions change the traced graphs


def cache_root() -> str:
    """The per-user cache directory of hnet-mlx."""
    if os.environ.get("HNET_CACHE"):
        return os.environ["HNET_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hnet-mlx")


def _source_files(package: str) -> list[str]:
    """The .py files of an importable package, found without importing it (torch stays unloaded)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = list(spec.submodule_search_locations)[0]
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def export_key(model_dir: str | None = None) -> str:
    """A hash of everything the export depends on: weights, config, exporter code, package versions."""
    model_dir = model_dir or DEMO_MODEL
    digest = hashlib.sha256()
    files = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir)) if f.endswith((".json", ".safetensors"))]
    for path in files + _source_files("hnet_export") + _source_files("hnet_torch"):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    for package in _PACKAGES:
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=none".encode())
    return digest.hexdigest()[:16]


class _Progress:
    """One status line on stderr, advanced once per exported graph."""

    def __init__(self, total: int, title: str):
        self.total, self.done, self.title = total, 0, title
        self.tty = sys.stderr.isatty()

    def _show(self, what: str) -> None:
        width = 24
        bar = "#" * (width * self.done // self.total) + "-" * (width - width * self.done // self.total)
        text = f"{self.title} [{bar}] {self.done}/{self.total} {what}"
        print(("\r" + text.ljust(100)) if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        if message.startswith("exporting "):  # exporter.export_model logs one such line per graph
            self._show(message[len("exporting "):].rstrip(". "))
            self.done = min(self.done + 1, self.total)

    def finish(self) -> None:
        self.done = self.total
        self._show("done")
        if self.tty:
            print(file=sys.stderr)


def bundled_export(log: Callable[[str], None] | None = None) -> str:
    """The directory of the bundled model's cached ONNX export, built on first use."""
    folder = os.path.join(cache_root(), "onnx")
    target = os.path.join(folder, "demo_model-" + export_key())
    if os.path.exists(os.path.join(target, "export.json")):
        return target
    try:
        import torch  # noqa: F401
    except ImportError:
        raise HNetError("building the bundled model's ONNX export needs torch (pip install 'hnet-mlx[torch]'); "
                        "or pass --model with a directory written by `hnet export onnx`") from None
    from hnet_torch.loading import load_pretrained

    from .exporter import export_model

    (log or (lambda m: print(m, file=sys.stderr)))(f"building the bundled model's ONNX export once, into {target}")
    progress = _Progress(4, "hnet export onnx")
    os.makedirs(folder, exist_ok=True)
    quiet = logging.getLogger("torch.onnx")  # its warnings (e.g. "torchvision is not installed") break the bar
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        export_model(load_pretrained(DEMO_MODEL, dtype="float32"), target, log=progress)
    except HNetError:
        if not os.path.exists(os.path.join(target, "export.json")):  # another process may have just written it
            raise
    finally:
        quiet.setLevel(level)
    progress.finish()
    for name in os.listdir(folder):  # exports of older weights or exporters are never read again
        if name.startswith("demo_model-") and os.path.join(folder, name) != target:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return target

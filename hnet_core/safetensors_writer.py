"""Writing a safetensors file one tensor at a time (framework-free).

The libraries' writers (mx.save_safetensors, safetensors.torch.save_file) take every tensor at
once, so a converter using them holds the whole output in memory. The format needs only each
tensor's dtype and shape up front (for the header), so here the header is written first and each
tensor's bytes are asked for in turn: the caller computes one tensor, hands over its bytes, drops it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .stored_tensor import NUMPY_DTYPES, SAFETENSORS_DTYPES

_SAFETENSORS_NAMES = {ours: theirs for theirs, ours in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of a tensor before its data exists."""

    name: str
    dtype: str  # our name: float32, bfloat16, uint32...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed JSON header, padded with spaces so tensor data starts 8-byte aligned."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    position = 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [position, position + spec.nbytes]}
        position += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(path: str, specs: list[TensorSpec], data: Callable[[TensorSpec], memoryview],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `specs` to `path`, asking `data(spec)` for each tensor's bytes in order; returns the file size.

    `path` is a temporary the caller renames into place (hnet_core.io.atomic_path / atomic_directory)."""
    with open(path, "wb") as f:
        f.write(header_bytes(specs, metadata))
        for spec in specs:
            if spec.nbytes == 0:  # nothing to write (and memoryview cannot cast an empty shape)
                continue
            chunk = memoryview(data(spec)).cast("B")
            if len(chunk) != spec.nbytes:  # our own invariant: the header promised this size
                raise AssertionError(f"{spec.name}: {len(chunk)} bytes, header says {spec.nbytes}")
            f.write(chunk)
        return f.tell()

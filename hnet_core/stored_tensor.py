"""A tensor still on disk: where its bytes are in a checkpoint file, read one tensor at a time.

Loading or converting a multi-GB checkpoint must not hold it twice (or widen it): readers list
`StoredTensor`s first (names, dtypes and shapes are enough to recognise the config and check every
shape), then each consumer reads one tensor, puts it where it belongs and drops it. Reads are plain
file reads (no memory map), so the page cache, which the system can reclaim, holds the file and not
the process: its peak memory is what it builds plus about one tensor. Framework-free; bfloat16,
which numpy lacks, is read as its raw bits (uint16) and each framework views them as bf16.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .errors import HNetError

# dtype name -> numpy dtype of the stored (little-endian) bytes; bf16 as its bits
NUMPY_DTYPES = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8", "int32": "<i4",
    "int16": "<i2", "int8": "i1", "uint8": "u1", "uint32": "<u4", "bool": "?",
}
# safetensors' dtype names <-> ours
SAFETENSORS_DTYPES = {
    "F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U32": "uint32", "BOOL": "bool",
}


@dataclass(frozen=True)
class StoredTensor:
    """`shape` elements of `dtype` at element `offset` (with element `stride`s) of the storage that
    starts `start` bytes into `path` and holds `numel` elements."""

    path: str
    start: int
    numel: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0

    @property
    def itemsize(self) -> int:
        return np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for n in reversed(self.shape):
            expected.append(step)
            step *= n
        return all(n == 1 or s == e for n, s, e in zip(self.shape, self.stride, reversed(expected)))

    def read(self) -> np.ndarray:
        """A new contiguous, native-order array of the tensor (bfloat16 as uint16 bits)."""
        out = np.empty(self.shape, dtype=np.dtype(NUMPY_DTYPES[self.dtype]).newbyteorder("="))
        self.read_into(out)
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Fill the contiguous array `out` (this shape; this dtype's itemsize) straight from the file."""
        if out.nbytes != self.nbytes or not out.flags.c_contiguous or out.dtype.itemsize != self.itemsize:
            raise ValueError(f"read_into: {out.shape} {out.dtype} cannot take {self.shape} {self.dtype}")
        if self.nbytes == 0:
            return
        if self.is_contiguous() and sys.byteorder == "little":
            _read_exactly(self.path, self.start + self.offset * self.itemsize, out.reshape(-1).view(np.uint8))
            return
        # A strided view into a storage (rare in state dicts): read the span it covers, then gather.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        span = np.empty(last - self.offset + 1, dtype=NUMPY_DTYPES[self.dtype])
        _read_exactly(self.path, self.start + self.offset * self.itemsize, span.view(np.uint8))
        view = np.lib.stride_tricks.as_strided(span, shape=self.shape, strides=[s * span.itemsize for s in self.stride])
        out.reshape(self.shape).view(span.dtype)[...] = view  # bits as stored, whatever `out` calls them


def _read_exactly(path: str, position: int, buffer: np.ndarray) -> None:
    view = memoryview(buffer).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(position)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise HNetError(f"{path} ends inside a tensor's data (truncated checkpoint?)")
            done += n


def check_layout(path: str, tensor: StoredTensor) -> None:
    """One clear line for a tensor whose layout points outside its storage (a corrupt checkpoint)."""
    if len(tensor.shape) != len(tensor.stride) or any(s < 0 for s in tensor.stride) or tensor.offset < 0 \
            or any(n < 0 for n in tensor.shape):
        raise HNetError(f"{path}: a tensor has a malformed layout (corrupt checkpoint)")
    if tensor.nbytes and tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) >= tensor.numel:
        raise HNetError(f"{path}: a tensor points outside its storage (corrupt checkpoint)")


def safetensors_entries(path: str, header: dict) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, from its parsed header (hnet_core.io.read_safetensors_header)."""
    base = 8 + _header_length(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise HNetError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which H-Net weights never use")
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
        numel = int(np.prod(shape, dtype=np.int64))
        if end - begin != numel * itemsize:
            raise HNetError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} (corrupt file)")
        stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        out[name] = StoredTensor(path, base + begin, numel, dtype, shape, stride)
    return out


def _header_length(path: str) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")

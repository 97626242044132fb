"""Reading a PyTorch `.pt` state dict without torch: a restricted reader of torch.save's zip format.

torch.save (zip format, torch >= 1.6) writes `<root>/data.pkl`, a pickle of the state dict in which
every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
storage a persistent id `("storage", torch.FloatStorage, key, location, numel)` whose bytes are the
file `<root>/data/<key>`. This reader runs that pickle with an unpickler that knows exactly those
globals (plus collections.OrderedDict) and refuses every other one, so it never executes code from
the file. It reads no tensor data: each tensor comes back as a `StoredTensor` (where its bytes are
in the file, its dtype and layout), so callers read one tensor at a time and never hold the whole
checkpoint (stored_tensor.py). bfloat16 keeps its name and is read as its raw bits.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import HNetError
from .stored_tensor import NUMPY_DTYPES, StoredTensor, check_layout

# torch storage class -> dtype name (stored_tensor.NUMPY_DTYPES says how its bytes read)
STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclass(frozen=True)
class StorageType:
    name: str


class _Reader(pickle.Unpickler):
    def __init__(self, pickle_file, archive: zipfile.ZipFile, raw, root: str, path: str):
        super().__init__(pickle_file)
        self.archive, self.file, self.root, self.path = archive, raw, root, path
        self.size = os.path.getsize(path)
        self.storages: dict[str, tuple[str, int, int, str]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        raise HNetError(f"{self.path} holds a pickled {module}.{name}, which is not part of a state dict of tensors; "
                        "refusing to load it (only tensors are read from checkpoints, never code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise HNetError(f"{self.path} has an unexpected storage reference {pid!r:.80}; not a torch state dict")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._locate(str(key), storage_type.name, int(numel))
        return self.storages[key]

    def _locate(self, key: str, storage: str, numel: int) -> tuple[str, int, int, str]:
        """(path, byte offset in the file, elements, dtype) of a storage, checked against its zip entry."""
        dtype = STORAGES[storage]
        try:
            info = self.archive.getinfo(f"{self.root}/data/{key}")
        except KeyError:
            raise HNetError(f"{self.path} is missing tensor data {key!r} (truncated checkpoint?)") from None
        if info.file_size < numel * np.dtype(NUMPY_DTYPES[dtype]).itemsize:
            raise HNetError(f"{self.path}: tensor data {key!r} is shorter than its {numel} elements (truncated?)")
        if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; a re-zipped file did
            raise HNetError(f"{self.path} has compressed tensor data; re-save it with torch.save")
        # The data follows the member's local header: 30 bytes, then its name and extra field.
        self.file.seek(info.header_offset)
        local = self.file.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise HNetError(f"{self.path}: corrupt zip entry for tensor data {key!r}")
        name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_length + extra_length
        if start + numel * np.dtype(NUMPY_DTYPES[dtype]).itemsize > self.size:
            raise HNetError(f"{self.path} ends inside tensor data {key!r} (truncated checkpoint?)")
        return (self.path, start, numel, dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> StoredTensor:
    path, start, numel, dtype = storage
    tensor = StoredTensor(path, start, numel, dtype, tuple(int(s) for s in size), tuple(int(s) for s in stride),
                          int(offset))
    check_layout(path, tensor)
    return tensor


def _rebuild_parameter(data: StoredTensor, requires_grad=False, hooks=None) -> StoredTensor:
    return data


def _legacy_hint(path: str) -> str:
    """What to do with a legacy (pre-zip) checkpoint; only torch reads that format."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "reading the legacy format needs PyTorch: pip install torch"
    return (f"re-save it in the zip format once with torch: python -c \"import torch; "
            f"torch.save(torch.load('{path}', weights_only=True), 'model.pt')\"")


def read_state_dict(path: str) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of a torch.save zip checkpoint (a state dict, or {"model": state dict}); no
    tensor data is read here."""
    if not zipfile.is_zipfile(path):
        raise HNetError(f"{path} is not a zip-format PyTorch checkpoint (torch >= 1.6); {_legacy_hint(path)}")
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise HNetError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
            root = pickles[0].split("/")[0]
            byteorder = f"{root}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise HNetError(f"{path} was saved big-endian; convert it on the machine that wrote it")
            with archive.open(pickles[0]) as f:
                data = _Reader(f, archive, raw, root, path).load()
    except HNetError:
        raise
    except Exception as e:  # truncated zip, corrupt pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HNetError(f"cannot read {path} as a PyTorch state dict (truncated or not a checkpoint?): {reason[:160]}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # a training checkpoint wrapping the state dict
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, StoredTensor) for k, v in data.items()):
        raise HNetError(f"{path} does not hold a state dict of tensors")
    return dict(data)

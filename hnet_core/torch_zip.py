"""Reading a PyTorch `.pt` state dict without torch: a restricted reader of torch.save's zip format.

torch.save (zip format, torch >= 1.6) writes `<root>/data.pkl`, a pickle of the state dict in which
every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
storage a persistent id `("storage", torch.FloatStorage, key, location, numel)` whose bytes are the
file `<root>/data/<key>`. This reader runs that pickle with an unpickler that knows exactly those
globals (plus collections.OrderedDict) and refuses every other one, so it never executes code from
the file; tensors are rebuilt as numpy arrays from the raw little-endian bytes. bfloat16, which numpy
lacks, comes back as float32 (exact: bf16 is the top half of an fp32) with its dtype named in the
second return value, so callers can cast it back losslessly.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import HNetError

# torch storage class -> (numpy dtype of the stored bytes, dtype name)
STORAGES = {
    "FloatStorage": (np.float32, "float32"),
    "DoubleStorage": (np.float64, "float64"),
    "HalfStorage": (np.float16, "float16"),
    "BFloat16Storage": (np.uint16, "bfloat16"),
    "LongStorage": (np.int64, "int64"),
    "IntStorage": (np.int32, "int32"),
    "ShortStorage": (np.int16, "int16"),
    "CharStorage": (np.int8, "int8"),
    "ByteStorage": (np.uint8, "uint8"),
    "BoolStorage": (np.bool_, "bool"),
}


@dataclass(frozen=True)
class StorageType:
    name: str


@dataclass
class Tensor:
    """A rebuilt tensor: numpy data (bf16 widened to fp32) and the checkpoint's dtype name."""

    array: np.ndarray
    dtype: str


class _Reader(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(file)
        self.archive, self.root, self.path = archive, root, path
        self.storages: dict[str, np.ndarray] = {}

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
            dtype = np.dtype(STORAGES[storage_type.name][0]).newbyteorder("<")
            try:
                data = self.archive.read(f"{self.root}/data/{key}")
            except KeyError:
                raise HNetError(f"{self.path} is missing tensor data {key!r} (truncated checkpoint?)") from None
            if len(data) < numel * dtype.itemsize:
                raise HNetError(f"{self.path}: tensor data {key!r} is shorter than its {numel} elements (truncated?)")
            self.storages[key] = np.frombuffer(data, dtype=dtype, count=numel)
        return (storage_type.name, self.storages[key])


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> Tensor:
    name, flat = storage
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in stride) or offset < 0:
        raise HNetError("a tensor in the checkpoint has a malformed layout (corrupt checkpoint)")
    if int(np.prod(size)) > 0 and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= flat.size:
        raise HNetError("a tensor in the checkpoint points outside its storage (corrupt checkpoint)")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
    array = np.array(view, dtype=flat.dtype.newbyteorder("="))  # a contiguous, native-order copy
    dtype_name = STORAGES[name][1]
    if dtype_name == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return Tensor(array, dtype_name)


def _rebuild_parameter(data: Tensor, requires_grad=False, hooks=None) -> Tensor:
    return data


def _legacy_hint(path: str) -> str:
    """What to do with a legacy (pre-zip) checkpoint; only torch reads that format."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "reading the legacy format needs PyTorch: pip install torch"
    return (f"re-save it in the zip format once with torch: python -c \"import torch; "
            f"torch.save(torch.load('{path}', weights_only=True), 'model.pt')\"")


def read_state_dict(path: str) -> dict[str, Tensor]:
    """{name: Tensor} from a torch.save zip checkpoint (a state dict, or {"model": state dict})."""
    if not zipfile.is_zipfile(path):
        raise HNetError(f"{path} is not a zip-format PyTorch checkpoint (torch >= 1.6); {_legacy_hint(path)}")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise HNetError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
            root = pickles[0].split("/")[0]
            byteorder = f"{root}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise HNetError(f"{path} was saved big-endian; convert it on the machine that wrote it")
            with archive.open(pickles[0]) as f:
                data = _Reader(f, archive, root, path).load()
    except HNetError:
        raise
    except Exception as e:  # truncated zip, corrupt pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HNetError(f"cannot read {path} as a PyTorch state dict (truncated or not a checkpoint?): {reason[:160]}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # a training checkpoint wrapping the state dict
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise HNetError(f"{path} does not hold a state dict of tensors")
    return dict(data)

"""File helpers shared by every backend: atomic writes and the model-directory layout.

Our model directory is the one mlx-lm uses: `config.json` + `model.safetensors`, or, above a
size limit, `model-00001-of-0000N.safetensors` shards listed in `model.safetensors.index.json`
(`{"metadata": {...}, "weight_map": {tensor name: shard file}}`). Everything is written to a
temporary name first and renamed, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import HNetError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # mlx-lm's default shard size


def check_output_path(path: str | os.PathLike, what: str = "output") -> str:
    """Refuse, before any work, an output path that cannot be written: a file where a directory
    must be, a directory without write permission. Returns the absolute path. (Missing parent
    directories are fine: the writers create them.)"""
    path = os.path.abspath(os.fspath(path))
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise HNetError(f"cannot write {what} {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HNetError(f"cannot write {what} {path}: no permission to write in {ancestor}; choose another path")
    return path


def _write_error(e: OSError, path: str, what: str = "output") -> HNetError:
    try:
        check_output_path(path, what)
    except HNetError as clear:
        return clear
    return HNetError(f"cannot write {what} {path}: {e.strerror or e}; choose another path")


def make_dirs(path: str | os.PathLike, what: str = "output directory") -> None:
    """os.makedirs(path, exist_ok=True), with a one-line HNetError when the path cannot be created."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _write_error(e, path, what) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything under it) the permissions a plain open()/mkdir
    would: 0666/0777 less the umask. Temporary files (mkstemp, mkdtemp) start private (0600/0700), and
    so do files some libraries write through their own temporary names (safetensors' torch save_file),
    so every writer calls this on its output before the final rename."""
    mask = _umask()
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise HNetError(f"cannot write {path}: it is a directory; give a file name")
    make_dirs(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    except OSError as e:
        raise _write_error(e, path, "file") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        normal_permissions(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, not_found: str = "{path} not found",
              invalid: str = "{path} is not valid JSON ({error})") -> Any:
    """The JSON value in file `path`; a missing file or one that is not JSON is one HNetError line, the
    `not_found` or `invalid` message with {path} (and {error}) filled in."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HNetError(not_found.format(path=path))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HNetError(invalid.format(path=path, error=e)) from None


def write_json(path: str | os.PathLike, data: Any, indent: int) -> None:
    """`data` as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst` in one rename.

    Refuses to replace an existing non-empty `dst` unless `force`.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise HNetError(f"output path {dst} exists and is not a directory; choose another path")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise HNetError(f"output directory {dst} already exists and is not empty; pass --force to overwrite it")
    parent = os.path.dirname(dst)
    make_dirs(parent)
    try:
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(dst) + "-", dir=parent)
    except OSError as e:
        raise _write_error(e, dst) from None
    try:
        yield tmp
        normal_permissions(tmp)  # mkdtemp's 0700, and whatever the writers inside left
        if os.path.isdir(dst):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(dst) + "-", dir=parent)
            os.rmdir(old)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plan_shards(sizes: dict[str, int], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[str]]:
    """Split tensor names (in order) into shards of at most `max_shard_bytes` each."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: str, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=2) + "\n")


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a model directory, from its index if there is one."""
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HNetError(f"{index_path} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = [WEIGHTS_NAME]
    paths = [os.path.join(directory, name) for name in files]
    for p in paths:
        if not os.path.exists(p):
            raise HNetError(f"weights file not found: {p}")
    return paths


def is_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME)) and (
        os.path.exists(os.path.join(path, WEIGHTS_NAME)) or os.path.exists(os.path.join(path, INDEX_NAME))
    )


def read_safetensors_header(path: str) -> dict:
    """Parse a safetensors header without reading tensor data (detects truncation early)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HNetError(f"{path} is truncated or not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise HNetError(f"{path} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HNetError(f"{path} is not a safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise HNetError(f"{path} is truncated: header promises {8 + n + end} bytes, file has {size}")
    return header

"""File helpers shared by every backend: atomic writes and the model-directory layout.

Our model directory is the one mlx-lm uses: `config.json` + `model.safetensors`, or, above a
size limit, `model-00001-of-0000N.safetensors` shards listed in `model.safetensors.index.json`
(`{"metadata": {...}, "weight_map": {tensor name: shard file}}`). Everything is written through
`atomic_path` (a temporary sibling, fsync, rename), so an interrupted write never leaves a
half-written file (docs/robustness.md).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
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


# Temporaries are hidden siblings named `.tmp-<pid>-<random>-<name>` (`.old-...` for a directory
# being replaced), so a later run can tell a leftover of a dead process from the work of a live one.
_TEMPORARY = re.compile(r"^\.(tmp|old)-(\d+)-[a-z0-9_]{8}-(.+)$")
_TERMINATED = 128 + signal.SIGTERM  # the shell's exit status for "killed by SIGTERM"
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_WORDS = ("No space left on device", "File too large", "Disk quota exceeded")
_MLX_WRITE_FAILED = "Unable to write"  # mlx's save_safetensors drops the errno: "[write] Unable to write N bytes"


class Terminated(SystemExit):
    """SIGTERM arrived while a temporary existed; raised so that every `finally` (and our cleanup) runs."""

    def __init__(self):
        super().__init__(_TERMINATED)


def _raise_terminated(signum, frame):
    raise Terminated()


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
def _terminate_by_exception() -> Iterator[None]:
    """SIGTERM's default action ends the process without running `finally` blocks, which would leave
    the temporary behind; while one exists, SIGTERM raises instead. A handler someone else installed
    (training's stop request) is left alone: it already lets the write finish."""
    installed = False
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
        installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the few renames that publish a write, so no signal splits them
    (they are delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # some filesystems cannot fsync a directory; the data is what matters
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def clean_temporaries(directory: str | os.PathLike, name: str | None = None, quiet: bool = False) -> list[str]:
    """Remove what an interrupted earlier write (SIGKILL, power loss) left in `directory`: our
    temporaries whose process is gone (only those of `name`, when given). Says so in one line on
    stderr; returns the removed paths."""
    directory = os.fspath(directory)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    removed, restored = [], []
    for entry in entries:
        m = _TEMPORARY.match(entry)
        if m is None or (name is not None and m.group(3) != name) or _pid_alive(int(m.group(2))):
            continue
        path, target = os.path.join(directory, entry), os.path.join(directory, m.group(3))
        if m.group(1) == "old" and not os.path.lexists(target):
            # Killed between its two renames: this is the previous output, and nothing replaced it.
            os.replace(path, target)
            restored.append(target)
            continue
        _remove(path)
        removed.append(path)
    if (removed or restored) and not quiet:
        what = "temporary" if len(removed) == 1 else "temporaries"
        again = f" and put back {', '.join(restored)}" if restored else ""
        print(f"removed {len(removed)} leftover {what} of an interrupted earlier write in {directory}{again}",
              file=sys.stderr, flush=True)
    return removed


def is_disk_full(error: BaseException) -> bool:
    """Out of space or over a file-size limit, whichever library reported it (safetensors and mlx
    raise their own exception types with the system's words in them)."""
    if isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno in _FULL_ERRNOS):
        return True
    return isinstance(error, Exception) and any(w in str(error) for w in (*_FULL_WORDS, _MLX_WRITE_FAILED))


class DiskFull(HNetError):
    """A write ran out of space; `reason` is the system's words for it."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _full_error(error: BaseException, path: str, what: str) -> DiskFull:
    # A nested write (a model directory inside a checkpoint) already said why; the outermost names the path.
    reason = error.reason if isinstance(error, DiskFull) else (
        error.strerror if isinstance(error, OSError) and error.strerror else
        next((w for w in _FULL_WORDS if w in str(error)), "The disk refused the data (full, or a file-size limit)"))
    return DiskFull(f"cannot write {what} {path}: {reason[0].lower() + reason[1:]}; nothing was written "
                     f"(free some space or choose another path)", reason)


_depth = 0  # atomic writes under way in this process, nested ones counted


def _fault_delay() -> None:
    """HNET_FAULT_DELAY_WRITE=SECONDS: pause this long while each temporary exists (once before it
    is filled, once before the rename), so the fault-injection tests can hit a write's window."""
    delay = os.environ.get("HNET_FAULT_DELAY_WRITE")
    if delay and _depth == 1:  # the outermost write only (a checkpoint, not each file inside it)
        time.sleep(float(delay))


@contextmanager
def atomic_path(dst: str | os.PathLike, directory: bool, what: str = "output") -> Iterator[str]:
    """The one way this project writes a file or directory: yield a temporary sibling of `dst` to
    write into; on success fsync it, then rename it over `dst` with SIGINT/SIGTERM held back.

    On any exit it can see (an exception, Ctrl-C, SIGTERM) the temporary is removed, so `dst` is
    either the complete new output or what it was before. A full disk becomes one HNetError line.
    Leftovers of an earlier, killed write of the same `dst` are removed first.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    make_dirs(parent)
    clean_temporaries(parent, name)
    global _depth
    with _terminate_by_exception():
        prefix = f".tmp-{os.getpid()}-"
        try:
            if directory:
                tmp = tempfile.mkdtemp(prefix=prefix, suffix="-" + name, dir=parent)
            else:
                fd, tmp = tempfile.mkstemp(prefix=prefix, suffix="-" + name, dir=parent)
                os.close(fd)
        except OSError as e:
            raise _write_error(e, dst, what) from None
        _depth += 1
        old = None
        try:
            _fault_delay()
            yield tmp
            _fault_delay()
            normal_permissions(tmp)  # mkstemp/mkdtemp start private (0600/0700)
            _fsync_tree(tmp)
            with _signals_blocked():
                if directory and os.path.isdir(dst):
                    # A directory cannot be replaced in one rename: move the old one aside first. A
                    # crash between the two leaves `.old-*`, which clean_temporaries removes.
                    old = os.path.join(parent, ".old-" + os.path.basename(tmp)[len(".tmp-"):])
                    os.replace(dst, old)
                try:
                    os.replace(tmp, dst)
                except BaseException:
                    if old is not None:  # put the previous output back
                        os.replace(old, dst)
                        old = None
                    raise
            _fsync(parent)
        except BaseException as e:
            _remove(tmp)
            if isinstance(e, DiskFull) or is_disk_full(e):
                raise _full_error(e, dst, what) from None
            raise
        finally:
            _depth -= 1
            if old is not None:
                _remove(old)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HNetError(f"cannot write {path}: it is a directory; give a file name")
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    with atomic_path(path, directory=False, what=what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "output", force: bool = True) -> Iterator[str]:
    """Yield a temporary path for a library to write one file to (safetensors, savefig...); it
    replaces `path` on success (refused when `path` exists, unless `force`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HNetError(f"cannot write {what} {path}: it is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise HNetError(f"{path} already exists; pass --force to overwrite it")
    with atomic_path(path, directory=False, what=what) as tmp:
        yield tmp


@contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False, what: str = "output") -> Iterator[str]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst` (see atomic_path).

    Refuses to replace an existing non-empty `dst` unless `force`.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise HNetError(f"output path {dst} exists and is not a directory; choose another path")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise HNetError(f"output directory {dst} already exists and is not empty; pass --force to overwrite it")
    with atomic_path(dst, directory=True, what=what) as tmp:
        yield tmp


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

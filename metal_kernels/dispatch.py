"""Measured dispatch for use_kernels="auto": a kernel runs only where it is correct and faster.

The model package asks `prefer_kernel(name, args, pure)` on every "auto" call on a Mac (Metal present,
default device the GPU). The answer, for the call's *shape class*, comes from:

  1. Correctness first. The call's exact compiled variant (input dtypes, optional inputs, template
     sizes: selftest.Variant) is checked once per process against the pure-MLX path on small
     inputs (selftest.check_variant). A variant that fails is never timed and never used, with
     one warning naming it.
  2. Speed. The shape class is (kernel, batch bucket, length bucket, head sizes, chunk size,
     variant); buckets are powers of two, so a 37-byte and a 60-byte prompt share one class.
     At its first use both paths are timed on synthetic inputs of the class's shape (one warm-up,
     then up to `reps` runs until `budget_s` = 0.1 s have passed, best run kept). Scans
     that have a backward (ssd_scan, ema_dechunk) are timed forward and forward+backward, and the
     kernel is chosen only if it wins both (a call cannot tell whether a gradient will follow).
     Measuring stops for the process after `max_total_s` seconds (gates included); classes first
     seen after that run the pure path and are measured by a later process.
  3. Memory. Decisions are written to `dispatch.json` in the user's cache directory
     ($HNET_METAL_KERNELS_CACHE, else ~/Library/Caches/hnet_metal_kernels on macOS,
     $XDG_CACHE_HOME/hnet_metal_kernels or ~/.cache/hnet_metal_kernels elsewhere) together with
     the identity of what was measured: chip, OS version, MLX version and a hash of the kernel
     sources and of the pure paths' files (PurePaths.files). A file whose identity differs is
     ignored and rewritten, so a new chip, macOS, MLX or kernel re-measures.

Timing happens outside any graph being traced (fresh inputs, mx.eval), so it also works while
`mx.compile` traces a decode step. `Dispatcher` takes the pure paths, its factory, timer and cache path
as arguments: the tests run the logic on Linux with the emulator factory and a fake timer.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .factory import KernelFactory, current_factory
from .reference import PurePaths
from .selftest import DTYPES, Variant, check_variant, variant_of
from .sources import HERE, KERNELS

CACHE_ENV = "HNET_METAL_KERNELS_CACHE"
CACHE_FILE = "dispatch.json"
FORMAT = 1
F32 = mx.float32

# timer(label, run) -> seconds for one run of `run` (which evaluates its result); label is
# "<kernel> kernel|pure forward|backward".
Timer = Callable[[str, Callable[[], None]], float]


def cache_dir() -> Path:
    """Where dispatch decisions are kept (see the module docstring)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "hnet_metal_kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hnet_metal_kernels"


def sources_hash(pure_files: tuple[str, ...] = ()) -> str:
    """Hash of everything whose change can change a timing: the kernel bodies, their wrappers and
    `pure_files` (the files of the pure paths, PurePaths.files)."""
    h = hashlib.sha256()
    files = [HERE / f"{k}.metal" for k in KERNELS] + [HERE / f for f in ("ssd.py", "step.py", "ema.py")]
    files += [Path(f) for f in pure_files]
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def chip_name() -> str:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return str(info.get("device_name") or info.get("architecture") or "unknown")
    except Exception:  # no Metal device (Linux): the identity still has to be a string
        return platform.machine() or "unknown"


def os_version() -> str:
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else platform.platform()


def identity(pure_files: tuple[str, ...] = ()) -> dict[str, str]:
    """What a set of measurements is valid for."""
    return {"chip": chip_name(), "os": os_version(), "mlx": mx.__version__, "sources": sources_hash(pure_files),
            "format": str(FORMAT)}


def wall_timer(budget_s: float = 0.1, reps: int = 5, clock: Callable[[], float] = time.perf_counter) -> Timer:
    """The real timer: one warm-up run (pipeline compilation), then up to `reps` runs, stopping
    once `budget_s` seconds have passed; the best run (least disturbed by other work). One timing
    therefore costs at most warm-up + budget_s + one run. `clock` is injectable for tests."""

    def timer(label: str, run: Callable[[], None]) -> float:
        run()
        best = float("inf")
        start = clock()
        for _ in range(reps):
            t = clock()
            run()
            best = min(best, clock() - t)
            if clock() - start > budget_s:
                break
        return best

    return timer


def _bucket(n: int) -> int:
    """The power of two at or above n (at least 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class Decision:
    use_kernel: bool
    kernel_s: list[float]  # forward[, forward+backward]
    pure_s: list[float]

    def as_json(self) -> dict:
        return {"use_kernel": self.use_kernel, "kernel_s": self.kernel_s, "pure_s": self.pure_s}


def shape_class(name: str, args: tuple) -> tuple[str, dict[str, int], Variant]:
    """(key, sizes to time at, variant) of a call `name(*args)`."""
    variant = variant_of(name, args)
    if name == "ssm_step":
        b, h, p, n = args[0].shape
        sizes = {"b": _bucket(b), "h": h, "g": args[5].shape[1], "p": p, "n": n}
    elif name == "conv_step":
        b, c, k = args[0].shape
        sizes = {"b": _bucket(b), "c": c, "k": k}
    elif name == "ssd_scan":
        b, l, h, p = args[0].shape
        sizes = {"b": _bucket(b), "l": _bucket(l), "h": h, "g": args[3].shape[2], "p": p, "n": args[3].shape[3],
                 "chunk": int(args[5])}
    elif name == "ema_dechunk":
        b, m, d = args[0].shape
        sizes = {"b": _bucket(b), "l": _bucket(args[2].shape[1]), "m": _bucket(m), "d": d}
    else:
        raise ValueError(f"unknown kernel {name!r}")
    key = name + "|" + ",".join(f"{k}={v}" for k, v in sizes.items()) + "|" + ",".join(d or "-" for d in variant.dtypes)
    return key, sizes, variant


def _synthetic(name: str, sizes: dict[str, int], variant: Variant, seed: int = 0) -> tuple:
    """Inputs of the class's shape with the variant's dtypes and optional inputs (fresh arrays,
    never the traced ones)."""
    rng = np.random.default_rng(seed)
    dts = variant.dtypes

    def f(i, *shape, scale=1.0):
        a = mx.array((rng.standard_normal(shape) * scale).astype(np.float32))
        return a.astype(DTYPES[dts[i]]) if dts[i] in DTYPES else a

    s = sizes
    if name == "ssm_step":
        return (f(0, s["b"], s["h"], s["p"], s["n"]), f(1, s["b"], s["h"], s["p"]), f(2, s["b"], s["h"]), f(3, s["h"]),
                (-mx.exp(f(4, s["h"]))).astype(DTYPES[dts[4]]), f(5, s["b"], s["g"], s["n"]), f(6, s["b"], s["g"], s["n"]),
                f(7, s["h"]))
    if name == "conv_step":
        return f(0, s["b"], s["c"], s["k"]), f(1, s["b"], s["c"]), f(2, s["c"], s["k"]), f(3, s["c"])
    if name == "ssd_scan":
        b, l, h, g = s["b"], s["l"], s["h"], s["g"]
        dt = mx.array(rng.uniform(1e-3, 0.1, (b, l, h)).astype(np.float32)).astype(DTYPES[dts[1]])
        seq = mx.array(np.repeat((np.arange(l) >= l // 2)[None], b, 0).astype(np.int32)) if dts[7] else None
        init = f(8, b, h, s["p"], s["n"]) if dts[8] else None
        return (f(0, b, l, h, s["p"]), dt, (-mx.exp(f(2, h))).astype(DTYPES[dts[2]]), f(3, b, l, g, s["n"]),
                f(4, b, l, g, s["n"]), s["chunk"], f(6, h) if dts[6] else None, seq, init)
    if name == "ema_dechunk":
        b, l, m, d = s["b"], s["l"], min(s["m"], s["l"]), s["d"]
        starts = np.sort(rng.choice(np.arange(1, l), size=m - 1, replace=False)) if m > 1 else np.zeros(0, int)
        mask = np.zeros(l, bool)
        mask[0] = True
        mask[starts] = True
        ci = mx.array(np.repeat((np.cumsum(mask) - 1)[None], b, 0).astype(np.int32))
        p = mx.array(rng.uniform(0.05, 0.95, (b, m)).astype(np.float32)).astype(DTYPES.get(dts[1], F32))
        seq = mx.array(np.repeat((np.arange(m) >= m // 2)[None], b, 0).astype(np.int32)) if dts[3] else None
        return f(0, b, m, d), p, ci, seq
    raise ValueError(f"unknown kernel {name!r}")


def _paths(name: str, factory: KernelFactory, pure: PurePaths):
    """(kernel function, pure function) with the wrapper's signature."""
    import hnet_metal_kernels as hk

    kernel = getattr(hk, name)
    return (lambda *a: kernel(*a, factory=factory)), pure.of(name)


def _backward_run(name: str, fn, args: tuple) -> Callable[[], None]:
    """One forward+backward of `fn` on `args` (ssd_scan: in x, dt, B, C; ema_dechunk: in values, p)."""
    if name == "ssd_scan":
        def loss(x, dt, B, C):
            y, final = fn(x, dt, args[2], B, C, *args[5:])
            return y.sum() + final.sum()

        g = mx.grad(loss, argnums=[0, 1, 2, 3])
        return lambda: mx.eval(g(args[0], args[1], args[3], args[4]))
    g = mx.grad(lambda v, p: fn(v, p, *args[2:]).sum(), argnums=[0, 1])
    return lambda: mx.eval(g(args[0], args[1]))


def _forward_run(fn, args: tuple) -> Callable[[], None]:
    return lambda: mx.eval(fn(*args))


HAS_BACKWARD = ("ssd_scan", "ema_dechunk")


@dataclass
class Dispatcher:
    """Per-process state of measured dispatch; one default instance serves the model package ("auto").

    pure: the pure paths kernels are checked and timed against (required before the first
    prefer_kernel; `prefer_kernel(name, args, pure)` sets it on the default instance);
    factory: where kernels run while gating and timing (default: the current factory, i.e. Metal);
    timer: see `Timer` (default: `wall_timer()`); path: the cache file (default: cache_dir()/dispatch.json)."""

    pure: PurePaths | None = None
    factory: KernelFactory | None = None
    timer: Timer | None = None
    path: Path | None = None
    max_total_s: float = 10.0  # measuring stops for this process past this much time (new classes: pure path)
    gates: dict = field(default_factory=dict)  # Variant -> {check: problem | None}
    decisions: dict = field(default_factory=dict)  # shape class key -> Decision
    measured_s: float = 0.0  # total time spent gating and timing in this process
    _loaded: bool = False
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _warned: set = field(default_factory=set)
    _failed: set = field(default_factory=set)  # classes whose timing raised (pure path, this process)

    def _file(self) -> Path:
        return self.path if self.path is not None else cache_dir() / CACHE_FILE

    def _factory(self) -> KernelFactory:
        return current_factory(self.factory)

    def _pure(self) -> PurePaths:
        if self.pure is None:
            raise ValueError("this Dispatcher has no pure paths to check and time the kernels against")
        return self.pure

    def _identity(self) -> dict[str, str]:
        return identity(self._pure().files)

    # -- correctness gate ------------------------------------------------------------------

    def gate(self, variant: Variant) -> str | None:
        """None if this compiled variant matches the pure path (checked once per process), else why not."""
        if variant not in self.gates:
            start = time.perf_counter()
            self.gates[variant] = check_variant(variant, self._pure(), self._factory())
            self.measured_s += time.perf_counter() - start
        problems = {k: v for k, v in self.gates[variant].items() if v}
        if not problems:
            return None
        check, why = next(iter(problems.items()))
        return f"{variant.describe()} {check}: {why}"

    # -- cache file ------------------------------------------------------------------------

    def _read(self) -> dict[str, Decision]:
        """The decisions on disk that are valid here (none if measured for another identity)."""
        try:
            data = json.loads(self._file().read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("identity") != self._identity():
            return {}  # measured for another chip, OS, MLX or kernel source: measure again
        out = {}
        for key, d in (data.get("decisions") or {}).items():
            try:
                out[key] = Decision(bool(d["use_kernel"]), [float(x) for x in d["kernel_s"]], [float(x) for x in d["pure_s"]])
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for key, decision in self._read().items():
                self.decisions.setdefault(key, decision)

    def _save(self) -> None:
        from hnet_core.io import atomic_write_text

        for key, decision in self._read().items():  # keep what another process added meanwhile
            self.decisions.setdefault(key, decision)
        data = {"identity": self._identity(), "decisions": {k: d.as_json() for k, d in sorted(self.decisions.items())}}
        try:
            self._file().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._file(), json.dumps(data, indent=1) + "\n")
        except OSError as e:  # an unwritable cache only costs a re-measure in the next process
            self._warn("cache", f"hnet_metal_kernels: could not write the dispatch cache {self._file()}: {e}")

    def _warn(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- timing ----------------------------------------------------------------------------

    def measure(self, name: str, sizes: dict[str, int], variant: Variant) -> Decision:
        """Time kernel and pure path at the class's shape (forward, and forward+backward for the scans)."""
        timer = self.timer or wall_timer()
        kernel, pure = _paths(name, self._factory(), self._pure())
        args = _synthetic(name, sizes, variant)
        passes = [("forward", lambda fn: _forward_run(fn, args))]
        if name in HAS_BACKWARD:
            passes.append(("backward", lambda fn: _backward_run(name, fn, args)))
        kernel_s, pure_s = [], []
        for what, make in passes:
            kernel_s.append(float(timer(f"{name} kernel {what}", make(kernel))))
            pure_s.append(float(timer(f"{name} pure {what}", make(pure))))
        return Decision(all(k < p for k, p in zip(kernel_s, pure_s)), kernel_s, pure_s)

    def prefer_kernel(self, name: str, args: tuple) -> bool:
        """Whether the kernel should run for this call (gated and measured at first use of its class)."""
        key, sizes, variant = shape_class(name, args)
        with self._lock:
            problem = self.gate(variant)
            if problem is not None:
                self._warn(("gate", variant), f"hnet_metal_kernels: {problem}; using the pure-MLX path for it. "
                           "Please report this with `python -m hnet_metal_kernels.verify`.")
                return False
            self._load()
            decision = self.decisions.get(key)
            if decision is None:
                if key in self._failed:
                    return False
                if self.measured_s >= self.max_total_s:
                    # bounded: a program hitting many shapes measures some and runs the rest pure
                    # (unmeasured classes are not remembered; the next process measures them)
                    return False
                start = time.perf_counter()
                try:
                    decision = self.measure(name, sizes, variant)
                except Exception as exc:  # a kernel that passed its check but fails at this shape: pure path
                    self.measured_s += time.perf_counter() - start
                    self._warn(("measure", key), f"hnet_metal_kernels: timing {key} failed ({type(exc).__name__}: "
                               f"{exc}); using the pure-MLX path for it. Please report this with "
                               "`python -m hnet_metal_kernels.verify`.")
                    self._failed.add(key)  # not remembered on disk: a later process tries again
                    return False
                self.measured_s += time.perf_counter() - start
                self.decisions[key] = decision
                self._save()
            return decision.use_kernel


_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher (real Metal, wall-clock timer, the user's cache directory)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Dispatcher()
        return _DEFAULT


def set_default_dispatcher(dispatcher: Dispatcher | None) -> Dispatcher | None:
    """Replace the process's dispatcher (None: a fresh default at next use); returns the old one."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        old, _DEFAULT = _DEFAULT, dispatcher
        return old


def prefer_kernel(name: str, args: tuple, pure: PurePaths) -> bool:
    """The model package's "auto" question: run kernel `name` for the call `name(*args)`? (`pure`:
    its pure paths, which the process's dispatcher checks and times the kernel against.)"""
    dispatcher = default_dispatcher()
    if dispatcher.pure is None:
        dispatcher.pure = pure
    return dispatcher.prefer_kernel(name, args)

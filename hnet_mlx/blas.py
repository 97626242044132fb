"""MLX at full speed on Linux: load the system's OpenBLAS before MLX is first imported (MLX-specific:
torch ships its own BLAS; its thread policy is hnet_torch/threads.py).

The Linux `mlx[cpu]` wheel links its matmuls (cblas_sgemm ...) against the reference BLAS it bundles,
about 25x slower than an optimized one (8 vs 225 GFLOP/s measured on this project's CPU). Symbols
are looked up in the process's global scope first, so a BLAS loaded there with RTLD_GLOBAL *before*
libmlx.so is loaded serves MLX's calls instead; once MLX is loaded its symbols are bound and loading
a BLAS changes nothing (then only `LD_PRELOAD=libopenblas.so.0` at process start helps, e.g. for
mlx-lm's own commands, or the start-up hook of hnet_core/mlx_blas_startup.py that does the same for them).

`hnet_mlx` calls `preload()` first thing on import. HNET_MLX_BLAS=off turns it off; HNET_MLX_BLAS=PATH
names another LP64 CBLAS library. macOS needs none of this (MLX uses Accelerate / Metal).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

ENV = "HNET_MLX_BLAS"
CANDIDATES = ("libopenblas.so.0", "libopenblas.so")  # Debian/Ubuntu: apt-get install libopenblas0
HINT = ("hnet_mlx: no optimized BLAS found, so MLX's CPU matmuls use the slow reference BLAS bundled with "
        "mlx[cpu] (~25x slower); install one (Debian/Ubuntu: apt-get install libopenblas0), or set "
        f"{ENV}=off to silence this")
LATE_HINT = ("hnet_mlx: MLX was imported before hnet_mlx could load OpenBLAS, so it uses its slow bundled "
             "reference BLAS; start the process with LD_PRELOAD={lib} (or import hnet_mlx before mlx; for "
             "mlx_lm.* commands, `hnet-mlx blas-hook install` does it once per environment)")

status = "not checked"  # what `describe()` reports
_done = False


def _loaded_path(prefix: str) -> str | None:
    """Path of a loaded shared library whose file name starts with `prefix` (Linux /proc/self/maps).
    numpy's bundled libscipy_openblas64_ does not count: its symbols are renamed and ILP64."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                name = os.path.basename(fields[-1]) if len(fields) >= 6 else ""
                if name.startswith(prefix) and "64" not in name:
                    return fields[-1]
    except OSError:
        pass
    return None


def _find_library() -> str | None:
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return _loaded_path("libopenblas") or name
    return None


def preload(quiet: bool = False) -> str:
    """Load an optimized BLAS into the global symbol scope if MLX is not loaded yet; returns `status`."""
    global status, _done
    if _done:
        return status
    _done = True
    setting = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux"):
        status = "the platform's own (MLX uses Accelerate on macOS)"
        return status
    if setting.lower() in ("off", "0", "no", "false", "none"):
        status = f"MLX's bundled reference BLAS ({ENV}=off)"
        return status
    already = _loaded_path("libopenblas") or (_loaded_path(os.path.basename(setting)) if setting else None)
    if already:
        status = f"OpenBLAS ({already}), loaded before MLX" if "openblas" in already else f"{already}, loaded before MLX"
        return status
    if "mlx.core" in sys.modules:
        lib = setting or CANDIDATES[0]
        status = "MLX's bundled reference BLAS (MLX was imported first)"
        if not quiet:
            print(LATE_HINT.format(lib=lib), file=sys.stderr)
        return status
    if setting:
        try:
            ctypes.CDLL(setting, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            status = f"MLX's bundled reference BLAS ({ENV}={setting} could not be loaded: {e})"
            if not quiet:
                print(f"hnet_mlx: {ENV}={setting} could not be loaded ({e}); using MLX's bundled BLAS", file=sys.stderr)
            return status
        status = f"{setting}, loaded before MLX"
        return status
    found = _find_library()
    if found is None:
        status = "MLX's bundled reference BLAS (no OpenBLAS found)"
        if not quiet:
            print(HINT, file=sys.stderr)
        return status
    status = f"OpenBLAS ({found}), loaded before MLX"
    return status


def describe() -> str:
    """One line for -v output: which BLAS MLX's CPU matmuls use in this process."""
    return f"BLAS: {status}"


# -- threads ------------------------------------------------------------------------------------

_openblas_lib: ctypes.CDLL | None | bool = False  # False: not looked up yet
_default_threads: int | None = None
_current_threads: int | None = None


def _openblas() -> ctypes.CDLL | None:
    global _openblas_lib
    if _openblas_lib is False:
        path = _loaded_path("libopenblas")
        lib = ctypes.CDLL(path) if path else None
        _openblas_lib = lib if lib is not None and hasattr(lib, "openblas_set_num_threads") else None
    return _openblas_lib


def set_threads(n: int | None) -> None:
    """OpenBLAS threads for the matmuls that follow (None: OpenBLAS's own default); nothing without
    OpenBLAS. The decode step of a small model runs on one thread (hnet_core/step_threads.py: a
    second thread waits for a busy core), prefill on all. Pending work is finished before a change,
    since MLX runs matmuls on its own thread and the setting is process-wide."""
    global _default_threads, _current_threads
    lib = _openblas()
    if lib is None:
        return
    if _default_threads is None:
        _default_threads = _current_threads = int(lib.openblas_get_num_threads())
    want = _default_threads if n is None else n
    if want != _current_threads:
        import mlx.core as mx

        mx.synchronize()
        lib.openblas_set_num_threads(want)
        _current_threads = want


def get_threads() -> int | None:
    """OpenBLAS's current thread count (None without OpenBLAS)."""
    lib = _openblas()
    return None if lib is None else int(lib.openblas_get_num_threads())


# -- a few rows times a weight ------------------------------------------------------------------

# OpenBLAS's SkylakeX-family kernels (also what it runs on AMD Zen 4) multiply a few rows by a
# transposed weight, x @ W.T, with a "small-matrix" kernel only while rows x out_features <= 1200 and
# rows x out x in <= 1e6 (kernel/x86_64/sgemm_small_kernel_permit_skylakex.c); above that, sgemm copies
# ("packs") the whole weight into a buffer on every call. A decode step multiplies one row per sample:
# the bundled model's main-level fc1 (1536 x 256) took 110 µs that way and 47 µs as two 768-row
# products; at batch 4 every layer wider than 300 outputs packs.
SMALL_KERNEL_CORES = ("skylakex", "cooperlake", "sapphirerapids")
SMALL_OUTPUTS = 1200
SMALL_MNK = 1_000_000
MIN_BLOCK = 128  # fewer rows per block: too many products (a prefill's many rows take the packed path)


@functools.cache
def _has_small_kernels() -> bool:
    lib = _openblas()
    name = b""
    if lib is not None and hasattr(lib, "openblas_get_corename"):
        lib.openblas_get_corename.restype = ctypes.c_char_p
        name = lib.openblas_get_corename() or b""
    return name.decode(errors="replace").lower() in SMALL_KERNEL_CORES


def linear(layer, x):
    """`layer(x)`; for a float32 nn.Linear applied to a few rows on the CPU with OpenBLAS's small-matrix
    kernels, the product of x with row blocks of the weight small enough for them (each output is the
    same dot product; it may differ from the packed path's in the last bits)."""
    import mlx.core as mx
    import mlx.nn as nn

    if type(layer) is not nn.Linear or layer.weight.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return layer(x)
    out, k = layer.weight.shape
    rows = x.size // k
    block = (SMALL_OUTPUTS // max(rows, 1)) // 16 * 16
    if rows * out <= SMALL_OUTPUTS or block < MIN_BLOCK or k < 32 or block * rows * k > SMALL_MNK or not _has_small_kernels():
        return layer(x)
    block = -(-out // -(-out // block))  # as many blocks as needed, of equal size
    y = mx.concatenate([x @ layer.weight[i : i + block].T for i in range(0, out, block)], axis=-1)
    return y + layer.bias if "bias" in layer else y

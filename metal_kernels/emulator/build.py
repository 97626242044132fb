"""Compile generated Metal sources for the emulator (g++) and check their address spaces (clang++).

Compiled libraries are cached by a hash of everything that goes into them (source, shim, runtime,
flags) under $HNET_METAL_EMULATOR_CACHE, else $XDG_CACHE_HOME/hnet_metal_emulator, else
~/.cache/hnet_metal_emulator; a rerun of the tests compiles nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from .signature import Signature, type_string

HERE = Path(__file__).resolve().parent
SHIM = HERE / "metal_shim.h"
RUNTIME_H = HERE / "runtime.h"
RUNTIME_CPP = HERE / "runtime.cpp"
HNET_SIMD_WIDTH = 32  # threads per simdgroup on Apple GPUs (runtime.h: HNET_EMU_SIMD_WIDTH)

# -O1: fast enough to build (about a second) and to run; -ftrivial-auto-var-init=pattern fills
# uninitialised locals with 0xFE bytes so reading one shows up as a wrong result.
GXX_FLAGS = [
    "-std=c++17", "-O1", "-fPIC", "-fno-strict-aliasing", "-ftrivial-auto-var-init=pattern",
    "-Wno-attributes", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
]
# Every kernel library carries its own copy of the runtime (whose launch state is a static), so
# its references must bind inside itself. GNU ld: -Bsymbolic. Apple's ld rejects that flag; its
# two-level namespace binds references inside the image already, except weak (inline/template)
# definitions, which dyld coalesces across images: those are hidden. macOS's <ucontext.h> (the
# fibers) needs _XOPEN_SOURCE, and _DARWIN_C_SOURCE keeps mmap's MAP_ANON visible with it.
# The macOS flags are written from Apple's documentation and have not been run on a Mac here.
if sys.platform == "darwin":
    GXX_FLAGS += ["-D_XOPEN_SOURCE=600", "-D_DARWIN_C_SOURCE", "-fvisibility-inlines-hidden",
                  "-Wno-deprecated-declarations"]
    LINK_FLAGS = ["-undefined", "error"]
else:
    LINK_FLAGS = ["-Wl,-Bsymbolic"]
# aarch64: a target where _Float16 and __bf16 exist; no system headers are read.
CLANG_FLAGS = [
    "-target", "aarch64-linux-gnu", "-march=armv8.6-a+bf16", "-std=c++17", "-fsyntax-only",
    "-nostdinc", "-nostdinc++", "-DHNET_EMU_SYNTAX", "-Wno-unknown-attributes", "-Wno-unused-value",
]


class EmulatorCompileError(RuntimeError):
    """The kernel source does not compile (g++), or fails the address-space check (clang++)."""


def cache_dir() -> Path:
    root = os.environ.get("HNET_METAL_EMULATOR_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "hnet_metal_emulator")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: a per-user temp dir still caches within this machine
        path = Path(tempfile.gettempdir()) / f"hnet_metal_emulator-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def compiler_available() -> bool:
    """Whether the emulator can build kernels here (it needs g++ or $CXX)."""
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))


def gxx() -> str:
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not found:
        raise EmulatorCompileError("the Metal emulator needs a C++ compiler (g++); install it (apt-get install g++)")
    return found


def clang() -> str | None:
    """clang++ for the address-space check, or None when it is not installed."""
    return shutil.which("clang++")


_WARNED: set[str] = set()


def warn_check_off(check: str, why: str) -> None:
    """Say once per process that a check of the emulator is not running, and why."""
    if check not in _WARNED:
        _WARNED.add(check)
        warnings.warn(f"Metal emulator: the {check} is OFF: {why}", RuntimeWarning, stacklevel=3)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _support_digest() -> str:
    return _digest(SHIM.read_bytes(), RUNTIME_H.read_bytes(), RUNTIME_CPP.read_bytes())


# ---- source rewriting ------------------------------------------------------------------

# `threadgroup T name[dims];` inside a body: an array shared by the threads of a threadgroup.
_TG_DECL = re.compile(
    r"\bthreadgroup\s+([A-Za-z_][\w:]*(?:\s*<[^;<>]*>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\]\s*)*);"
)


def rewrite_threadgroup_arrays(source: str, syntax: bool) -> str:
    """Give every `threadgroup` declaration storage shared by its threadgroup.

    At runtime it becomes a reference into the emulator's threadgroup arena (one poisoned,
    guard-fenced block per declaration and threadgroup); for the clang check a static array in
    address space 3, which is what Metal's threadgroup storage is."""

    def repl(m: re.Match) -> str:
        tname, name, dims = m.group(1), m.group(2), m.group(3).strip()
        if syntax:
            return f"static threadgroup {tname} {name}{dims};"
        t = f"hnet_tg_type_{name}"
        return (
            f"static const char hnet_tg_site_{name} = 0; typedef {tname} {t}{dims}; "
            f"{t}& {name} = *static_cast<{t}*>(hnet_emu_tg_alloc(&hnet_tg_site_{name}, sizeof({t}), "
            f'alignof({t}), "{name}"));'
        )

    return _TG_DECL.sub(repl, source)


def _uint3(field: str) -> str:
    return f"uint3(a->{field}[0], a->{field}[1], a->{field}[2])"


# How each thread-position attribute is passed; the scalar ones not listed are fields of
# hnet_emu_attrs with the attribute's own name.
_ATTRIBUTE_VALUES = {
    "grid_origin": "uint3(0, 0, 0)",  # MLX dispatches from the origin
    "grid_size": _uint3("threads_per_grid"),
    "thread_execution_width": f"uint({HNET_SIMD_WIDTH})",
    "threads_per_simdgroup": f"uint({HNET_SIMD_WIDTH})",
    **{name: _uint3(name) for name in (
        "dispatch_threads_per_threadgroup", "thread_position_in_grid", "thread_position_in_threadgroup",
        "threadgroup_position_in_grid", "threadgroups_per_grid", "threads_per_grid", "threads_per_threadgroup",
    )},
}


def glue(sig: Signature) -> str:
    """extern "C" entry: unpack the buffer table and the thread attributes into the kernel call."""
    args = []
    index = 0
    for spec in sig.inputs:
        t = type_string(spec.dtype)
        args.append(f"*(const {t}*)b[{index}]" if spec.ndim == 0 else f"(const {t}*)b[{index}]")
        index += 1
        if spec.ndim > 0:
            for used, ctype in ((spec.shape, "const int*"), (spec.strides, "const int64_t*")):
                if used:
                    args.append(f"({ctype})b[{index}]")
                    index += 1
            if spec.ndim_used:
                args.append(f"*(const int*)b[{index}]")
                index += 1
    for odt in sig.output_dtypes:
        args.append(f"({type_string(odt)}*)b[{index}]")
        index += 1
    for attr in sig.attributes:
        args.append(_ATTRIBUTE_VALUES.get(attr, f"uint(a->{attr})"))
    call = sig.kernel_name + (sig.template_def if sig.template else "")
    joined = ",\n    ".join(args)
    return (
        '\nextern "C" void hnet_emu_entry(void* const* b, const hnet_emu_attrs* a) {\n'
        f"  (void)a;\n  {call}(\n    {joined});\n}}\n"
    )


_INSTANTIATION_ATTRS = re.compile(r"^template \[\[host_name\([^)]*\)\]\] \[\[kernel\]\] ", re.M)


def translation_unit(sig: Signature, syntax: bool = False) -> str:
    body = rewrite_threadgroup_arrays(sig.source, syntax)
    if syntax:
        # clang accepts no attribute list after `template` in an explicit instantiation (Metal's does)
        body = _INSTANTIATION_ATTRS.sub("template ", body)
    text = '#include "metal_shim.h"\n#line 1 "generated.metal"\n' + body
    if not syntax:
        text += glue(sig)
    return text


# ---- compiling -------------------------------------------------------------------------


def _run(cmd: list[str], what: str, note: str = "") -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = "\n".join(lines[:60])
        raise EmulatorCompileError(f"{what} failed{note}:\n{detail}")


def _body_note(sig: Signature) -> str:
    """Where the body starts in generated.metal, to read compiler line numbers."""
    signature_end = sig.source.find("[[kernel]] void ")
    brace = sig.source.find(") {\n", signature_end)
    if brace < 0:
        return ""
    return f" (line k of the kernel body is line k + {sig.source[: brace].count(chr(10)) + 1} of generated.metal)"


def _atomic_build(target: Path, build) -> Path:
    """Build into a temp name in the cache and rename, so a crash never leaves half a file."""
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=target.suffix + ".tmp")
    os.close(fd)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=None)
def runtime_object() -> Path:
    target = cache_dir() / f"runtime-{_digest(_support_digest(), *GXX_FLAGS)}.o"
    return _atomic_build(
        target, lambda tmp: _run([gxx(), *GXX_FLAGS, "-O2", "-c", str(RUNTIME_CPP), "-o", tmp], "compiling the emulator runtime")
    )


def compile_kernel(sig: Signature) -> Path:
    """The shared library running this kernel under the emulator (built once per source)."""
    tu = translation_unit(sig)
    key = _digest(tu, _support_digest(), *GXX_FLAGS)  # LINK_FLAGS depend on the OS only, as does the cache
    target = cache_dir() / f"kernel-{key}.so"
    if target.exists():
        return target
    runtime = runtime_object()
    src = cache_dir() / f"kernel-{key}.cpp"
    src.write_text(tu)

    def build(tmp: str) -> None:
        _run([gxx(), *GXX_FLAGS, "-shared", *LINK_FLAGS, f"-I{HERE}", str(src), str(runtime), "-o", tmp],
             f"compiling kernel {sig.kernel_name} for the emulator (source: {src})", _body_note(sig))

    return _atomic_build(target, build)


def check_address_spaces(sig: Signature) -> None:
    """clang++ -fsyntax-only with device/constant/threadgroup as distinct address spaces.

    Raises EmulatorCompileError on a mistake (a device pointer assigned to a thread pointer, a
    constant buffer read through a device pointer...) that g++, which ignores the qualifiers,
    accepts. Cached per source; needs clang++ (see `clang()`)."""
    compiler = clang()
    if compiler is None:
        raise EmulatorCompileError("clang++ is not installed: apt-get install clang")
    tu = translation_unit(sig, syntax=True)
    key = _digest(tu, SHIM.read_bytes(), *CLANG_FLAGS)
    marker = cache_dir() / f"syntax-{key}.ok"
    if marker.exists():
        return
    src = cache_dir() / f"syntax-{key}.cpp"
    src.write_text(tu)
    _run([compiler, *CLANG_FLAGS, f"-I{HERE}", str(src)], f"address-space check of {sig.kernel_name} (source: {src})",
         _body_note(sig))
    marker.write_text("ok\n")

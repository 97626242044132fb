"""Run a kernel launch on the CPU and check it: the emulator's drop-in for `mx.fast.metal_kernel`.

Each call builds the exact source MLX would (signature.py), compiles it once (build.py), and runs
the whole grid `orders` times (ascending, descending, shuffled thread and threadgroup order) with:
  * every output poisoned with 0xFF bytes (NaN in every float type) unless `init_value` is given,
    and checked afterwards: a float element still holding the poison was never written (or was
    computed from unwritten or out-of-bounds memory);
  * guard zones of poison around every input and output, checked for out-of-bounds writes (and
    an out-of-bounds read picks up poison, which lands in the outputs);
  * inputs checked unchanged;
  * the outputs of all orders compared bit for bit: a difference means the result depends on the
    order threads run in, i.e. a missing barrier or a race;
  * the scheduler's own reports: barrier divergence, threadgroup-array overruns, threadgroup
    memory over 32 KiB, more than 1024 threads per threadgroup.
Any problem raises EmulatorError listing all of them.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import build
from .signature import Signature, build_signature

GUARD_BYTES = 4096
# Guard zones around inputs hold the poison (0xFF), so out-of-bounds reads yield NaN. Guard zones
# around outputs hold another NaN pattern (FF FF BF FF: NaN as fp32, fp16 and bf16 at any
# alignment), so that even a write of poison read from elsewhere changes them.
INPUT_GUARD = b"\xff\xff\xff\xff"
OUTPUT_GUARD = b"\xff\xff\xbf\xff"
ORDER_NAMES = ("ascending", "descending", "shuffled")

_NP_TYPES = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float32: np.float32, mx.float64: np.float64,
}
_FLOAT_TYPES = (mx.float16, mx.bfloat16, mx.float32, mx.float64)
_LOCK = threading.Lock()  # one launch at a time per process: the runtime keeps its launch in a static


class EmulatorError(RuntimeError):
    """A kernel launch misbehaved under the emulator; `problems` lists what was found."""

    def __init__(self, kernel: str, problems: list[str]):
        self.kernel = kernel
        self.problems = problems
        super().__init__(f"Metal emulator: kernel {kernel}:\n  " + "\n  ".join(problems))


class _Config(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("order", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("max_errors", ctypes.c_int32),
    ]


_LIBS: dict[str, ctypes.CDLL] = {}


def _load(path) -> ctypes.CDLL:
    key = str(path)
    lib = _LIBS.get(key)
    if lib is None:
        lib = ctypes.CDLL(key, mode=ctypes.RTLD_LOCAL)
        lib.hnet_emu_launch.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_Config), ctypes.c_char_p, ctypes.c_int,
        ]
        lib.hnet_emu_launch.restype = ctypes.c_int
        _LIBS[key] = lib
    return lib


def to_numpy(a: mx.array) -> np.ndarray:
    """Row-contiguous host copy; bfloat16 as its uint16 bit pattern."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=True))


def from_numpy(x: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(x)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


class _Guarded:
    """A host buffer with GUARD_BYTES of a NaN pattern on each side; the data starts as poison."""

    def __init__(self, nbytes: int, fill: bytes | None = None, guard: bytes = INPUT_GUARD):
        self.nbytes = nbytes
        self.guard = np.frombuffer(guard * (GUARD_BYTES // len(guard)), dtype=np.uint8)
        self.raw = np.full(GUARD_BYTES * 2 + max(nbytes, 1), 0xFF, dtype=np.uint8)
        self.raw[:GUARD_BYTES] = self.guard
        self.raw[GUARD_BYTES + nbytes :][:GUARD_BYTES] = self.guard
        if fill is not None:
            self.raw[GUARD_BYTES : GUARD_BYTES + nbytes] = np.frombuffer(fill, dtype=np.uint8)

    @property
    def pointer(self) -> int:
        return self.raw.ctypes.data + GUARD_BYTES

    def data(self) -> np.ndarray:
        return self.raw[GUARD_BYTES : GUARD_BYTES + self.nbytes]

    def guard_damage(self) -> tuple[int, int]:
        before = int(np.count_nonzero(self.raw[:GUARD_BYTES] != self.guard))
        after = int(np.count_nonzero(self.raw[GUARD_BYTES + self.nbytes :][:GUARD_BYTES] != self.guard))
        return before, after


def _poison_mask(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """Elements whose bytes are all 0xFF."""
    width = x.dtype.itemsize
    as_bytes = x.view(np.uint8).reshape(-1, width)
    return np.all(as_bytes == 0xFF, axis=1).reshape(x.shape)


@dataclass
class LaunchRecord:
    """What one emulated launch did (kept on the kernel object for tests and debugging)."""

    signature: Signature
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    orders: int
    problems: list[str] = field(default_factory=list)


class EmulatedKernel:
    """Same constructor and call as the object `mx.fast.metal_kernel` returns."""

    def __init__(
        self,
        name: str,
        input_names,
        output_names,
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options=None,
        *,
        orders: int = 3,
        check_address_spaces: bool | None = None,
        check_unwritten: bool = True,
        seed: int = 0,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("the Metal emulator does not implement atomic outputs")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.orders = max(1, min(int(orders), len(ORDER_NAMES)))
        if check_address_spaces is None:
            check_address_spaces = build.clang() is not None
            if not check_address_spaces:
                build.warn_check_off("address-space check", "clang++ is not installed (apt-get install clang)")
        self.check_address_spaces = check_address_spaces
        self.check_unwritten = check_unwritten
        self.seed = seed
        self.last_launch: LaunchRecord | None = None

    def _body_lines(self, sig: Signature, text: str) -> str:
        """The runtime names lines of the generated source; point them into the kernel body."""
        at = sig.source.find(self.source)
        first = sig.source[:at].count("\n") + 1 if at >= 0 else 1

        def repl(m: re.Match) -> str:
            line = int(m.group(1))
            if at >= 0 and line >= first:
                return f"line {line - first + 1} of the kernel body"
            return f"line {line} of the generated source"

        return re.sub(r"\bline (\d+)", repl, text)

    def signature(self, inputs, output_dtypes, template=()) -> Signature:
        meta = [(a.dtype, a.ndim, a.size) for a in inputs]
        return build_signature(self.name, self.input_names, self.output_names, self.source, self.header, meta,
                               list(output_dtypes), template or ())

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose: bool = False,
        stream=None,
    ) -> list[mx.array]:
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        if len(arrays) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size {len(arrays)}.")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError(f"[metal_kernel] Expected {len(self.output_names)} output shapes and dtypes.")
        sig = self.signature(arrays, output_dtypes, template or ())
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{sig.source}\n```")
        lib = _load(build.compile_kernel(sig))
        if self.check_address_spaces:
            build.check_address_spaces(sig)
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        record = LaunchRecord(sig, grid, threadgroup, self.orders)
        self.last_launch = record
        problems = record.problems

        host_inputs = [to_numpy(a) for a in arrays]
        buffers: list[object] = []  # keeps every host buffer alive during the launch
        table: list[int] = []
        in_bufs = []
        for spec, x in zip(sig.inputs, host_inputs):
            buf = _Guarded(x.nbytes, x.tobytes())
            in_bufs.append(buf)
            buffers.append(buf)
            table.append(buf.pointer)
            if spec.ndim > 0:
                extras = []
                if spec.shape:
                    extras.append(np.array(x.shape, dtype=np.int32))
                if spec.strides:
                    extras.append(np.array([s // x.itemsize for s in x.strides], dtype=np.int64))
                if spec.ndim_used:
                    extras.append(np.array([x.ndim], dtype=np.int32))
                for e in extras:
                    buffers.append(e)
                    table.append(e.ctypes.data)
        n_out_first = len(table)
        out_shapes = [tuple(int(s) for s in shape) for shape in output_shapes]
        out_np_types = [_NP_TYPES[dt] for dt in output_dtypes]
        init_bytes = []
        for shape, dt, npt in zip(out_shapes, output_dtypes, out_np_types):
            count = int(np.prod(shape)) if shape else 1
            if init_value is None:
                init_bytes.append(None)
            else:
                filled = mx.full((count,), init_value, dtype=dt)
                init_bytes.append(to_numpy(filled).tobytes())
        results = []
        for order in range(self.orders):
            outs = []
            for shape, npt, fill in zip(out_shapes, out_np_types, init_bytes):
                count = int(np.prod(shape)) if shape else 1
                outs.append(_Guarded(count * np.dtype(npt).itemsize, fill, OUTPUT_GUARD))
            ptrs = table[:n_out_first] + [o.pointer for o in outs]
            c_table = (ctypes.c_void_p * len(ptrs))(*ptrs)
            cfg = _Config((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*threadgroup), order, self.seed + 7919 * order, 20)
            errbuf = ctypes.create_string_buffer(16384)
            entry = ctypes.cast(lib.hnet_emu_entry, ctypes.c_void_p)
            with _LOCK:
                n_problems = lib.hnet_emu_launch(entry, c_table, ctypes.byref(cfg), errbuf, len(errbuf))
            tag = f"[{ORDER_NAMES[order]} order] "
            if n_problems:
                text = self._body_lines(sig, errbuf.value.decode(errors="replace"))
                problems.extend(tag + line for line in text.splitlines() if line)
            for oname, o in zip(self.output_names, outs):
                before, after = o.guard_damage()
                if before:
                    problems.append(tag + f"out-of-bounds write before the start of output '{oname}' ({before} guard bytes changed)")
                if after:
                    problems.append(tag + f"out-of-bounds write past the end of output '{oname}' ({after} guard bytes changed)")
            for iname, buf, x in zip(self.input_names, in_bufs, host_inputs):
                before, after = buf.guard_damage()
                if before or after:
                    problems.append(tag + f"out-of-bounds write around input '{iname}'")
                if not np.array_equal(buf.data(), np.frombuffer(x.tobytes(), dtype=np.uint8)):
                    problems.append(tag + f"input '{iname}' was modified")
            results.append([o.data().copy().view(npt).reshape(shape) for o, npt, shape in zip(outs, out_np_types, out_shapes)])

        first = results[0]
        if self.check_unwritten and init_value is None:
            for oname, dt, x in zip(self.output_names, output_dtypes, first):
                if dt in _FLOAT_TYPES and x.size:
                    bad = _poison_mask(x, dt)
                    if bad.any():
                        where = tuple(int(i) for i in np.argwhere(bad)[0])
                        problems.append(
                            f"output '{oname}': {int(bad.sum())} of {x.size} elements hold the poison pattern "
                            f"(never written, or computed from unwritten or out-of-bounds memory); first at {where}"
                        )
        for order in range(1, len(results)):
            for oname, a, b in zip(self.output_names, first, results[order]):
                differ = a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1) if a.size else np.zeros((0, 1), bool)
                rows = np.any(differ, axis=1) if a.size else np.zeros(0, bool)
                if rows.any():
                    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(rows)), a.shape)) if a.shape else ()
                    problems.append(
                        f"output '{oname}' differs between the {ORDER_NAMES[0]} and {ORDER_NAMES[order]} thread orders "
                        f"in {int(rows.sum())} of {a.size} elements, first at {where} (missing barrier or race)"
                    )
        if problems:
            raise EmulatorError(sig.kernel_name, problems)
        return [from_numpy(x, dt) for x, dt in zip(first, output_dtypes)]


def metal_kernel(name: str, input_names, output_names, source: str, header: str = "", ensure_row_contiguous: bool = True,
                 atomic_outputs: bool = False, compile_options=None, **emulator_options) -> EmulatedKernel:
    """Drop-in for `mx.fast.metal_kernel` that runs (and checks) the kernel on the CPU."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                          compile_options, **emulator_options)

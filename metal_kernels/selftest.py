"""A quick check that the kernels build and compute the right thing on this machine.

    python -m hnet_metal_kernels.selftest                    # real Metal (Apple silicon), fp32/fp16/bf16
    python -m hnet_metal_kernels.selftest --emulate          # the CPU emulator
    python -m hnet_metal_kernels.selftest --dtype bfloat16   # one dtype only

Runs every kernel, forward and backward, once on small inputs that still cover the edge cases
(partial simdgroups and threadgroups, several chunks, a sequence boundary, an initial state) and
compares with the pure-MLX paths of the model package (reference.PurePaths, passed in). The
tolerance (1e-3 of each tensor's scale for fp32, looser for 16-bit tensors) is loose on purpose: it separates a broken kernel (a Metal compiler that
rejects a body, wrong indexing, a race) from the rounding differences of fast math. The full
comparison lives in tests/test_metal_kernels.py.

Every kernel is a family of compiled variants: MLX instantiates one per input dtype and template
value (`bfloat16_t` vs `half` vs `float` inputs, conv_step's output/state types, the chunk size
and head sizes of the scan, present or absent optional inputs). `Variant` names one, `variant_of`
finds the one a call will instantiate, and `check_variant` tests exactly that one, on small
inputs with the call's dtypes, optional inputs and template sizes. "auto" dispatch gates every
variant a model uses this way before it runs (see dispatch.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .factory import EmulatorFactory, KernelFactory, current_factory
from .reference import NoPurePaths, PurePaths, registered

TOLERANCE = {mx.float32: 1e-3, mx.float16: 1e-2, mx.bfloat16: 4e-2}  # of each tensor's scale, by lowest precision
F32 = mx.float32
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
CHECKS = ("ssm_step", "conv_step", "ssd_scan", "ssd_scan backward", "ema_dechunk", "ema_dechunk backward")
KERNEL_OF_CHECK = {c: c.split()[0] for c in CHECKS}


@dataclass(frozen=True)
class Variant:
    """One compiled variant of a kernel wrapper.

    kernel: "ssm_step" | "conv_step" | "ssd_scan" | "ema_dechunk"
    dtypes: per argument of the wrapper, in order: the dtype name, None where the argument is
            absent (D, seq_idx, initial_state), "int" for chunk_size
    dims:   the sizes that are template values or shape the loops: ssm_step (p, n), conv_step
            (k,), ssd_scan (p, n, chunk_size), ema_dechunk (d,)"""

    kernel: str
    dtypes: tuple[str | None, ...]
    dims: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.kernel}[{','.join(d or '-' for d in self.dtypes)}; {'x'.join(map(str, self.dims))}]"


def _dtype_name(a) -> str | None:
    if a is None:
        return None
    if isinstance(a, int):
        return "int"
    return str(a.dtype).removeprefix("mlx.core.")


def variant_of(kernel: str, args: tuple) -> Variant:
    """The variant a call `kernel(*args)` (the wrapper's positional arguments) instantiates."""
    names = tuple(_dtype_name(a) for a in args)
    if kernel == "ssm_step":
        _, _, p, n = args[0].shape
        return Variant(kernel, names, (p, n))
    if kernel == "conv_step":
        return Variant(kernel, names, (args[0].shape[2],))
    if kernel == "ssd_scan":
        full = tuple(args) + (None,) * (9 - len(args))
        names = tuple(_dtype_name(a) for a in full)
        return Variant(kernel, names, (full[0].shape[3], full[3].shape[3], int(full[5])))
    if kernel == "ema_dechunk":
        full = tuple(args) + (None,) * (4 - len(args))
        return Variant(kernel, tuple(_dtype_name(a) for a in full), (full[0].shape[2],))
    raise ValueError(f"unknown kernel {kernel!r}")


def model_variants(dtype=F32, p: int = 20, n: int = 48, chunk_size: int = 8, k: int = 4, d: int = 40) -> list[Variant]:
    """The variants an H-Net MLX model whose activations are `dtype` instantiates (its Mamba2 mixers and
    dechunk layers): x/B/C/D, conv inputs and decode inputs in `dtype`; dt, A, the SSM state and the
    dechunk probabilities in fp32; packed (seq_idx) and padded (no seq_idx) inputs. The default sizes
    are small ones that still cover the edge cases; pass a model's to check its exact variants."""
    t = _dtype_name(mx.zeros((1,), dtype))
    return [
        Variant("ssm_step", ("float32", t, t, t, "float32", t, t, t), (p, n)),
        Variant("conv_step", (t, t, t, t), (k,)),
        Variant("ssd_scan", (t, "float32", "float32", t, t, "int", t, "int32", "float32"), (p, n, chunk_size)),
        Variant("ssd_scan", (t, "float32", "float32", t, t, "int", t, None, None), (p, n, chunk_size)),
        Variant("ema_dechunk", (t, "float32", "int32", "int32"), (d,)),
        Variant("ema_dechunk", (t, "float32", "int32", None), (d,)),
    ]


def _tolerance(variant: Variant) -> float:
    worst = F32
    for name in variant.dtypes:
        if name in ("float16", "bfloat16") and TOLERANCE[DTYPES[name]] > TOLERANCE[worst]:
            worst = DTYPES[name]
    return TOLERANCE[worst]


def _error(actual, expected) -> float:
    a = np.array(mx.array(actual).astype(F32))
    e = np.array(mx.array(expected).astype(F32))
    if a.shape != e.shape:
        return float("inf")
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - e).max()) / max(float(np.abs(e).max()), 1e-3)


def _cases(variant: Variant, factory: KernelFactory, pure: PurePaths, seed: int = 0):
    """(check name, kernel thunk, reference thunk) for one variant, on small inputs of its dtypes."""
    import hnet_metal_kernels as hk

    rng = np.random.default_rng(seed)
    dts = variant.dtypes

    def f(*shape, i=None, scale=1.0):
        a = mx.array((rng.standard_normal(shape) * scale).astype(np.float32))
        return a if i is None or dts[i] is None else a.astype(DTYPES.get(dts[i], F32))

    if variant.kernel == "ssm_step":
        p, n = variant.dims
        args = (f(2, 3, p, n, i=0), f(2, 3, p, i=1), f(2, 3, i=2), f(3, i=3), (-mx.exp(f(3))).astype(DTYPES[dts[4]]),
                f(2, 1, n, i=5), f(2, 1, n, i=6), f(3, i=7))
        yield "ssm_step", lambda: hk.ssm_step(*args, factory=factory), lambda: pure.ssm_step(*args)
        return

    if variant.kernel == "conv_step":
        (k,) = variant.dims
        args = (f(2, 40, k, i=0), f(2, 40, i=1), f(40, k, i=2), f(40, i=3))
        yield "conv_step", lambda: hk.conv_step(*args, factory=factory), lambda: pure.conv_step(*args)
        return

    if variant.kernel == "ssd_scan":
        p, n, Q = variant.dims
        b, l, h = 2, 2 * Q + 5, 2  # three chunks, the last one partial
        x, B, C = f(b, l, h, p, i=0), f(b, l, 1, n, i=3), f(b, l, 1, n, i=4)
        dt = mx.exp(f(b, l, h) - 2.0).astype(DTYPES[dts[1]])
        A = (-mx.exp(f(h))).astype(DTYPES[dts[2]])
        D = f(h, i=6) if dts[6] else None
        seq = mx.array((np.arange(l)[None] >= np.array([[l // 2], [l + 9]])).astype(np.int32)) if dts[7] else None
        init = f(b, h, p, n, i=8) if dts[8] else None
        wy = f(b, l, h, p)
        argnums = [0, 1, 2, 3, 4] + ([5] if D is not None else []) + ([6] if init is not None else [])

        def grad(fn):
            def loss(x_, dt_, A_, B_, C_, D_, init_):
                y, final = fn(x_, dt_, A_, B_, C_, Q, D_, seq, init_)
                return (y * wy).sum() + final.sum()

            return mx.grad(loss, argnums=argnums)(x, dt, A, B, C, D, init)

        kern = lambda *a: hk.ssd_scan(*a, factory=factory)  # noqa: E731
        yield "ssd_scan", lambda: kern(x, dt, A, B, C, Q, D, seq, init), lambda: pure.ssd_scan(x, dt, A, B, C, Q, D, seq, init)
        yield "ssd_scan backward", lambda: grad(kern), lambda: grad(pure.ssd_scan)
        return

    if variant.kernel == "ema_dechunk":
        (d,) = variant.dims
        mask = rng.random((2, 30)) < 0.4
        mask[:, 0] = True
        m = int(mask.sum(1).max())
        ci = mx.array(np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32))
        values = f(2, m, d, i=0)
        prob = mx.array(np.clip(rng.random((2, m)), 1e-4, 1 - 1e-4).astype(np.float32)).astype(DTYPES.get(dts[1], F32))
        seq = mx.array((np.arange(m)[None] >= np.array([[m // 2], [m]])).astype(np.int32)) if dts[3] else None
        ew = f(2, 30, d)

        def grad(fn):
            return mx.grad(lambda v, q: (fn(v, q, ci, seq) * ew).sum(), argnums=[0, 1])(values, prob)

        kern = lambda v, q, c, s: hk.ema_dechunk(v, q, c, s, factory=factory)  # noqa: E731
        yield "ema_dechunk", lambda: kern(values, prob, ci, seq), lambda: pure.ema_dechunk(values, prob, ci, seq)
        yield "ema_dechunk backward", lambda: grad(kern), lambda: grad(pure.ema_dechunk)
        return
    raise ValueError(f"unknown kernel {variant.kernel!r}")


def check_variant(variant: Variant, pure: PurePaths, factory: KernelFactory | None = None) -> dict[str, str | None]:
    """{check: None if this variant matches the pure-MLX path, else what went wrong}."""
    factory = current_factory(factory)
    tol = _tolerance(variant)
    report: dict[str, str | None] = {}
    for name, kernel, reference in _cases(variant, factory, pure):
        try:
            got = kernel()
            want = reference()
            got = got if isinstance(got, (tuple, list)) else [got]
            want = want if isinstance(want, (tuple, list)) else [want]
            mx.eval(got, want)
            worst = max(_error(g, w) for g, w in zip(got, want))
            report[name] = None if worst <= tol else f"differs from the pure-MLX path by {worst:.3g} of its scale"
        except Exception as exc:  # a Metal compile error, an emulator report: the kernel is unusable
            text = str(exc).strip()
            report[name] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return report


def self_test(pure: PurePaths, factory: KernelFactory | None = None, dtype=F32) -> dict[str, str | None]:
    """{check: None if the kernel matches the pure-MLX path, else what went wrong}: every kernel,
    forward and backward, in the variants a model with `dtype` activations uses (small sizes)."""
    report: dict[str, str | None] = {}
    for variant in model_variants(dtype):
        for name, problem in check_variant(variant, pure, factory).items():
            if report.get(name) is None:  # keep the first problem of a check
                report[name] = problem if problem is None else f"{variant.describe()}: {problem}"
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulate", action="store_true", help="run on the CPU emulator instead of Metal")
    ap.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                    help="activation dtype to check (repeatable; default: all three)")
    args = ap.parse_args(argv)
    factory = EmulatorFactory() if args.emulate else current_factory()
    if not factory.available():
        print("Metal is not available here (needs Apple silicon); use --emulate for the CPU emulator")
        return 2
    try:
        pure = registered()
    except NoPurePaths as e:
        print(e)
        return 2
    failed = False
    for name in args.dtype or ["float32", "float16", "bfloat16"]:
        for check, problem in self_test(pure, factory, DTYPES[name]).items():
            failed |= problem is not None
            print(f"{'ok  ' if problem is None else 'FAIL'} {name:8} {check}" + ("" if problem is None else f": {problem}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

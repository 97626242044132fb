"""A quick check that the kernels build and compute the right thing on this machine.

    python -m hnet_metal_kernels.selftest            # real Metal (Apple silicon)
    python -m hnet_metal_kernels.selftest --emulate  # the CPU emulator

Runs every kernel, forward and backward, once on small inputs that still cover the edge cases
(partial simdgroups and threadgroups, several chunks, a sequence boundary, an initial state) and
compares with hnet_mlx's pure-MLX paths. The tolerance (1e-3 of each tensor's scale) is loose on
purpose: it separates a broken kernel (a Metal compiler that rejects a body, wrong indexing, a race)
from the rounding differences of fast math. The full comparison lives in tests/test_metal_kernels.py.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import numpy as np

from .factory import EmulatorFactory, KernelFactory, current_factory

TOLERANCE = 1e-3
F32 = mx.float32


def _error(actual, expected) -> float:
    a = np.array(mx.array(actual).astype(F32))
    e = np.array(mx.array(expected).astype(F32))
    if a.shape != e.shape:
        return float("inf")
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - e).max()) / max(float(np.abs(e).max()), 1e-3)


def _cases(factory: KernelFactory):
    import hnet_metal_kernels as hk
    from hnet_mlx import kernels as pure
    from hnet_mlx import ssd as ref

    rng = np.random.default_rng(0)

    def f(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    state, x, dt, bias = f(2, 3, 20, 48), f(2, 3, 20), f(2, 3), f(3)
    A, D, B, C = -mx.exp(f(3)), f(3), f(2, 1, 48), f(2, 1, 48)
    yield "ssm_step", (lambda: hk.ssm_step(state, x, dt, bias, A, B, C, D, factory=factory),
                       lambda: ref.ssm_step(state, x, dt, bias, A, B, C, D))

    cs, cx, w, cb = f(2, 40, 4), f(2, 40), f(40, 4), f(40)
    yield "conv_step", (lambda: hk.conv_step(cs, cx, w, cb, factory=factory),
                        lambda: pure.conv_step(cs, cx, w, cb, mode="off"))

    b, l, h, p, n, Q = 2, 21, 2, 20, 48, 8
    sx, sB, sC, sinit = f(b, l, h, p), f(b, l, 1, n), f(b, l, 1, n), f(b, h, p, n)
    A, D = -mx.exp(f(h)), f(h)
    sdt = mx.exp(f(b, l, h) - 2.0)
    seq = mx.array((np.arange(l)[None] >= np.array([[11], [30]])).astype(np.int32))
    wy = f(b, l, h, p)

    def ssd_grad(fn):
        def loss(x_, dt_, A_, B_, C_, D_, init_):
            y, final = fn(x_, dt_, A_, B_, C_, Q, D_, seq, init_)
            return (y * wy).sum() + final.sum()

        return mx.grad(loss, argnums=list(range(7)))(sx, sdt, A, sB, sC, D, sinit)

    kernel_ssd = lambda *a: hk.ssd_scan(*a, factory=factory)  # noqa: E731
    yield "ssd_scan", (lambda: kernel_ssd(sx, sdt, A, sB, sC, Q, D, seq, sinit),
                       lambda: ref.ssd_chunk_scan(sx, sdt, A, sB, sC, Q, D, seq, sinit))
    yield "ssd_scan backward", (lambda: ssd_grad(kernel_ssd), lambda: ssd_grad(ref.ssd_chunk_scan))

    mask = rng.random((2, 30)) < 0.4
    mask[:, 0] = True
    m = int(mask.sum(1).max())
    ci = mx.array(np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32))
    values, prob = f(2, m, 40), mx.array(np.clip(rng.random((2, m)), 1e-4, 1 - 1e-4).astype(np.float32))
    ew = f(2, 30, 40)

    def ema_grad(fn):
        return mx.grad(lambda v, q: (fn(v, q, ci) * ew).sum(), argnums=[0, 1])(values, prob)

    kernel_ema = lambda v, q, c: hk.ema_dechunk(v, q, c, factory=factory)  # noqa: E731
    yield "ema_dechunk", (lambda: kernel_ema(values, prob, ci), lambda: ref.ema_dechunk(values, prob, ci))
    yield "ema_dechunk backward", (lambda: ema_grad(kernel_ema), lambda: ema_grad(ref.ema_dechunk))


def self_test(factory: KernelFactory | None = None) -> dict[str, str | None]:
    """{check: None if the kernel matches the pure-MLX path, else what went wrong}."""
    factory = current_factory(factory)
    report: dict[str, str | None] = {}
    for name, (kernel, reference) in _cases(factory):
        try:
            got = kernel()
            want = reference()
            got = got if isinstance(got, (tuple, list)) else [got]
            want = want if isinstance(want, (tuple, list)) else [want]
            mx.eval(got, want)
            worst = max(_error(g, w) for g, w in zip(got, want))
            report[name] = None if worst <= TOLERANCE else f"differs from the pure-MLX path by {worst:.3g} of its scale"
        except Exception as exc:  # a Metal compile error, an emulator report: the kernel is unusable
            report[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulate", action="store_true", help="run on the CPU emulator instead of Metal")
    args = ap.parse_args(argv)
    factory = EmulatorFactory() if args.emulate else current_factory()
    if not factory.available():
        print("Metal is not available here (needs Apple silicon); use --emulate for the CPU emulator")
        return 2
    report = self_test(factory)
    for name, problem in report.items():
        print(f"{'ok  ' if problem is None else 'FAIL'} {name}" + ("" if problem is None else f": {problem}"))
    return 0 if all(v is None for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

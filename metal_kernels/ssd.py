"""The chunked SSD scan (Mamba2) on the GPU: forward and backward as Metal kernels.

Forward (three launches):
  1. ssd_chunk_state    every chunk's state from a zero start, and its total decay   (parallel)
  2. ssd_state_passing  the states entering each chunk, and the final state         (sequential over chunks)
  3. ssd_chunk_scan     every chunk's outputs, rerunning the recurrence from its entering state (parallel)
Backward (mx.custom_function vjp): 1-2 again, then the same two phases on the adjoint
(ssd_chunk_state / ssd_state_passing with REVERSE), ssd_chunk_scan_bwd_c (dC),
ssd_chunk_scan_bwd_x (dx, dB, the input part of ddt) and ssd_dlog_decay (the decay part of ddt
and dA: a segmented suffix sum of q_t = <dy_t, y_t - D x_t> - dt_t ddt_t, see that kernel).

Semantics are those of the pure twin (PurePaths.ssd_scan: the MLX model's ssd.ssd_chunk_scan):
h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
y_t = C_t h_t + D x_t, the state restarting where seq_idx changes, fp32 throughout.
"""

from __future__ import annotations

import mlx.core as mx

from hnet_core.errors import HNetError

from .factory import KernelFactory, current_factory
from .sources import source

F32 = mx.float32
MAX_SIMDGROUPS = 8  # simdgroups per threadgroup in the backward scans (256 threads)


def _kernels(factory: KernelFactory) -> dict:
    k = factory.metal_kernel
    return {
        "state": k("hnet_ssd_chunk_state", ["v", "dt", "A", "W", "seq_idx"], ["S", "decay"], source("ssd_chunk_state")),
        "pass": k("hnet_ssd_state_passing", ["S", "decay", "init"], ["E", "last"], source("ssd_state_passing")),
        "scan": k("hnet_ssd_chunk_scan", ["x", "dt", "A", "B", "C", "D", "seq_idx", "E"], ["y"], source("ssd_chunk_scan")),
        "bwd_c": k("hnet_ssd_chunk_scan_bwd_c", ["x", "dt", "A", "B", "dy", "seq_idx", "E"], ["dC"],
                   source("ssd_chunk_scan_bwd_c")),
        "bwd_x": k("hnet_ssd_chunk_scan_bwd_x", ["x", "dt", "A", "B", "C", "dy", "D", "seq_idx", "M"],
                   ["dx", "ddt", "dB"], source("ssd_chunk_scan_bwd_x")),
        "dlog": k("hnet_ssd_dlog_decay", ["q", "seq_idx"], ["dl"], source("ssd_dlog_decay")),
    }


def _chunk_states(K, v, dt, A, W, seq, Q, has_seq, reverse):
    b, l, h, p = v.shape
    n = W.shape[-1]
    nc = -(-l // Q)
    return K["state"](
        inputs=[v, dt, A, W, seq],
        template=[("N", n), ("Q", Q), ("REVERSE", reverse), ("HAS_SEQ", has_seq)],
        grid=(32, p, b * h * nc), threadgroup=(32, min(p, 8), 1),
        output_shapes=[(b, nc, h, p, n), (b, nc, h)], output_dtypes=[F32, F32],
    )


def _pass_states(K, S, decay, init, has_init, reverse):
    b, nc, h, p, n = S.shape
    return K["pass"](
        inputs=[S, decay, init],
        template=[("REVERSE", reverse), ("HAS_INIT", has_init)],
        grid=(p * n, h, b), threadgroup=(min(p * n, 256), 1, 1),
        output_shapes=[(b, nc, h, p, n), (b, h, p, n)], output_dtypes=[F32, F32],
    )


def _forward(K, x, dt, A, B, C, D, seq, init, Q, has_seq, has_init):
    b, l, h, p = x.shape
    n = B.shape[-1]
    nc = -(-l // Q)
    S, decay = _chunk_states(K, x, dt, A, B, seq, Q, has_seq, False)
    E, final = _pass_states(K, S, decay, init, has_init, False)
    (y,) = K["scan"](
        inputs=[x, dt, A, B, C, D, seq, E],
        template=[("N", n), ("Q", Q), ("HAS_SEQ", has_seq)],
        grid=(32, p, b * h * nc), threadgroup=(32, min(p, 8), 1),
        output_shapes=[(b, l, h, p)], output_dtypes=[F32],
    )
    return y, final, E


def _backward(K, primals, dy, dfinal, y, final, Q, has_seq, has_init):
    x, dt, A, B, C, D, seq, init = primals
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    nc = -(-l // Q)
    sg = min(MAX_SIMDGROUPS, p)
    dy = dy.astype(F32)
    dfinal = dfinal.astype(F32)
    dt32 = dt.astype(F32)
    S, decay = _chunk_states(K, x, dt32, A, B, seq, Q, has_seq, False)
    E, _ = _pass_states(K, S, decay, init, has_init, False)
    Kc, _ = _chunk_states(K, dy, dt32, A, C, seq, Q, has_seq, True)
    M, dinit = _pass_states(K, Kc, decay, dfinal, True, True)
    tmpl = [("N", n), ("P", p), ("Q", Q), ("SG", sg), ("HAS_SEQ", has_seq)]
    (dC,) = K["bwd_c"](
        inputs=[x, dt32, A, B, dy, seq, E], template=tmpl,
        grid=(32, sg, b * h * nc), threadgroup=(32, sg, 1),
        output_shapes=[(b, l, h, n)], output_dtypes=[F32],
    )
    dx, ddt_in, dB = K["bwd_x"](
        inputs=[x, dt32, A, B, C, dy, D, seq, M], template=tmpl,
        grid=(32, sg, b * h * nc), threadgroup=(32, sg, 1),
        output_shapes=[(b, l, h, p), (b, l, h), (b, l, h, n)], output_dtypes=[F32, F32, F32],
    )
    xf = x.astype(F32)
    Df = D.astype(F32)
    dtf = dt32
    # q_t = dL/dA_t for the cumulative log decay A_t (see ssd_dlog_decay.metal)
    q = (dy * (y - xf * Df[:, None])).sum(-1) - dtf * ddt_in  # (b, l, h)
    last = (dfinal * final).sum((-2, -1))  # (b, h): the final state's share, at t = l-1
    q = mx.concatenate([q[:, :-1], q[:, -1:] + last[:, None]], axis=1)
    (dl,) = K["dlog"](
        inputs=[q, seq], template=[("HAS_SEQ", has_seq)],
        grid=(32, h, b), threadgroup=(32, 1, 1),
        output_shapes=[(b, l, h)], output_dtypes=[F32],
    )
    Af = A.astype(F32)
    ddt = ddt_in + dl * Af
    dA = (dl * dtf).sum((0, 1))
    dD = (dy * xf).sum((0, 1, 3))
    dB = dB.reshape(b, l, g, h // g, n).sum(3)
    dC = dC.reshape(b, l, g, h // g, n).sum(3)
    return (
        dx.astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype), dC.astype(C.dtype),
        dD.astype(D.dtype), mx.zeros_like(seq), dinit.astype(init.dtype) if has_init else mx.zeros_like(init),
    )


def ssd_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    chunk_size: int,
    D: mx.array | None = None,
    seq_idx: mx.array | None = None,
    initial_state: mx.array | None = None,
    *,
    factory: KernelFactory | None = None,
) -> tuple[mx.array, mx.array]:
    """Mamba2 SSD scan on the GPU, differentiable (custom vjp with Metal kernels).

    x (b,l,h,p), dt (b,l,h) after softplus, A (h,), B/C (b,l,g,n) with g dividing h, D (h,) | None,
    seq_idx (b,l) int | None, initial_state (b,h,p,n) | None -> y (b,l,h,p) fp32, final state
    (b,h,p,n) fp32. Same signature and math as its pure twin (PurePaths.ssd_scan)."""
    b, l, h, p = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise HNetError(f"ssd_scan: B {B.shape} and C {C.shape} must both be (b, l, g, n) with x {x.shape}")
    g, n = B.shape[-2:]
    if dt.shape != (b, l, h) or A.shape != (h,) or h % g:
        raise HNetError(f"ssd_scan: dt {dt.shape} must be (b,l,h), A {A.shape} (h,), and {g} groups must divide {h} heads")
    if chunk_size < 1:
        raise HNetError(f"ssd_scan: chunk_size must be positive, got {chunk_size}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise HNetError(f"ssd_scan: initial_state {initial_state.shape} must be (b, h, p, n) = {(b, h, p, n)}")
    if l == 0:
        final = initial_state.astype(F32) if initial_state is not None else mx.zeros((b, h, p, n), F32)
        return mx.zeros((b, 0, h, p), F32), final
    K = _kernels(current_factory(factory))
    Q = int(chunk_size)
    has_seq = seq_idx is not None
    has_init = initial_state is not None
    # absent optional inputs: D = 0 is no skip term; the others are never read (template flags)
    D_ = D if D is not None else mx.zeros((h,), F32)
    seq = seq_idx.astype(mx.int32) if has_seq else mx.zeros((1,), mx.int32)
    init = initial_state if has_init else mx.zeros((1,), F32)

    @mx.custom_function
    def scan(x, dt, A, B, C, D, seq, init):
        y, final, _ = _forward(K, x, dt.astype(F32), A, B, C, D, seq, init, Q, has_seq, has_init)
        return y, final

    @scan.vjp
    def scan_vjp(primals, cotangents, outputs):
        y, final = outputs
        dy, dfinal = cotangents
        dy = mx.zeros_like(y) if dy is None else dy
        dfinal = mx.zeros_like(final) if dfinal is None else dfinal
        return _backward(K, primals, dy, dfinal, y, final, Q, has_seq, has_init)

    return tuple(scan(x, dt, A, B, C, D_, seq, init))

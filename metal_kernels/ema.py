"""The dechunk EMA with its gather (forward) and scatter (backward) as Metal kernels.

Semantics of the pure twin (PurePaths.ema_dechunk: the MLX model's ssd.ema_dechunk):
z_j = p_j v_j + (1 - p_j) z_{j-1} over the chunk axis,
restarting where seq_idx changes (z_{-1} = 0), then out[:, t] = z[:, chunk_index[:, t]], fp32.
"""

from __future__ import annotations

import mlx.core as mx

from hnet_core.errors import HNetError

from .factory import KernelFactory, current_factory
from .sources import source

F32 = mx.float32
THREADS = 256  # threads per threadgroup along the feature axis (8 simdgroups: ema_dechunk_bwd's buffer)


def ema_dechunk(values: mx.array, p: mx.array, chunk_index: mx.array, seq_idx: mx.array | None = None, *,
                factory: KernelFactory | None = None) -> mx.array:
    """values (b,m,d), p (b,m) clamped to [1e-4, 1-1e-4], chunk_index (b,l) int32 (cumsum of the boundary
    mask - 1, clamped at 0), seq_idx (b,m) int32 | None -> out (b,l,d) fp32. Differentiable in values and p."""
    b, m, d = values.shape
    l = chunk_index.shape[1]
    if p.shape != (b, m) or chunk_index.shape[0] != b or (seq_idx is not None and seq_idx.shape != (b, m)):
        raise HNetError(f"ema_dechunk: values {values.shape}, p {p.shape}, chunk_index {chunk_index.shape}"
                        + (f", seq_idx {seq_idx.shape}" if seq_idx is not None else "")
                        + " must be (b,m,d), (b,m), (b,l), (b,m)")
    if l == 0 or d == 0:
        return mx.zeros((b, l, d), F32)
    if m == 0:
        raise HNetError("ema_dechunk: chunk_index points into an empty chunk sequence (values has m = 0)")
    fac = current_factory(factory)
    fwd = fac.metal_kernel("hnet_ema_dechunk", ["values", "p", "chunk_index", "seq_idx"], ["out", "z"],
                           source("ema_dechunk"))
    bwd = fac.metal_kernel("hnet_ema_dechunk_bwd", ["values", "p", "chunk_index", "seq_idx", "z", "dout", "dz"],
                           ["dvalues", "dp"], source("ema_dechunk_bwd"))
    has_seq = seq_idx is not None
    tmpl = [("HAS_SEQ", has_seq)]
    tg = min(d, THREADS)
    nb = -(-d // tg)
    ci = chunk_index.astype(mx.int32)
    seq = seq_idx.astype(mx.int32) if has_seq else mx.zeros((1,), mx.int32)

    @mx.custom_function
    def dechunk(values, p, ci, seq):
        out, z = fwd(inputs=[values, p.astype(F32), ci, seq], template=tmpl, grid=(d, b, 1), threadgroup=(tg, 1, 1),
                     output_shapes=[(b, l, d), (b, m, d)], output_dtypes=[F32, F32])
        return out, z

    @dechunk.vjp
    def dechunk_vjp(primals, cotangents, outputs):
        values, p, ci, seq = primals
        dout, dz = cotangents
        out, z = outputs
        dout = mx.zeros_like(out) if dout is None else dout.astype(F32)
        dz = mx.zeros_like(z) if dz is None else dz.astype(F32)
        dvalues, dp = bwd(inputs=[values, p.astype(F32), ci, seq, z, dout, dz], template=tmpl, grid=(d, b, 1),
                          threadgroup=(tg, 1, 1), output_shapes=[(b, m, d), (b, m, nb)], output_dtypes=[F32, F32])
        return dvalues.astype(values.dtype), dp.sum(-1).astype(p.dtype), mx.zeros_like(ci), mx.zeros_like(seq)

    out, _ = dechunk(values, p, ci, seq)
    return out

"""Linear recurrences in chunked matrix form: the Mamba2 SSD scan and the dechunk EMA.

Both are instances of  h_t = exp(a_t) h_{t-1} + u_t B_t^T,  y_t = C_t h_t :
  * Mamba2 (Dao & Gu 2024, SSD): a_t = dt_t A, u_t = dt_t x_t;
  * H-Net dechunk EMA (paper eq. 5): a_t = log(1 - P_t), u_t = P_t z_t, B = C = 1, so
    z̄_t = P_t z_t + (1 - P_t) z̄_{t-1}.

The scan runs in chunks of Q positions (mamba's ssd_minimal): inside a chunk the output is a
masked (Q x Q) matrix product; chunk-final states are passed between chunks with a (c x c)
decay matrix. There is no Python loop over time. `seq_idx` (packed mode) restarts the
recurrence wherever the sequence id changes; the masks below zero every term that would cross a
sequence start, which is what mamba_ssm's `seq_idx` does. Everything is computed in fp32.

These functions are the pure-MLX reference paths behind kernels.py; the Metal kernels of
`hnet_metal_kernels` are held to them (same signatures as `ssd_scan`, `ssm_step`, `ema_dechunk`).
"""

from __future__ import annotations

import mlx.core as mx

F32 = mx.float32
NEG_INF = float("-inf")


def segsum(x: mx.array) -> mx.array:
    """Stable segment sums: out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i, else -inf."""
    T = x.shape[-1]
    xx = mx.broadcast_to(x[..., None], (*x.shape, T))  # [..., i, j] = x_i
    strict = mx.tril(mx.ones((T, T), dtype=mx.bool_), k=-1)
    xx = mx.where(strict, xx, 0.0)
    out = mx.cumsum(xx, axis=-2)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_), k=0)
    return mx.where(causal, out, NEG_INF)


def _pad_time(x: mx.array, pad: int) -> mx.array:
    """Zero-pad axis 1 (time) at the end."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return mx.pad(x, widths)


def chunked_scan(
    u: mx.array,  # (b, l, h, p)  input already scaled (dt * x for Mamba2)
    log_decay: mx.array,  # (b, l, h)  a_t <= 0
    B: mx.array,  # (b, l, g, n)
    C: mx.array,  # (b, l, g, n)
    chunk_size: int,
    seq_idx: mx.array | None = None,  # (b, l) int, packed mode
    initial_state: mx.array | None = None,  # (b, h, p, n)
) -> tuple[mx.array, mx.array]:
    """y (b, l, h, p) and the state after the last position (b, h, p, n), all fp32: pads the time
    axis to whole chunks and runs `whole_chunks_scan` on them."""
    b, l, h, p = u.shape
    g, n = B.shape[-2:]
    Q = chunk_size
    c = (l + Q - 1) // Q
    pad = c * Q - l
    u, log_decay, B, C = u.astype(F32), log_decay.astype(F32), B.astype(F32), C.astype(F32)
    if pad:
        # Zero input and zero log-decay: padded steps leave the state untouched.
        u, log_decay, B, C = _pad_time(u, pad), _pad_time(log_decay, pad), _pad_time(B, pad), _pad_time(C, pad)
        if seq_idx is not None:
            # padding belongs to the last sequence
            seq_idx = mx.concatenate([seq_idx, mx.broadcast_to(seq_idx[:, l - 1 : l], (b, pad))], axis=1)
    seg = None if seq_idx is None else seq_idx.reshape(b, c, Q)
    y, final_state = whole_chunks_scan(
        u.reshape(b, c, Q, h, p), log_decay.reshape(b, c, Q, h), B.reshape(b, c, Q, g, n), C.reshape(b, c, Q, g, n),
        seg, initial_state,
    )
    return y.reshape(b, c * Q, h, p)[:, :l], final_state


def whole_chunks_scan(
    u: mx.array,  # (b, c, Q, h, p) fp32
    a: mx.array,  # (b, c, Q, h) log-decay
    B: mx.array,  # (b, c, Q, g, n)
    C: mx.array,  # (b, c, Q, g, n)
    seg: mx.array | None,  # (b, c, Q) sequence ids, packed mode
    initial_state: mx.array | None,  # (b, h, p, n)
) -> tuple[mx.array, mx.array]:
    """The scan over c whole chunks of Q positions: y (b, c, Q, h, p) and the final state (b, h, p, n)."""
    b, c, Q, h, p = u.shape
    g, n = B.shape[-2:]
    hpg = h // g
    u = u.transpose(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
    a = a.transpose(0, 3, 1, 2)  # (b, h, c, Q)
    Bc = B.transpose(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cc = C.transpose(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    a_cs = mx.cumsum(a, axis=-1)  # (b, h, c, Q)

    causal = mx.tril(mx.ones((Q, Q), dtype=mx.bool_))
    if seg is not None:
        same = (seg[:, :, :, None] == seg[:, :, None, :]) & causal  # (b, c, Q, Q)
        same = same[:, None]
    else:
        same = causal
    # 1. within-chunk outputs: y_i = sum_{j<=i} C_i.B_j exp(a_cs_i - a_cs_j) u_j
    diff = a_cs[..., :, None] - a_cs[..., None, :]  # (b, h, c, Q, Q)
    decay = mx.exp(mx.where(same, diff, NEG_INF))
    CB = Cc @ Bc.swapaxes(-1, -2)  # (b, g, c, Q, Q)
    scores = decay.reshape(b, g, hpg, c, Q, Q) * CB[:, :, None]
    y = scores.reshape(b, h, c, Q, Q) @ u  # (b, h, c, Q, p)

    # 2. each chunk's own final state (only positions in the chunk's last sequence count)
    to_end = mx.exp(a_cs[..., -1:] - a_cs)  # (b, h, c, Q)
    if seg is not None:
        to_end = to_end * (seg == seg[:, :, -1:])[:, None]
    weighted = (u * to_end[..., None]).reshape(b, g, hpg, c, Q, p)
    states = weighted.swapaxes(-1, -2) @ Bc[:, :, None]  # (b, g, hpg, c, p, n)
    states = states.reshape(b, h, c, p, n)

    # 3. pass states between chunks: entering[z] = sum_{k<=z} exp(sum totals k..z-1) states[k]
    if initial_state is None:
        initial_state = mx.zeros((b, h, p, n), dtype=F32)
    all_states = mx.concatenate([initial_state.astype(F32)[:, :, None], states], axis=2)  # (b, h, c+1, p, n)
    totals = mx.pad(a_cs[..., -1], [(0, 0), (0, 0), (1, 0)])  # (b, h, c+1)
    chunk_decay = segsum(totals)  # (b, h, c+1, c+1), stable
    if seg is not None:
        seg_before = mx.concatenate([seg[:, :1, 0], seg[:, :, -1]], axis=1)  # (b, c+1) sequence of each state
        same_seq = (seg_before[:, :, None] == seg_before[:, None, :])[:, None]
        chunk_decay = mx.where(same_seq, chunk_decay, NEG_INF)
    entering = (mx.exp(chunk_decay) @ all_states.reshape(b, h, c + 1, p * n)).reshape(b, h, c + 1, p, n)
    final_state = entering[:, :, -1]
    entering = entering[:, :, :-1]  # (b, h, c, p, n)

    # 4. contribution of the state entering each chunk: y_i += exp(a_cs_i) C_i . state
    from_start = mx.exp(a_cs)  # (b, h, c, Q)
    if seg is not None:
        from_start = from_start * (seg == seg_before[:, :-1, None])[:, None]
    Cs = Cc[:, :, None] @ entering.reshape(b, g, hpg, c, p, n).swapaxes(-1, -2)  # (b, g, hpg, c, Q, p)
    y = y + Cs.reshape(b, h, c, Q, p) * from_start[..., None]

    return y.transpose(0, 2, 3, 1, 4), final_state  # (b, c, Q, h, p)


def ssd_chunk_scan(
    x: mx.array,  # (b, l, h, p)
    dt: mx.array,  # (b, l, h), after softplus
    A: mx.array,  # (h,), negative
    B: mx.array,  # (b, l, g, n)
    C: mx.array,  # (b, l, g, n)
    chunk_size: int,
    D: mx.array | None = None,  # (h,)
    seq_idx: mx.array | None = None,
    initial_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Mamba2 SSD: y_t = C_t h_t + D x_t with h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T."""
    dt = dt.astype(F32)
    xf = x.astype(F32)
    y, final_state = chunked_scan(
        xf * dt[..., None], dt * A.astype(F32), B, C, chunk_size, seq_idx=seq_idx, initial_state=initial_state
    )
    if D is not None:
        y = y + xf * D.astype(F32)[:, None]
    return y, final_state


def ema_chunk_scan(
    values: mx.array,  # (b, m, d)  chunk vectors ẑ
    p: mx.array,  # (b, m)  boundary probabilities, already clamped to [1e-4, 1 - 1e-4]
    chunk_size: int = 256,
    seq_idx: mx.array | None = None,
) -> mx.array:
    """The dechunk EMA z̄_j = p_j ẑ_j + (1 - p_j) z̄_{j-1}, z̄_{-1} = 0, in fp32 -> (b, m, d)."""
    b, m, d = values.shape
    p = p.astype(F32)
    ones = mx.ones((b, m, 1, 1), dtype=F32)
    u = (values.astype(F32) * p[..., None])[:, :, None]  # (b, m, 1, d): one head of width d
    y, _ = chunked_scan(u, mx.log1p(-p)[..., None], ones, ones, chunk_size, seq_idx=seq_idx)
    return y[:, :, 0]


def ema_dechunk(
    values: mx.array,  # (b, m, d)  chunk outputs ẑ
    p: mx.array,  # (b, m)  clamped to [1e-4, 1 - 1e-4]
    chunk_index: mx.array,  # (b, l) int32: chunk of every byte (cumsum of the boundary mask - 1, >= 0)
    seq_idx: mx.array | None = None,  # (b, m) int32, packed mode
    chunk_size: int = 256,
) -> mx.array:
    """The EMA over chunks, spread back over the bytes: out[:, t] = z̄[:, chunk_index[:, t]] -> (b, l, d) fp32.

    MLX-only helper (torch does this inline in dechunk.py): it is the pure twin of the Metal
    kernel `hnet_metal_kernels.ema_dechunk`, which fuses the scan and the gather."""
    z = ema_chunk_scan(values, p, chunk_size, seq_idx=seq_idx)  # (b, m, d)
    index = mx.stop_gradient(chunk_index.astype(mx.int32))[..., None]  # (b, l, 1); no gradient to indices
    return mx.take_along_axis(z, index, axis=1)


def ssm_step(
    state: mx.array,  # (b, h, p, n) fp32
    x: mx.array,  # (b, h, p)
    dt: mx.array,  # (b, h), before softplus
    dt_bias: mx.array,  # (h,)
    A: mx.array,  # (h,)
    B: mx.array,  # (b, g, n)
    C: mx.array,  # (b, g, n)
    D: mx.array,  # (h,)
) -> tuple[mx.array, mx.array]:
    """One decode step of the SSM (mamba's selective_state_update): returns y (b, h, p) fp32, new state."""
    h = state.shape[1]
    g = B.shape[1]
    dt = softplus(dt.astype(F32) + dt_bias.astype(F32))  # (b, h)
    dA = mx.exp(dt * A.astype(F32))  # (b, h)
    if g == 1:  # H-Net's case: one group broadcasts over the heads (a repeat would be copied every step)
        Bh, Ch = B.astype(F32), C.astype(F32)  # (b, 1, n)
    else:
        Bh = mx.repeat(B.astype(F32), h // g, axis=1)  # (b, h, n)
        Ch = mx.repeat(C.astype(F32), h // g, axis=1)
    xf = x.astype(F32)
    new_state = state * dA[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    # A product and a sum, not a (p, n) @ (n, 1) batched matmul: b*h tiny matmuls cost far more
    # in BLAS call overhead than the work itself.
    y = (new_state * Ch[:, :, None, :]).sum(-1) + D.astype(F32)[:, None] * xf
    return y, new_state


def softplus(x: mx.array) -> mx.array:
    """log(1 + e^x) with torch's threshold: x itself above 20 (F.softplus default)."""
    return mx.where(x > 20.0, x, mx.logaddexp(x, 0.0))

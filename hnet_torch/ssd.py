"""Linear recurrences in chunked matrix form: the Mamba2 SSD scan and the dechunk EMA.

Both are instances of  h_t = exp(a_t) h_{t-1} + u_t B_t^T,  y_t = C_t h_t :
  * Mamba2 (Dao & Gu 2024, SSD): a_t = dt_t A, u_t = dt_t x_t;
  * H-Net dechunk EMA (paper eq. 5): a_t = log(1 - P_t), u_t = P_t z_t, B = C = 1, so
    z̄_t = P_t z_t + (1 - P_t) z̄_{t-1}.

The scan runs in chunks of Q positions (mamba's ssd_minimal): inside a chunk the output is a
masked (Q x Q) matrix product; chunk-final states are passed between chunks with a (c x c)
decay matrix. There is no Python loop over time, so it exports to ONNX and runs in O(L Q)
memory. `seq_idx` (packed mode) restarts the recurrence wherever the sequence id changes;
the masks below zero every term that would cross a sequence start, which is what mamba_ssm's
`seq_idx` does. Everything is computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i, else -inf."""
    T = x.shape[-1]
    xx = x[..., None].expand(*x.shape, T)  # [..., i, j] = x_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~causal, float("-inf"))


def chunked_scan(
    u: torch.Tensor,  # (b, l, h, p)  input already scaled (dt * x for Mamba2)
    log_decay: torch.Tensor,  # (b, l, h)  a_t <= 0
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    seq_idx: torch.Tensor | None = None,  # (b, l) int, packed mode
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
    scan_chunks=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, l, h, p) and the state after the last position (b, h, p, n), all fp32. Pads the
    time axis to whole chunks and runs `scan_chunks` (default: `whole_chunks_scan`; kernels.py
    passes a torch.compile'd one) on them. Keeping the padding out of the compiled function keeps
    its shapes free of `l mod Q`: with that arithmetic inside, Inductor's CPU code (torch 2.13,
    dynamic shapes) corrupted the heap ("double free or corruption")."""
    b, l, h, p = u.shape
    g, n = B.shape[-2:]
    Q = chunk_size
    c = (l + Q - 1) // Q
    pad = c * Q - l
    # Zero input and zero log-decay: padded steps leave the state untouched.
    u = F.pad(u.float(), (0, 0, 0, 0, 0, pad))
    log_decay = F.pad(log_decay.float(), (0, 0, 0, pad))
    B = F.pad(B.float(), (0, 0, 0, 0, 0, pad))
    C = F.pad(C.float(), (0, 0, 0, 0, 0, pad))
    seg = None
    if seq_idx is not None:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)  # padding belongs to the last sequence
        seg = seq_idx.reshape(b, c, Q)
    y, final_state = (scan_chunks or whole_chunks_scan)(
        u.reshape(b, c, Q, h, p), log_decay.reshape(b, c, Q, h), B.reshape(b, c, Q, g, n), C.reshape(b, c, Q, g, n),
        seg, initial_state,
    )
    return y.reshape(b, c * Q, h, p)[:, :l], final_state


def whole_chunks_scan(
    u: torch.Tensor,  # (b, c, Q, h, p) fp32
    a: torch.Tensor,  # (b, c, Q, h) log-decay
    B: torch.Tensor,  # (b, c, Q, g, n)
    C: torch.Tensor,  # (b, c, Q, g, n)
    seg: torch.Tensor | None,  # (b, c, Q) sequence ids, packed mode
    initial_state: torch.Tensor | None,  # (b, h, p, n)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan over c whole chunks of Q positions: y (b, c, Q, h, p) and the final state (b, h, p, n)."""
    b, c, Q, h, p = u.shape
    g, n = B.shape[-2:]
    hpg = h // g
    u = u.permute(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
    a = a.permute(0, 3, 1, 2)  # (b, h, c, Q)
    Bc = B.permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cc = C.permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    a_cs = torch.cumsum(a, dim=-1)  # (b, h, c, Q)

    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=u.device))
    if seg is not None:
        same = (seg[:, :, :, None] == seg[:, :, None, :]) & causal  # (b, c, Q, Q)
        same = same[:, None]
    else:
        same = causal
    # 1. within-chunk outputs: y_i = sum_{j<=i} C_i.B_j exp(a_cs_i - a_cs_j) u_j
    diff = a_cs[..., :, None] - a_cs[..., None, :]  # (b, h, c, Q, Q)
    decay = torch.exp(torch.where(same, diff, float("-inf")))
    CB = Cc @ Bc.transpose(-1, -2)  # (b, g, c, Q, Q)
    scores = decay.reshape(b, g, hpg, c, Q, Q) * CB[:, :, None]
    y = (scores.reshape(b, h, c, Q, Q) @ u)  # (b, h, c, Q, p)

    # 2. each chunk's own final state (only positions in the chunk's last sequence count)
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, h, c, Q)
    if seg is not None:
        to_end = to_end * (seg == seg[:, :, -1:])[:, None]
    weighted = (u * to_end[..., None]).reshape(b, g, hpg, c, Q, p)
    states = weighted.transpose(-1, -2) @ Bc[:, :, None]  # (b, g, hpg, c, p, n)
    states = states.reshape(b, h, c, p, n)

    # 3. pass states between chunks: entering[z] = sum_{k<=z} exp(sum totals k..z-1) states[k]
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, device=u.device, dtype=torch.float32)
    all_states = torch.cat([initial_state.float()[:, :, None], states], dim=2)  # (b, h, c+1, p, n)
    chunk_decay = segsum(F.pad(a_cs[..., -1], (1, 0)))  # (b, h, c+1, c+1), stable
    if seg is not None:
        seg_before = torch.cat([seg[:, :1, 0], seg[:, :, -1]], dim=1)  # (b, c+1) sequence of each state
        chunk_decay = chunk_decay.masked_fill(~(seg_before[:, :, None] == seg_before[:, None, :])[:, None], float("-inf"))
    entering = torch.einsum("bhzk,bhkpn->bhzpn", torch.exp(chunk_decay), all_states)
    final_state = entering[:, :, -1]
    entering = entering[:, :, :-1]  # (b, h, c, p, n)

    # 4. contribution of the state entering each chunk: y_i += exp(a_cs_i) C_i . state
    from_start = torch.exp(a_cs)  # (b, h, c, Q)
    if seg is not None:
        from_start = from_start * (seg == seg_before[:, :-1, None])[:, None]
    Cs = (Cc[:, :, None] @ entering.reshape(b, g, hpg, c, p, n).transpose(-1, -2))  # (b, g, hpg, c, Q, p)
    y = y + Cs.reshape(b, h, c, Q, p) * from_start[..., None]

    return y.permute(0, 2, 3, 1, 4), final_state  # (b, c, Q, h, p)


def ssd_chunk_scan(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h), after softplus
    A: torch.Tensor,  # (h,), negative
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: torch.Tensor | None = None,  # (h,)
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scan_chunks=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD: y_t = C_t h_t + D x_t with h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T."""
    dt = dt.float()
    y, final_state = chunked_scan(
        x.float() * dt[..., None], dt * A.float(), B, C, chunk_size, seq_idx=seq_idx, initial_state=initial_state,
        scan_chunks=scan_chunks,
    )
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y, final_state


def ema_chunk_scan(
    values: torch.Tensor,  # (b, m, d)  chunk vectors ẑ
    p: torch.Tensor,  # (b, m)  boundary probabilities, already clamped to [1e-4, 1 - 1e-4]
    chunk_size: int = 256,
    seq_idx: torch.Tensor | None = None,
    scan_chunks=None,
) -> torch.Tensor:
    """The dechunk EMA z̄_j = p_j ẑ_j + (1 - p_j) z̄_{j-1}, z̄_{-1} = 0, in fp32 -> (b, m, d)."""
    b, m, d = values.shape
    p = p.float()
    ones = torch.ones(b, m, 1, 1, device=values.device, dtype=torch.float32)
    u = (values.float() * p[..., None])[:, :, None]  # (b, m, 1, d): one head of width d
    y, _ = chunked_scan(u, torch.log1p(-p)[..., None], ones, ones, chunk_size, seq_idx=seq_idx, scan_chunks=scan_chunks)
    return y[:, :, 0]


def ssm_step(
    state: torch.Tensor,  # (b, h, p, n) fp32
    x: torch.Tensor,  # (b, h, p)
    dt: torch.Tensor,  # (b, h), before softplus
    dt_bias: torch.Tensor,  # (h,)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, g, n)
    C: torch.Tensor,  # (b, g, n)
    D: torch.Tensor,  # (h,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the SSM (mamba's selective_state_update): returns y (b, h, p) fp32, new state."""
    b, h, p, n = state.shape
    g = B.shape[1]
    dt = F.softplus(dt.float() + dt_bias.float())  # (b, h)
    dA = torch.exp(dt * A.float())  # (b, h)
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    xf = x.float()
    new_state = state * dA[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    # A product and a sum, not a (p, n) @ (n, 1) batched matmul: b*h tiny matmuls cost far more
    # in BLAS call overhead (and threading) than the work itself.
    y = (new_state * Ch[:, :, None, :]).sum(-1) + D.float()[:, None] * xf
    return y, new_state

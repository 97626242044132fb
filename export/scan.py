"""The chunked linear scan in a form torch.export can trace with a symbolic length.

Same math as hnet_torch/ssd.py (mamba's ssd_minimal: h_t = exp(a_t) h_{t-1} + u_t B_t^T,
y_t = C_t h_t, computed chunk by chunk with plain matmuls), re-implemented here because the
reference branches on the length (`if pad:`) and supports packed `seq_idx`: a branch on a
symbolic length makes torch.export specialise or fail, and export never needs packed mode.
Here the padding is always applied (possibly zero) and written as `c * Q - l`, so the padded
length simplifies to `c * Q` even when `l` is a data-dependent chunk count (inner levels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet_torch.ssd import segsum


class ChunkCounts:
    """ceil(l / Q) for one sequence length l, computed once per chunk size Q and shared by every scan
    over that length. The count is read with `.item()` as its own symbol, bounded by torch._check:
    tracing then reasons about `c` and `c * Q - l` instead of floor divisions, and one symbol per
    level instead of one per layer keeps symbolic shape reasoning (most of the export time) small."""

    def __init__(self, length) -> None:
        self.length = length
        self._counts: dict[int, int] = {}

    def __call__(self, chunk_size: int):
        if chunk_size not in self._counts:
            l, Q = self.length, chunk_size
            c = ((torch.ones((), dtype=torch.int64) * l + Q - 1) // Q).item()
            torch._check(c >= 1)
            torch._check(c * Q >= l)
            torch._check(c * Q - l < Q)
            self._counts[chunk_size] = c
        return self._counts[chunk_size]


def chunked_scan(
    u: torch.Tensor,  # (b, l, h, p) input already scaled (dt * x for Mamba2)
    log_decay: torch.Tensor,  # (b, l, h) a_t <= 0
    B: torch.Tensor,  # (b, l, n) shared by every head (H-Net's Mamba2 has ngroups = 1)
    C: torch.Tensor,  # (b, l, n)
    chunk_size: int,
    chunks: ChunkCounts | None = None,  # of this length l
    initial_state: torch.Tensor | None = None,  # (b, h, p, n) state before position 0 (default zeros)
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, l, h, p) and the state after the last position (b, h, p, n), all fp32."""
    b, l, h, p = u.shape
    n = B.shape[-1]
    Q = chunk_size
    c = (chunks or ChunkCounts(l))(Q)
    pad = c * Q - l
    # Zero input and zero log-decay: padded steps leave the state untouched.
    u = F.pad(u.float(), (0, 0, 0, 0, 0, pad)).reshape(b, c, Q, h, p).transpose(2, 3)  # (b, c, h, Q, p)
    a = F.pad(log_decay.float(), (0, 0, 0, pad)).reshape(b, c, Q, h).transpose(2, 3)  # (b, c, h, Q)
    B = F.pad(B.float(), (0, 0, 0, pad)).reshape(b, c, Q, n)
    C = F.pad(C.float(), (0, 0, 0, pad)).reshape(b, c, Q, n)
    a_cs = torch.cumsum(a, dim=-1)  # (b, c, h, Q)

    # 1. within-chunk outputs: y_i = sum_{j<=i} C_i.B_j exp(a_cs_i - a_cs_j) u_j
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=u.device))
    decay = torch.exp(torch.where(causal, a_cs[..., :, None] - a_cs[..., None, :], float("-inf")))  # (b, c, h, Q, Q)
    CB = C @ B.transpose(-1, -2)  # (b, c, Q, Q)
    y = (decay * CB[:, :, None]) @ u  # (b, c, h, Q, p)

    # 2. each chunk's own final state: sum_j exp(a_cs_end - a_cs_j) u_j B_j^T
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, c, h, Q)
    states = (u * to_end[..., None]).transpose(-1, -2) @ B[:, :, None]  # (b, c, h, p, n)

    # 3. pass states between chunks: entering[z] = sum_{k<=z} exp(sum totals k..z-1) states[k]
    # The initial state (zeros, or the state a cache carries into an extension) enters as chunk -1.
    totals = F.pad(a_cs[..., -1].transpose(1, 2), (1, 0))  # (b, h, c+1), the initial state first
    chunk_decay = torch.exp(segsum(totals))  # (b, h, c+1, c+1)
    if initial_state is None:
        all_states = F.pad(states, (0, 0, 0, 0, 0, 0, 1, 0))
    else:
        all_states = torch.cat([initial_state.float()[:, None], states], dim=1)  # (b, c+1, h, p, n)
    all_states = all_states.transpose(1, 2).reshape(b, h, c + 1, p * n)
    entering = chunk_decay @ all_states  # (b, h, c+1, p n)
    final_state = entering[:, :, c].reshape(b, h, p, n)
    entering = entering[:, :, :c].reshape(b, h, c, p, n).transpose(1, 2)  # (b, c, h, p, n)

    # 4. contribution of the state entering each chunk: y_i += exp(a_cs_i) C_i . state
    y = y + (C[:, :, None] @ entering.transpose(-1, -2)) * torch.exp(a_cs)[..., None]

    y = y.transpose(2, 3).reshape(b, c * Q, h, p)[:, :l]
    return y, final_state


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int, D: torch.Tensor, chunks: ChunkCounts | None = None,
                   initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD, x (b, l, h, p), softplus'ed dt (b, l, h), B/C (b, l, n):
    y = C h + D x with h_t = exp(dt A) h_{t-1} + dt x B^T (h_{-1} = initial_state, default 0)."""
    dt = dt.float()
    y, final_state = chunked_scan(x.float() * dt[..., None], dt * A.float(), B, C, chunk_size, chunks, initial_state)
    return y + x.float() * D.float()[:, None], final_state


def ema_chunk_scan(values: torch.Tensor, p: torch.Tensor, chunk_size: int, chunks: ChunkCounts | None = None,
                   initial: torch.Tensor | None = None) -> torch.Tensor:
    """The dechunk EMA z_j = p_j v_j + (1 - p_j) z_{j-1}, z_{-1} = initial (b, d) or 0 (paper eq. 5):
    (b, m, d) fp32."""
    b, m, d = values.shape
    p = p.float()
    ones = torch.ones(b, m, 1, device=values.device, dtype=torch.float32)
    u = (values.float() * p[..., None])[:, :, None]  # (b, m, 1, d): one head of width d
    state = None if initial is None else initial.float()[:, None, :, None]  # (b, 1, d, 1)
    y, _ = chunked_scan(u, torch.log1p(-p)[..., None], ones, ones, chunk_size, chunks, state)
    return y[:, :, 0]

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


def chunked_scan(
    u: torch.Tensor,  # (b, l, h, p) input already scaled (dt * x for Mamba2)
    log_decay: torch.Tensor,  # (b, l, h) a_t <= 0
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, l, h, p) and the state after the last position (b, h, p, n), all fp32."""
    b, l, h, p = u.shape
    g, n = B.shape[-2:]
    Q = chunk_size
    c = ((torch.ones((), dtype=torch.int64) * l + Q - 1) // Q).item()
    torch._check(c >= 1)
    torch._check(c * Q >= l)
    torch._check(c * Q - l < Q)
    pad = c * Q - l
    # Zero input and zero log-decay: padded steps leave the state untouched.
    u = F.pad(u.float(), (0, 0, 0, 0, 0, pad))
    a = F.pad(log_decay.float(), (0, 0, 0, pad))
    B = F.pad(B.float(), (0, 0, 0, 0, 0, pad))
    C = F.pad(C.float(), (0, 0, 0, 0, 0, pad))
    hpg = h // g
    u = u.reshape(b, c, Q, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
    a = a.reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    Bc = B.reshape(b, c, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cc = C.reshape(b, c, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    a_cs = torch.cumsum(a, dim=-1)  # (b, h, c, Q)

    # 1. within-chunk outputs: y_i = sum_{j<=i} C_i.B_j exp(a_cs_i - a_cs_j) u_j
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=u.device))
    diff = a_cs[..., :, None] - a_cs[..., None, :]  # (b, h, c, Q, Q)
    decay = torch.exp(torch.where(causal, diff, float("-inf")))
    CB = Cc @ Bc.transpose(-1, -2)  # (b, g, c, Q, Q)
    scores = decay.reshape(b, g, hpg, c, Q, Q) * CB[:, :, None]
    y = scores.reshape(b, h, c, Q, Q) @ u  # (b, h, c, Q, p)

    # 2. each chunk's own final state
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, h, c, Q)
    weighted = (u * to_end[..., None]).reshape(b, g, hpg, c, Q, p)
    states = (weighted.transpose(-1, -2) @ Bc[:, :, None]).reshape(b, h, c, p, n)

    # 3. pass states between chunks: entering[z] = sum_{k<=z} exp(sum totals k..z-1) states[k]
    all_states = F.pad(states, (0, 0, 0, 0, 1, 0))  # (b, h, c+1, p, n), zero initial state
    chunk_decay = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    entering = (chunk_decay @ all_states.reshape(b, h, c + 1, p * n)).reshape(b, h, c + 1, p, n)
    final_state = entering[:, :, c]
    entering = entering[:, :, :c]  # (b, h, c, p, n)

    # 4. contribution of the state entering each chunk: y_i += exp(a_cs_i) C_i . state
    Cs = Cc[:, :, None] @ entering.reshape(b, g, hpg, c, p, n).transpose(-1, -2)  # (b, g, hpg, c, Q, p)
    y = y + Cs.reshape(b, h, c, Q, p) * torch.exp(a_cs)[..., None]

    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, p)[:, :l]
    return y, final_state


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD, x (b, l, h, p), softplus'ed dt (b, l, h): y = C h + D x, h_t = exp(dt A) h + dt x B^T."""
    dt = dt.float()
    y, final_state = chunked_scan(x.float() * dt[..., None], dt * A.float(), B, C, chunk_size)
    return y + x.float() * D.float()[:, None], final_state


def ema_chunk_scan(values: torch.Tensor, p: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The dechunk EMA z_j = p_j v_j + (1 - p_j) z_{j-1}, z_{-1} = 0 (paper eq. 5): (b, m, d) fp32."""
    b, m, d = values.shape
    p = p.float()
    ones = torch.ones(b, m, 1, 1, device=values.device, dtype=torch.float32)
    u = (values.float() * p[..., None])[:, :, None]  # (b, m, 1, d): one head of width d
    y, _ = chunked_scan(u, torch.log1p(-p)[..., None], ones, ones, chunk_size)
    return y[:, :, 0]

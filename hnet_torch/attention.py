"""Causal multi-head attention with partial rotary embedding and a sliding window (official `CausalMHA`).

Wqkv splits as (three, heads, head_dim). Rotary (base 10000, GPT-NeoX halves, fp32 angles) turns
the first `rotary_emb_dim` channels of every q/k head; positions are absolute indices at this
level (chunk indices for inner levels), restarting per sequence in packed mode. `window_size = w`
lets each query see w previous keys and itself (flash-attn window (w, -1)); -1 is global.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hnet_core.errors import HNetError

from . import kernels
from .cache import AttentionState


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float = 10000.0):
    """cos, sin of shape positions.shape + (rotary_dim // 2,), fp32 (flash-attn RotaryEmbedding)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, l, h, d); cos/sin (b, l, r/2). Non-interleaved: rotate pairs (i, i + r/2)."""
    r = cos.shape[-1] * 2
    # flash-attn caches cos/sin in the activation dtype and rotates in fp32.
    cos = cos.to(x.dtype).float()[:, :, None]
    sin = sin.to(x.dtype).float()[:, :, None]
    x1, x2 = x[..., : r // 2].float(), x[..., r // 2 : r].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], dim=-1)


class CausalMHA(nn.Module):
    def __init__(self, d_model: int, num_heads: int, rotary_emb_dim: int = 0, window_size: int = -1,
                 rotary_base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.rotary_emb_dim, self.window_size, self.rotary_base = rotary_emb_dim, window_size, rotary_base
        self.use_kernels = "auto"
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def cache_slots(self, max_seqlen: int) -> tuple[int, bool]:
        """(slots, ring): a ring of window+1 slots when that is smaller than max_seqlen."""
        if self.window_size >= 0 and self.window_size + 1 <= max_seqlen:
            return self.window_size + 1, True
        return max_seqlen, False

    def allocate_state(self, batch_size: int, max_seqlen: int, dtype=None) -> AttentionState:
        slots, ring = self.cache_slots(max_seqlen)
        w = self.out_proj.weight
        shape = (batch_size, slots, self.num_heads, self.head_dim)
        return AttentionState(
            k=torch.zeros(shape, device=w.device, dtype=dtype or w.dtype),
            v=torch.zeros(shape, device=w.device, dtype=dtype or w.dtype),
            ring=ring,
        )

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, l, _ = x.shape
        q, k, v = self.Wqkv(x).view(b, l, 3, self.num_heads, self.head_dim).unbind(2)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin(positions, self.rotary_emb_dim, self.rotary_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cu_seqlens=None, max_seqlen=None,
                state: AttentionState | None = None) -> torch.Tensor:
        b, l, _ = x.shape
        if positions is None:
            positions = torch.arange(l, device=x.device).expand(b, l)
        q, k, v = self._qkv(x, positions)
        if state is not None:
            self._fill_cache(state, k, v, mask)
        ctx = kernels.attention(q, k, v, self.window_size, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, mode=self.use_kernels)
        return self.out_proj(ctx.reshape(b, l, self.d_model))

    def _fill_cache(self, state: AttentionState, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        b, l = k.shape[:2]
        slots = state.k.shape[1]
        if not state.ring:
            if l > slots:
                raise HNetError(f"prompt of {l} tokens does not fit the cache's max_seqlen {slots}; allocate a larger cache")
            state.k[:, :l] = k
            state.v[:, :l] = v
            return
        # Slot j holds the latest position t < length with t = j (mod slots).
        lengths = mask.sum(-1) if mask is not None else torch.full((b,), l, device=k.device)
        j = torch.arange(slots, device=k.device)
        t = j + slots * torch.div(lengths[:, None] - 1 - j, slots, rounding_mode="floor")  # (b, slots)
        valid = (t >= 0)[..., None, None]
        idx = t.clamp(min=0)[..., None, None].expand(-1, -1, self.num_heads, self.head_dim)
        state.k.copy_(torch.where(valid, k.gather(1, idx), state.k))
        state.v.copy_(torch.where(valid, v.gather(1, idx), state.v))

    def step(self, x: torch.Tensor, state: AttentionState, positions: torch.Tensor,
             active: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, 1, d), positions (b,) = tokens already seen at this level."""
        b = x.shape[0]
        q, k, v = self._qkv(x, positions[:, None])
        slots = state.k.shape[1]
        slot = positions % slots if state.ring else positions
        rows = torch.arange(b, device=x.device)
        if active is not None:
            keep = ~active[:, None, None]
            k0, v0 = k[:, 0], v[:, 0]
            k0 = torch.where(keep, state.k[rows, slot], k0)
            v0 = torch.where(keep, state.v[rows, slot], v0)
        else:
            k0, v0 = k[:, 0], v[:, 0]
        state.k[rows, slot] = k0
        state.v[rows, slot] = v0
        j = torch.arange(slots, device=x.device)
        if state.ring:
            visible = j[None] <= positions[:, None]  # every filled slot is within the window
        else:
            visible = kernels.window_mask(positions[:, None], j[None].expand(b, -1), self.window_size)[:, 0]
        ctx = kernels.attention_step(q, state.k, state.v, visible, mode=self.use_kernels)
        return self.out_proj(ctx.reshape(b, 1, self.d_model))

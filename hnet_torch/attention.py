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

    def cache_slots(self, max_seqlen: int | None) -> tuple[int, bool]:
        """(slots, ring): a ring of window+1 slots for a sliding window (unless max_seqlen is
        smaller); else max_seqlen slots, or none yet for a growing cache (see cache.reserve)."""
        if self.window_size >= 0 and (max_seqlen is None or self.window_size + 1 <= max_seqlen):
            return self.window_size + 1, True
        return max_seqlen or 0, False

    def allocate_state(self, batch_size: int, max_seqlen: int | None, dtype=None) -> AttentionState:
        slots, ring = self.cache_slots(max_seqlen)
        w = self.out_proj.weight
        if callable(w):  # an int8 layer (quantize.py): it runs on the CPU in float32
            w = torch.empty(0)
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
                state: AttentionState | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
        """past (b,): positions already in `state` (a live cache being extended); None for a fresh one."""
        b, l, _ = x.shape
        if positions is None:
            start = torch.zeros(b, dtype=torch.long, device=x.device) if past is None else past.long()
            positions = start[:, None] + torch.arange(l, device=x.device)
        q, k, v = self._qkv(x, positions)
        if state is not None and past is not None:
            ctx = self._extend_cache(state, q, k, v, mask, past.long())
        else:
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

    def _extend_cache(self, state: AttentionState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, past: torch.Tensor) -> torch.Tensor:
        """Attend l new queries per sample to its cached keys and the new ones, then store the new keys.

        q/k/v (b, l, h, d) at positions past + i; the cache holds positions < past (a ring: the
        last `slots` of them). Keys are laid out as [cache (S) | new (l)] with one (b, l, S + l)
        visibility mask, so the result equals attending over the whole sequence at once."""
        b, l = k.shape[:2]
        slots = state.k.shape[1]
        lengths = mask.sum(-1) if mask is not None else torch.full((b,), l, device=k.device)
        j = torch.arange(slots, device=k.device)
        expand = (-1, -1, self.num_heads, self.head_dim)
        if state.ring:
            # Entry m of the unrolled ring is position past - slots + m, stored in slot (that % slots).
            old_pos = past[:, None] - slots + j  # (b, S)
            idx = (old_pos % slots)[..., None, None].expand(*expand)
            k_old, v_old = state.k.gather(1, idx), state.v.gather(1, idx)
        else:
            old_pos = j[None].expand(b, -1)
            k_old, v_old = state.k, state.v
        i = torch.arange(l, device=k.device)
        q_pos = past[:, None] + i  # (b, l)
        see_old = (old_pos >= 0) & (old_pos < past[:, None])  # (b, S)
        visible = torch.cat([kernels.window_mask(q_pos, old_pos, self.window_size) & see_old[:, None],
                             kernels.window_mask(i, i, self.window_size).expand(b, -1, -1)], dim=-1)  # (b, l, S + l)
        ctx = kernels.attention_cached(q, torch.cat([k_old, k.to(k_old.dtype)], 1), torch.cat([v_old, v.to(v_old.dtype)], 1),
                                       visible, mode=self.use_kernels)
        # Store: slot j now holds position t, the latest < past + length with t = j (mod slots) for a
        # ring, t = j otherwise; it comes from the new keys where t >= past.
        end = (past + lengths)[:, None]
        t = j + slots * torch.div(end - 1 - j, slots, rounding_mode="floor") if state.ring else j[None].expand(b, -1)
        take = (t >= past[:, None]) & (t < end)  # (b, S)
        idx = (t - past[:, None]).clamp(0, max(l - 1, 0))[..., None, None].expand(*expand)
        state.k.copy_(torch.where(take[..., None, None], k.gather(1, idx).to(state.k.dtype), state.k))
        state.v.copy_(torch.where(take[..., None, None], v.gather(1, idx).to(state.v.dtype), state.v))
        return ctx.to(q.dtype)

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

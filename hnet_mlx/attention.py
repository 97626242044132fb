"""Causal multi-head attention with partial rotary embedding and a sliding window (official `CausalMHA`).

Wqkv splits as (three, heads, head_dim). Rotary (base 10000, GPT-NeoX halves, fp32 angles) turns
the first `rotary_emb_dim` channels of every q/k head; positions are absolute indices at this
level (chunk indices for inner levels), restarting per sequence in packed mode. `window_size = w`
lets each query see w previous keys and itself (flash-attn window (w, -1)); -1 is global.

MLX layout: q/k/v and the KV cache are (B, heads, L, head_dim), what mx.fast SDPA and rope take.
Rotary uses `mx.fast.rope` (traditional=False = GPT-NeoX halves) with a per-sample position
offset, given the wavelengths `rotary_wavelengths` computed like torch's inv_freq denominators:
with `base=` instead, MLX's own angle rounding drifts from torch's by ~1e-4 at position 3000 and
~1e-3 at 60000; with `freqs=` it matches the explicit formula bit for bit. In packed mode
positions restart inside the row, so cos/sin are computed explicitly (`rotary_cos_sin` /
`apply_rotary`, the same formula).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hnet_core.errors import HNetError

from . import blas, kernels
from .cache import AttentionState


def rotary_wavelengths(rotary_dim: int, base: float = 10000.0) -> mx.array:
    """base^(2i/r), fp32: 1 / inv_freq of flash-attn's RotaryEmbedding (what mx.fast.rope's freqs= takes)."""
    return base ** (mx.arange(0, rotary_dim, 2, dtype=mx.float32) / rotary_dim)


def rotary_cos_sin(positions: mx.array, rotary_dim: int, base: float = 10000.0):
    """cos, sin of shape positions.shape + (rotary_dim // 2,), fp32 (flash-attn RotaryEmbedding)."""
    inv_freq = 1.0 / rotary_wavelengths(rotary_dim, base)
    angles = positions.astype(mx.float32)[..., None] * inv_freq
    return mx.cos(angles), mx.sin(angles)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (b, h, l, d); cos/sin (b, l, r/2). Non-interleaved: rotate pairs (i, i + r/2)."""
    r = cos.shape[-1] * 2
    # flash-attn caches cos/sin in the activation dtype and rotates in fp32.
    cos = cos.astype(x.dtype).astype(mx.float32)[:, None]
    sin = sin.astype(x.dtype).astype(mx.float32)[:, None]
    x1, x2 = x[..., : r // 2].astype(mx.float32), x[..., r // 2 : r].astype(mx.float32)
    rotated = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)
    return mx.concatenate([rotated, x[..., r:]], axis=-1)


class CausalMHA(nn.Module):
    def __init__(self, d_model: int, num_heads: int, rotary_emb_dim: int = 0, window_size: int = -1,
                 rotary_base: float = 10000.0):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.rotary_emb_dim, self.window_size, self.rotary_base = rotary_emb_dim, window_size, rotary_base
        self.use_kernels = kernels.default_mode()  # $HNET_METAL_KERNELS, else "auto"
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def cache_slots(self, max_seqlen: int | None) -> tuple[int, bool]:
        """(slots, ring): a ring of window+1 slots for a sliding window (unless max_seqlen is
        smaller); else max_seqlen slots, or none yet for a growing cache (see cache.reserve)."""
        if self.window_size >= 0 and (max_seqlen is None or self.window_size + 1 <= max_seqlen):
            return self.window_size + 1, True
        return max_seqlen or 0, False

    def allocate_state(self, batch_size: int, max_seqlen: int | None, dtype=None) -> AttentionState:
        slots, ring = self.cache_slots(max_seqlen)
        shape = (batch_size, self.num_heads, slots, self.head_dim)
        dtype = dtype or self.out_proj_dtype()
        return AttentionState(k=mx.zeros(shape, dtype=dtype), v=mx.zeros(shape, dtype=dtype), ring=ring)

    def out_proj_dtype(self):
        """Activation dtype of this layer (a quantized out_proj keeps it in its scales)."""
        return getattr(self.out_proj, "scales", self.out_proj.weight).dtype

    def _qkv(self, x: mx.array, positions: mx.array | None = None, offset: int | mx.array = 0):
        """q, k, v (b, h, l, d); rotary at `offset + arange(l)` (per-sample offset (b,)) or at `positions` (b, l)."""
        b, l, _ = x.shape
        qkv = blas.linear(self.Wqkv, x).reshape(b, l, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rotary_emb_dim > 0:
            if positions is not None:
                cos, sin = rotary_cos_sin(positions, self.rotary_emb_dim, self.rotary_base)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            else:
                freqs = rotary_wavelengths(self.rotary_emb_dim, self.rotary_base)
                rope = dict(traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
                q = mx.fast.rope(q, self.rotary_emb_dim, **rope)
                k = mx.fast.rope(k, self.rotary_emb_dim, **rope)
        return q, k, v

    def __call__(self, x: mx.array, mask: mx.array | None = None, seq_idx: mx.array | None = None,
                 positions: mx.array | None = None, cu_seqlens=None, max_seqlen=None,
                 state: AttentionState | None = None, past: mx.array | None = None) -> mx.array:
        """past (b,): positions already in `state` (a live cache being extended); None for a fresh one."""
        b, l, _ = x.shape
        q, k, v = self._qkv(x, positions, offset=0 if past is None else past)
        if state is not None and past is not None:
            ctx = self._extend_cache(state, q, k, v, mask, past)
        else:
            if state is not None:
                self._fill_cache(state, k, v, mask)
            ctx = kernels.attention(q, k, v, self.window_size, seq_idx=seq_idx, mode=self.use_kernels)  # (b, h, l, d)
        return self.out_proj(ctx.transpose(0, 2, 1, 3).reshape(b, l, self.d_model))

    def _fill_cache(self, state: AttentionState, k: mx.array, v: mx.array, mask: mx.array | None) -> None:
        b, l = k.shape[0], k.shape[2]
        slots = state.k.shape[2]
        if not state.ring:
            if l > slots:
                raise HNetError(f"prompt of {l} tokens does not fit the cache's max_seqlen {slots}; allocate a larger cache")
            state.k = mx.concatenate([k.astype(state.k.dtype), state.k[:, :, l:]], axis=2)
            state.v = mx.concatenate([v.astype(state.v.dtype), state.v[:, :, l:]], axis=2)
            return
        # Slot j holds the latest position t < length with t = j (mod slots).
        lengths = mask.sum(-1) if mask is not None else mx.full((b,), l)
        j = mx.arange(slots)
        t = j + slots * mx.floor_divide(lengths[:, None] - 1 - j, slots)  # (b, slots)
        valid = (t >= 0)[:, None, :, None]
        idx = mx.maximum(t, 0)[:, None, :, None]  # (b, 1, slots, 1)
        state.k = mx.where(valid, mx.take_along_axis(k, idx, axis=2), state.k).astype(state.k.dtype)
        state.v = mx.where(valid, mx.take_along_axis(v, idx, axis=2), state.v).astype(state.v.dtype)

    def _extend_cache(self, state: AttentionState, q: mx.array, k: mx.array, v: mx.array,
                      mask: mx.array | None, past: mx.array) -> mx.array:
        """Attend l new queries per sample to its cached keys and the new ones, then store the new keys.

        q/k/v (b, h, l, d) at positions past + i; the cache holds positions < past (a ring: the
        last `slots` of them). Keys are laid out as [cache (S) | new (l)] with one (b, l, S + l)
        visibility mask, so the result equals attending over the whole sequence at once."""
        b, l = k.shape[0], k.shape[2]
        slots = state.k.shape[2]
        past = past.astype(mx.int32)
        lengths = mask.sum(-1).astype(mx.int32) if mask is not None else mx.full((b,), l, dtype=mx.int32)
        j = mx.arange(slots)
        if state.ring:
            # Entry m of the unrolled ring is position past - slots + m, stored in slot (that % slots).
            old_pos = past[:, None] - slots + j  # (b, S)
            idx = (old_pos % slots)[:, None, :, None]
            k_old, v_old = mx.take_along_axis(state.k, idx, axis=2), mx.take_along_axis(state.v, idx, axis=2)
        else:
            old_pos = mx.broadcast_to(j[None], (b, slots))
            k_old, v_old = state.k, state.v
        i = mx.arange(l)
        q_pos = past[:, None] + i  # (b, l)
        see_old = (old_pos >= 0) & (old_pos < past[:, None])  # (b, S)
        new_mask = mx.broadcast_to(kernels.window_mask(i, i, self.window_size)[None], (b, l, l))
        visible = mx.concatenate([kernels.window_mask(q_pos, old_pos, self.window_size) & see_old[:, None], new_mask],
                                 axis=-1)  # (b, l, S + l)
        ctx = kernels.attention_cached(q, mx.concatenate([k_old, k.astype(k_old.dtype)], axis=2),
                                       mx.concatenate([v_old, v.astype(v_old.dtype)], axis=2), visible,
                                       mode=self.use_kernels)
        # Store: slot j now holds position t, the latest < past + length with t = j (mod slots) for a
        # ring, t = j otherwise; it comes from the new keys where t >= past.
        end = (past + lengths)[:, None]
        t = j + slots * mx.floor_divide(end - 1 - j, slots) if state.ring else mx.broadcast_to(j[None], (b, slots))
        take = ((t >= past[:, None]) & (t < end))[:, None, :, None]  # (b, 1, S, 1)
        idx = mx.clip(t - past[:, None], 0, max(l - 1, 0))[:, None, :, None]
        state.k = mx.where(take, mx.take_along_axis(k, idx, axis=2).astype(state.k.dtype), state.k)
        state.v = mx.where(take, mx.take_along_axis(v, idx, axis=2).astype(state.v.dtype), state.v)
        return ctx.astype(q.dtype)

    def step(self, x: mx.array, state: AttentionState, positions: mx.array,
             active: mx.array | None = None) -> mx.array:
        """x (b, 1, d), positions (b,) = tokens already seen at this level."""
        b = x.shape[0]
        q, k, v = self._qkv(x, offset=positions)  # (b, h, 1, d)
        slots = state.k.shape[2]
        slot = positions % slots if state.ring else positions
        # Write the one slot this byte goes to with a scatter: a `where` over the whole cache costs
        # O(S) per step, and compiled on the CPU its broadcast is ~10x slower still.
        idx = mx.broadcast_to(slot[:, None, None, None], k.shape)  # (b, h, 1, d)
        k_new, v_new = k.astype(state.k.dtype), v.astype(state.v.dtype)
        if active is not None:
            keep = ~active[:, None, None, None]
            k_new = mx.where(keep, mx.take_along_axis(state.k, idx, axis=2), k_new)
            v_new = mx.where(keep, mx.take_along_axis(state.v, idx, axis=2), v_new)
        state.k = mx.put_along_axis(state.k, idx, k_new, axis=2)
        state.v = mx.put_along_axis(state.v, idx, v_new, axis=2)
        j = mx.arange(slots)
        if state.ring:
            visible = j[None] <= positions[:, None]  # every filled slot is within the window
        else:
            visible = kernels.window_mask(positions[:, None], mx.broadcast_to(j[None], (b, slots)), self.window_size)[:, 0]
        ctx = kernels.attention_step(q, state.k, state.v, visible, mode=self.use_kernels)  # (b, h, 1, d)
        return blas.linear(self.out_proj, ctx.transpose(0, 2, 1, 3).reshape(b, 1, self.d_model))  # see blas.linear

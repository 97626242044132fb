"""Functional prefill and decode-step versions of the hnet_torch blocks, for export.

They read the weights of the hnet_torch modules (Mamba2, CausalMHA, Block, Isotropic) and reuse
their pure pieces (norms, SwiGLU, rotary, conv/SSM step math); only what cannot be traced with
symbolic sizes or must be functional is written again here:
  * states are returned, never written in place (an exported graph maps states in -> states out);
  * the depthwise causal conv is one grouped Conv (the reference loops over taps and stops early
    for short inputs, a branch on the length);
  * KV caches are fixed-size buffers written with a one-hot `where` at each sample's position (the
    reference's `state.k[rows, slot] = ...` is an in-place index_put); prefill returns the keys of
    global layers unpadded and the runtime sizes the buffer (the reference raises on a length check);
  * in a decode step, `active` (B,) selects per sample whether the new state is kept, as in the
    reference's `commit`;
  * an extension (`*_extend`) runs a right-padded piece of `counts` (B,) tokens per sample on top of
    the states of `past` (positions `past_len` (B,) onward): the conv sees the cached inputs before
    the piece, the scan starts from the cached SSM state, attention sees the cached keys; a sample
    with count 0 keeps every state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet_torch import kernels, ssd
from hnet_torch.attention import CausalMHA
from hnet_torch.isotropic import Isotropic
from hnet_torch.mamba2 import Mamba2

from .layout import kv_slots
from .scan import ChunkCounts, ssd_chunk_scan

State = dict[str, torch.Tensor]


def keep(active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new where the sample is active, old elsewhere (the functional form of hnet_torch's commit)."""
    if active is None:
        return new
    return torch.where(active.view(-1, *([1] * (old.dim() - 1))), new.to(old.dtype), old)


# -- Mamba2 ---------------------------------------------------------------------------------


def mamba_prefill(m: Mamba2, u: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, chunks: ChunkCounts,
                  name: str, out: State) -> torch.Tensor:
    """u (b, l, d), right-padded with `mask`; writes the conv and SSM states after each row's last token."""
    b, l, _ = u.shape
    z, xBC, dt = m._split(m.in_proj(u))  # (b, l, ·)
    # Conv state = the last d_conv conv inputs of each sample (zeros before its start).
    idx = lengths[:, None] - m.d_conv + torch.arange(m.d_conv, device=u.device)  # (b, k)
    taps = xBC.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, m.conv_dim))
    out[name + ".conv"] = (taps * (idx >= 0)[..., None].to(taps.dtype)).transpose(1, 2)
    conv = F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.conv_dim)
    xBC = F.silu(conv[..., :l]).transpose(1, 2)  # (b, l, conv_dim)
    x, B, C = torch.split(xBC, [m.d_inner, m.d_state, m.d_state], dim=-1)
    # Padding steps get dt = 0 so the final state is each row's state after its last real byte.
    dt = F.softplus(dt.float() + m.dt_bias.float()) * mask[..., None]
    A = -torch.exp(m.A_log.float())
    y, final_state = ssd_chunk_scan(x.reshape(b, l, m.nheads, m.headdim), dt, A, B, C, m.chunk_size, m.D, chunks)
    out[name + ".ssm"] = final_state
    y = m.norm(y.reshape(b, l, m.d_inner).to(u.dtype), z)
    return m.out_proj(y)


def mamba_step(m: Mamba2, u: torch.Tensor, past: State, name: str, out: State, active: torch.Tensor | None
               ) -> torch.Tensor:
    """u (b, 1, d) -> (b, 1, d); the reference's step math (kernels.conv_step, ssd.ssm_step)."""
    b = u.shape[0]
    z, xBC, dt = m._split(m.in_proj(u[:, 0]))  # (b, ·)
    conv_old, ssm_old = past[name + ".conv"], past[name + ".ssm"]
    xBC, conv = kernels.conv_step(conv_old, xBC, m.conv1d.weight[:, 0], m.conv1d.bias, mode="off")
    x, B, C = torch.split(xBC, [m.d_inner, m.d_state, m.d_state], dim=-1)
    A = -torch.exp(m.A_log.float())
    y, ssm = ssd.ssm_step(ssm_old, x.reshape(b, m.nheads, m.headdim), dt, m.dt_bias, A, B[:, None], C[:, None], m.D)
    out[name + ".conv"] = keep(active, conv, conv_old)
    out[name + ".ssm"] = keep(active, ssm, ssm_old)
    y = m.norm(y.reshape(b, m.d_inner).to(u.dtype), z)
    return m.out_proj(y)[:, None]


def mamba_extend(m: Mamba2, u: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, chunks: ChunkCounts,
                 past: State, name: str, out: State) -> torch.Tensor:
    """u (b, l, d) right-padded with `mask` (counts real tokens per row), continuing past's states."""
    b, l, _ = u.shape
    z, xBC, dt = m._split(m.in_proj(u))  # (b, l, ·)
    conv_old = past[name + ".conv"]  # (b, conv_dim, d_conv): the last d_conv conv inputs
    full = torch.cat([conv_old.transpose(1, 2).to(xBC.dtype), xBC], dim=1)  # (b, d_conv + l, conv_dim)
    # New conv state = the last d_conv inputs up to each row's last real token (the old one if count is 0).
    idx = counts[:, None] + torch.arange(m.d_conv, device=u.device)  # (b, k) into `full`
    out[name + ".conv"] = full.gather(1, idx[..., None].expand(-1, -1, m.conv_dim)).transpose(1, 2).to(conv_old.dtype)
    conv = F.conv1d(full.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, groups=m.conv_dim)  # (b, conv_dim, l + 1)
    xBC = F.silu(conv[..., 1:]).transpose(1, 2)  # token i's window is full[i + 1 : i + 1 + d_conv]
    x, B, C = torch.split(xBC, [m.d_inner, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt.float() + m.dt_bias.float()) * mask[..., None]  # padding leaves the state as it is
    A = -torch.exp(m.A_log.float())
    y, final_state = ssd_chunk_scan(x.reshape(b, l, m.nheads, m.headdim), dt, A, B, C, m.chunk_size, m.D, chunks,
                                    initial_state=past[name + ".ssm"])
    out[name + ".ssm"] = final_state
    y = m.norm(y.reshape(b, l, m.d_inner).to(u.dtype), z)
    return m.out_proj(y)


# -- attention ------------------------------------------------------------------------------


def attention_prefill(a: CausalMHA, x: torch.Tensor, lengths: torch.Tensor, max_seqlen: int, name: str, out: State
                      ) -> torch.Tensor:
    b, l, _ = x.shape
    positions = torch.arange(l, device=x.device)
    q, k, v = a._qkv(x, positions[None].expand(b, l))  # (b, l, h, d), rotary applied
    slots, ring = kv_slots(a.window_size, max_seqlen)
    if ring:
        # Slot j holds the latest position t < length with t = j (mod slots).
        j = torch.arange(slots, device=x.device)
        t = j + slots * torch.div(lengths[:, None] - 1 - j, slots, rounding_mode="floor")  # (b, slots)
        idx = t.clamp(min=0)[..., None, None].expand(-1, -1, a.num_heads, a.head_dim)
        filled = (t >= 0)[..., None, None]
        out[name + ".k"] = torch.where(filled, k.gather(1, idx), torch.zeros((), dtype=k.dtype))
        out[name + ".v"] = torch.where(filled, v.gather(1, idx), torch.zeros((), dtype=v.dtype))
    else:
        # Slot t = position t. Prefill returns the l filled slots only; the runtime pads them to
        # the decode capacity it needs (a prompt-only call, e.g. evaluation, pays for no buffer).
        out[name + ".k"], out[name + ".v"] = k, v
    visible = kernels.window_mask(positions, positions, a.window_size)  # (l, l)
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible)
    return a.out_proj(ctx.transpose(1, 2).reshape(b, l, a.d_model))


def attention_step(a: CausalMHA, x: torch.Tensor, positions: torch.Tensor, max_seqlen: int, past: State, name: str,
                   out: State, active: torch.Tensor | None) -> torch.Tensor:
    """x (b, 1, d), positions (b,) = tokens already seen at this level."""
    b = x.shape[0]
    q, k, v = a._qkv(x, positions[:, None])
    k_old, v_old = past[name + ".k"], past[name + ".v"]
    slots = k_old.shape[1]
    _, ring = kv_slots(a.window_size, max_seqlen)
    j = torch.arange(slots, device=x.device)
    slot = positions % slots if ring else positions
    write = j[None] == slot[:, None]  # (b, slots)
    if active is not None:
        write = write & active[:, None]
    k_new = torch.where(write[..., None, None], k, k_old)
    v_new = torch.where(write[..., None, None], v, v_old)
    out[name + ".k"], out[name + ".v"] = k_new, v_new
    if ring:
        visible = j[None] <= positions[:, None]  # every filled slot is within the window
    else:
        visible = kernels.window_mask(positions[:, None], j[None], a.window_size)[:, 0]  # (b, slots)
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2),
                                         attn_mask=visible[:, None, None, :])
    return a.out_proj(ctx.transpose(1, 2).reshape(b, 1, a.d_model))


def attention_extend(a: CausalMHA, x: torch.Tensor, past_len: torch.Tensor, counts: torch.Tensor, max_seqlen: int,
                     past: State, name: str, out: State) -> torch.Tensor:
    """x (b, l, d): tokens at positions past_len + i (i < counts real), attending to the cached keys
    and to the piece itself; the piece's keys are written into the cache buffers."""
    b, l, _ = x.shape
    positions = past_len[:, None] + torch.arange(l, device=x.device)[None]  # (b, l)
    q, k, v = a._qkv(x, positions)  # (b, l, h, d), rotary at each sample's own positions
    k_old, v_old = past[name + ".k"], past[name + ".v"]
    slots = k_old.shape[1]
    _, ring = kv_slots(a.window_size, max_seqlen)
    j = torch.arange(slots, device=x.device)[None]  # (1, slots)
    total = past_len + counts  # (b,)
    if ring:
        # Slot j holds the latest position t < length with t = j (mod slots), before and after the piece.
        old_pos = j + slots * torch.div(past_len[:, None] - 1 - j, slots, rounding_mode="floor")  # (b, slots)
        new_pos = j + slots * torch.div(total[:, None] - 1 - j, slots, rounding_mode="floor")
    else:
        old_pos = j.expand(b, -1)  # slot t = position t; the buffer holds >= total slots (the runtime sizes it)
        new_pos = old_pos
    cached = (old_pos >= 0) & (old_pos < past_len[:, None])  # (b, slots) slots holding a past key
    fresh = (new_pos >= past_len[:, None]) & (new_pos < total[:, None])  # slots the piece writes
    src = (new_pos - past_len[:, None]).clamp(0, l - 1)[..., None, None].expand(-1, -1, a.num_heads, a.head_dim)
    out[name + ".k"] = torch.where(fresh[..., None, None], k.gather(1, src).to(k_old.dtype), k_old)
    out[name + ".v"] = torch.where(fresh[..., None, None], v.gather(1, src).to(v_old.dtype), v_old)
    keys = torch.cat([k_old.to(k.dtype), k], dim=1)  # (b, slots + l, h, d)
    values = torch.cat([v_old.to(v.dtype), v], dim=1)
    key_pos = torch.cat([old_pos, positions], dim=1)  # (b, slots + l)
    visible = kernels.window_mask(positions, key_pos, a.window_size)  # (b, l, slots + l)
    visible = visible & torch.cat([cached, torch.ones_like(positions, dtype=torch.bool)], dim=1)[:, None]
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None])
    return a.out_proj(ctx.transpose(1, 2).reshape(b, l, a.d_model))


# -- stacks ---------------------------------------------------------------------------------


def stack_prefill(stack: Isotropic, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, chunks: ChunkCounts,
                  max_seqlen: int, prefix: str, out: State) -> torch.Tensor:
    """An Isotropic stack over (b, l, d): pre-norm blocks with the fp32 residual, final norm."""
    residual = None
    for i, block in enumerate(stack.layers):
        name = f"{prefix}.{i}"
        h, residual = block.norm1(h, residual, prenorm=True)
        if isinstance(block.mixer, CausalMHA):
            h = attention_prefill(block.mixer, h, lengths, max_seqlen, name, out)
        else:
            h = mamba_prefill(block.mixer, h, mask, lengths, chunks, name, out)
        if block.mlp is not None:
            h, residual = block.norm2(h, residual, prenorm=True)
            h = block.mlp(h)
    return stack.rmsnorm(h, residual)


def stack_step(stack: Isotropic, h: torch.Tensor, positions: torch.Tensor, max_seqlen: int, past: State, prefix: str,
               out: State, active: torch.Tensor | None) -> torch.Tensor:
    residual = None
    for i, block in enumerate(stack.layers):
        name = f"{prefix}.{i}"
        h, residual = block.norm1(h, residual, prenorm=True)
        if isinstance(block.mixer, CausalMHA):
            h = attention_step(block.mixer, h, positions, max_seqlen, past, name, out, active)
        else:
            h = mamba_step(block.mixer, h, past, name, out, active)
        if block.mlp is not None:
            h, residual = block.norm2(h, residual, prenorm=True)
            h = block.mlp(h)
    return stack.rmsnorm(h, residual)


def stack_extend(stack: Isotropic, h: torch.Tensor, mask: torch.Tensor, past_len: torch.Tensor, counts: torch.Tensor,
                 chunks: ChunkCounts, max_seqlen: int, past: State, prefix: str, out: State) -> torch.Tensor:
    residual = None
    for i, block in enumerate(stack.layers):
        name = f"{prefix}.{i}"
        h, residual = block.norm1(h, residual, prenorm=True)
        if isinstance(block.mixer, CausalMHA):
            h = attention_extend(block.mixer, h, past_len, counts, max_seqlen, past, name, out)
        else:
            h = mamba_extend(block.mixer, h, mask, counts, chunks, past, name, out)
        if block.mlp is not None:
            h, residual = block.norm2(h, residual, prenorm=True)
            h = block.mlp(h)
    return stack.rmsnorm(h, residual)

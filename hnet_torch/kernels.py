"""The one dispatch point between the pure-PyTorch paths and fused CUDA kernels.

Every mixer calls these functions with its `use_kernels` setting ("auto", "on" or "off"):
  * "off": plain PyTorch ops (ssd.py, shifted-sum conv, SDPA), on any device; the reference.
  * "on": mamba_ssm's Triton SSD scan and state update, causal_conv1d, flash_attn; CUDA only.
  * "auto": the fused kernels where the tensor is on CUDA and the package imports, pure otherwise.
Each fused path computes the same math as its pure twin; tests/test_cuda_kernels.py holds them
to each other on a GPU.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from hnet_core.errors import HNetError

from . import ssd

KERNEL_MODES = ("auto", "on", "off")


@lru_cache(maxsize=None)
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return None


def _mamba_ssd():
    return _module("mamba_ssm.ops.triton.ssd_combined")


def _mamba_state_update():
    return _module("mamba_ssm.ops.triton.selective_state_update")


def _causal_conv():
    return _module("causal_conv1d")


def _flash_attn():
    return _module("flash_attn")


def use_fused(mode: str, tensor: torch.Tensor, module_getter) -> bool:
    if mode not in KERNEL_MODES:
        raise HNetError(f"use_kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "off":
        return False
    available = tensor.is_cuda and module_getter() is not None
    if mode == "on" and not available:
        raise HNetError("use_kernels='on' needs a CUDA tensor and the fused packages (pip install 'hnet-mlx[cuda]'); use 'auto'")
    return available


# -- Mamba2 scan ---------------------------------------------------------------------------


def ssd_scan(x, dt, A, B, C, chunk_size, D, seq_idx=None, initial_state=None, mode="auto"):
    """(b,l,h,p) x, softplus'ed dt (b,l,h), initial state (b,h,p,n) | None -> y (b,l,h,p) fp32, final state (b,h,p,n) fp32."""
    if use_fused(mode, x, _mamba_ssd):
        y, final = _mamba_ssd().mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_states=initial_state, return_final_states=True
        )
        return y.float(), final.float()
    return ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_state=initial_state)


def ssm_step(state, x, dt, dt_bias, A, B, C, D, mode="auto"):
    """One decode step; returns y (b,h,p) and the new fp32 state."""
    if use_fused(mode, x, _mamba_state_update):
        h = x.shape[1]
        new_state = state.clone()
        y = _mamba_state_update().selective_state_update(
            new_state, x, dt[..., None].expand(-1, -1, x.shape[-1]), A[:, None, None].expand(h, x.shape[-1], state.shape[-1]),
            B, C, D[:, None].expand(-1, x.shape[-1]), dt_bias=dt_bias[:, None].expand(-1, x.shape[-1]), dt_softplus=True,
        )
        return y.float(), new_state
    return ssd.ssm_step(state, x, dt, dt_bias, A, B, C, D)


# -- depthwise causal conv -----------------------------------------------------------------


def causal_conv1d_silu(x, weight, bias, seq_idx=None, mode="auto"):
    """SiLU(depthwise causal conv) over (b, l, d) with weight (d, k); taps never cross a sequence start."""
    if use_fused(mode, x, _causal_conv):
        out = _causal_conv().causal_conv1d_fn(
            x.transpose(1, 2), weight, bias, seq_idx=None if seq_idx is None else seq_idx.int(), activation="silu"
        )
        return out.transpose(1, 2)
    b, l, d = x.shape
    k = weight.shape[-1]
    out = bias.to(x.dtype).expand(b, l, d)
    for shift in range(k):
        # tap (k - 1 - shift) multiplies x[t - shift]
        if shift >= l:
            break
        shifted = F.pad(x[:, : l - shift], (0, 0, shift, 0)) if shift else x
        if seq_idx is not None and shift:
            same = F.pad(seq_idx[:, shift:] == seq_idx[:, : l - shift], (shift, 0), value=False)
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, k - 1 - shift]
    return F.silu(out)


def conv_step(conv_state, x, weight, bias, mode="auto"):
    """Shift x (b, d) into conv_state (b, d, k); return SiLU(conv) and the new state."""
    new_state = torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1)
    out = (new_state * weight).sum(-1) + bias
    return F.silu(out).to(x.dtype), new_state


# -- attention -----------------------------------------------------------------------------


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window visibility: key j is visible to query i iff i - window <= j <= i."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = diff >= 0
    if window >= 0:
        visible = visible & (diff <= window)
    return visible


def attention(q, k, v, window: int, seq_idx=None, cu_seqlens=None, max_seqlen=None, mode="auto"):
    """Causal windowed attention over (b, l, h, d); packed mode passes seq_idx (b=1) or cu_seqlens."""
    b, l, h, d = q.shape
    if use_fused(mode, q, _flash_attn) and q.dtype in (torch.float16, torch.bfloat16):
        fa = _flash_attn()
        if cu_seqlens is not None:
            out = fa.flash_attn_varlen_func(
                q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=(window, -1)
            )
            return out[None]
        return fa.flash_attn_func(q, k, v, causal=True, window_size=(window, -1))
    pos = torch.arange(l, device=q.device)
    visible = window_mask(pos, pos, window)  # (l, l)
    if seq_idx is not None:
        visible = visible & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (b, l, l)
        visible = visible[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible)
    return out.transpose(1, 2)


def attention_cached(q, k, v, visible, mode="auto"):
    """Queries against cached + new keys: q (b,l,h,d), k/v (b,S,h,d), visible (b,l,S) bool."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible[:, None])
    return out.transpose(1, 2)


def attention_step(q, k_cache, v_cache, visible, mode="auto"):
    """One query per sample against its cache: q (b,1,h,d), caches (b,S,h,d), visible (b,S)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=visible[:, None, None, :]
    )
    return out.transpose(1, 2)

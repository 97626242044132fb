"""The one dispatch point between the pure-PyTorch paths and the fused ones.

Three paths, each with named implementations (`model.set_kernels(...)` picks them):
  * scan       "pure"      ssd.py's chunked scan, eager (the reference);
               "compiled"  the same ssd.py scan under torch.compile (dynamic shapes; Triton on CUDA,
                           C++ on CPU);
               "mamba_ssm" mamba_ssm's Triton SSD scan and, in decode steps, its state update.
               The dechunk EMA is the same scan: compiled under "compiled", eager otherwise.
  * conv       "pure"      shifted sums; "causal_conv1d" the causal-conv1d package (prefill and step).
  * attention  "sdpa"      scaled_dot_product_attention with an explicit (L x L) boolean mask (the reference);
               "flex"      FlexAttention with a block-sparse mask (causal + window + same document),
                           compiled to a fused kernel; torch 2.13 has its backward on CUDA only;
               "flash_attn" flash-attn (fp16/bf16 only).
  The attention path is the training/prefill computation: a decode step's single query reads its
  KV cache with SDPA under every setting.
A spec is "auto", "off" (pure, pure, sdpa), "on" (mamba_ssm, causal_conv1d, flash_attn: the three
CUDA packages) or "scan=...,conv=...,attention=..." (a path left out is "auto"). A named
implementation is used exactly: when it cannot run for a call, that call raises HNetError with the
reason. "auto" picks per call: mamba_ssm, causal_conv1d on CUDA when importable; the compiled scan
on CUDA otherwise; flash_attn on CUDA when importable and the dtype is fp16/bf16, else flex on
CUDA, else sdpa; and logs once which it chose. Each fused path computes the same math as its pure
twin; tests/test_torch_kernels.py and tests/test_cuda_kernels.py hold them to each other.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from hnet_core.errors import HNetError

from . import ssd

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "on", "off")
CHOICES = {
    "scan": ("auto", "pure", "compiled", "mamba_ssm"),
    "conv": ("auto", "pure", "causal_conv1d"),
    "attention": ("auto", "sdpa", "flex", "flash_attn"),
}


@dataclass(frozen=True)
class KernelPlan:
    """The implementation requested for each path ("auto" or one of CHOICES[path])."""

    scan: str = "auto"
    conv: str = "auto"
    attention: str = "auto"

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


PRESETS = {
    "auto": KernelPlan(),
    "off": KernelPlan("pure", "pure", "sdpa"),
    "on": KernelPlan("mamba_ssm", "causal_conv1d", "flash_attn"),
}


def parse_plan(spec: str | KernelPlan | None = None, **paths: str) -> KernelPlan:
    """'auto' | 'off' | 'on' | 'scan=compiled,attention=flex' (+ keyword overrides) -> KernelPlan."""
    if isinstance(spec, KernelPlan):
        chosen = {f.name: getattr(spec, f.name) for f in fields(spec)}
    elif spec is None or spec in PRESETS:
        base = PRESETS[spec or "auto"]
        chosen = {f.name: getattr(base, f.name) for f in fields(base)}
    elif isinstance(spec, str) and "=" in spec:
        chosen = {}
        for part in spec.split(","):
            key, _, value = part.strip().partition("=")
            chosen[key.strip()] = value.strip()
    else:
        raise HNetError(f"kernels must be one of {KERNEL_MODES} or 'scan=...,conv=...,attention=...', got {spec!r}")
    chosen.update(paths)
    for key, value in chosen.items():
        if key not in CHOICES:
            raise HNetError(f"unknown kernel path {key!r}; the paths are {', '.join(CHOICES)}")
        if value not in CHOICES[key]:
            raise HNetError(f"{key} must be one of {CHOICES[key]}, got {value!r}")
    return KernelPlan(**chosen)


# -- optional packages ---------------------------------------------------------------------

_PROBED: dict[str, tuple[object | None, str | None]] = {}


def probe(name: str) -> tuple[object | None, str | None]:
    """(module, None) | (None, None) when the package is not installed | (None, why) when it is
    installed but fails to import (a broken build, a missing dependency, a CUDA extension that does
    not load): that is reported once, and a path that asks for it fails with this cause."""
    if name not in _PROBED:
        try:
            _PROBED[name] = (importlib.import_module(name), None)
        except ModuleNotFoundError as e:
            # Only the package itself (or the module asked for) being absent means "not installed";
            # a dependency it imports being absent is a broken install, reported like any failure.
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                _PROBED[name] = (None, None)
            else:
                _PROBED[name] = (None, f"importing {name} failed: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - any other failure is reported, never silently ignored
            _PROBED[name] = (None, f"importing {name} failed: {type(e).__name__}: {e}")
        if _PROBED[name][1] is not None:
            log.warning("%s (the fused path that needs it is unavailable)", _PROBED[name][1])
    return _PROBED[name]


PACKAGES = {
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update"),
    "causal_conv1d": ("causal_conv1d",),
    "flash_attn": ("flash_attn",),
}


def probe_all() -> None:
    """Import every optional package and look for the compilers now (before torch.compile traces a
    dispatch: the traced code then only reads these caches)."""
    for names in PACKAGES.values():
        for name in names:
            probe(name)
    for device in ("cpu", "cuda"):
        compiler_missing(device)


_NO_COMPILER: dict[str, str | None] = {}


def compiler_missing(device: str) -> str | None:
    """Why torch.compile cannot build kernels for `device` here, or None. Inductor writes C++ for
    CPU kernels; on CUDA, Triton builds a small C launcher with the host C compiler (no nvcc needed)."""
    if device not in _NO_COMPILER:
        if device == "cpu":
            names, env = ("c++", "g++", "clang++"), "CXX"
        else:
            names, env = ("cc", "gcc", "clang"), "CC"
        found = os.environ.get(env) or next((n for n in names if shutil.which(n)), None)
        _NO_COMPILER[device] = None if found else (
            f"torch.compile on {device} needs a host {'C++' if device == 'cpu' else 'C'} compiler "
            f"({' / '.join(names)}; none on PATH)")
    return _NO_COMPILER[device]


def _package(impl: str, index: int = 0):
    return probe(PACKAGES[impl][index])


def _mamba_ssd():
    return _package("mamba_ssm")[0]


def _mamba_state_update():
    return probe(PACKAGES["mamba_ssm"][1])[0]


def _causal_conv():
    return _package("causal_conv1d")[0]


def _flash_attn():
    return _package("flash_attn")[0]


_ANNOUNCED: set[tuple[str, str, str]] = set()


def _announce(path: str, impl: str, device: torch.device) -> None:
    if torch.compiler.is_compiling():
        return  # never read the set while tracing: it would become a guard, and a recompile when it grows
    key = (path, impl, device.type)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info("kernels: %s uses %s on %s", path, impl, device.type)


def _is_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _why_not(path: str, impl: str, x: torch.Tensor, needs_grad: bool = False) -> str | None:
    """None when `impl` can run this call, else the reason it cannot."""
    if impl in PACKAGES:
        if not _is_cuda(x):
            return f"{impl} runs on CUDA tensors only (this one is on {x.device.type})"
        for name in PACKAGES[impl]:
            module, error = probe(name)
            if error is not None:
                return error
            if module is None:
                return f"{impl} is not installed (pip install 'hnet-mlx[cuda-source]', see docs/gpu.md)"
        if impl == "flash_attn" and x.dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn runs fp16/bf16 only, this tensor is {x.dtype} (use attention='flex' or 'sdpa')"
    if impl in ("compiled", "flex") and x.device.type in ("cuda", "cpu"):
        why = compiler_missing(x.device.type)
        if why is not None:
            return why
    if impl == "flex":
        if probe("torch.nn.attention.flex_attention")[0] is None:
            return f"FlexAttention needs torch >= 2.6 (this is {torch.__version__})"
        if x.device.type not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA and CPU, not {x.device.type}"
        if x.device.type == "cpu" and needs_grad:
            return (f"FlexAttention has no backward pass on CPU in torch {torch.__version__}; "
                    "train on CPU with attention='sdpa'")
    return None


def choose(path: str, requested: str, x: torch.Tensor, needs_grad: bool = False) -> str:
    """The implementation of `path` that runs this call (raises HNetError if a named one cannot)."""
    if requested not in CHOICES[path]:
        raise HNetError(f"{path} must be one of {CHOICES[path]}, got {requested!r}")
    if requested != "auto":
        why = _why_not(path, requested, x, needs_grad)
        if why is not None:
            raise HNetError(f"{path}={requested} cannot run: {why}")
        return requested
    cuda = _is_cuda(x)
    if path == "scan":
        candidates = ("mamba_ssm", "compiled") if cuda else ("pure",)
    elif path == "conv":
        candidates = ("causal_conv1d",) if cuda else ("pure",)
    else:
        candidates = ("flash_attn", "flex") if cuda else ("sdpa",)
    impl = next((c for c in candidates if _why_not(path, c, x, needs_grad) is None), CHOICES[path][1])
    _announce(path, impl, x.device)
    return impl


def resolve(mode: str | KernelPlan, device: torch.device, dtype: torch.dtype, needs_grad: bool = True) -> dict[str, str]:
    """The implementation each path will use for activations of `dtype` on `device` (and log it
    once): trainers call this up front, so a named path that cannot run fails before any step, and
    the choice is said even when the calls themselves run inside torch.compile'd regions."""
    plan = _plan(mode)
    x = torch.empty(0, device=device, dtype=dtype)
    return {path: choose(path, getattr(plan, path), x, needs_grad) for path in CHOICES}


def _plan(mode: str | KernelPlan) -> KernelPlan:
    return mode if isinstance(mode, KernelPlan) else PRESETS.get(mode) or parse_plan(mode)


# -- Mamba2 scan ---------------------------------------------------------------------------

_COMPILED: dict[str, object] = {}


def compiled(name: str, fn):
    """torch.compile(fn) once per name, with dynamic shapes: the inner stages' lengths change every
    step (dynamic chunking), and dynamic shapes keep that to a bounded number of recompiles. The
    scans compile only `ssd.whole_chunks_scan` (the padding to whole chunks runs eagerly)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def ssd_scan(x, dt, A, B, C, chunk_size, D, seq_idx=None, initial_state=None, mode="auto"):
    """(b,l,h,p) x, softplus'ed dt (b,l,h), initial state (b,h,p,n) | None -> y (b,l,h,p) fp32, final state (b,h,p,n) fp32."""
    impl = choose("scan", _plan(mode).scan, x)
    if impl == "mamba_ssm":
        y, final = _mamba_ssd().mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_states=initial_state, return_final_states=True
        )
        return y.float(), final.float()
    scan_chunks = compiled("ssd", ssd.whole_chunks_scan) if impl == "compiled" else None
    return ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_state=initial_state,
                              scan_chunks=scan_chunks)


def ema_scan(values, p, chunk_size, seq_idx=None, mode="auto"):
    """The dechunk EMA (ssd.ema_chunk_scan); "compiled" compiles it, every other choice runs it eagerly."""
    impl = choose("scan", _plan(mode).scan, values)
    scan_chunks = compiled("ssd", ssd.whole_chunks_scan) if impl == "compiled" else None
    return ssd.ema_chunk_scan(values, p, chunk_size, seq_idx=seq_idx, scan_chunks=scan_chunks)


def ssm_step(state, x, dt, dt_bias, A, B, C, D, mode="auto"):
    """One decode step; returns y (b,h,p) and the new fp32 state."""
    if choose("scan", _plan(mode).scan, x) == "mamba_ssm":
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
    if choose("conv", _plan(mode).conv, x) == "causal_conv1d":
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
    if choose("conv", _plan(mode).conv, x) == "causal_conv1d":
        new_state = conv_state.clone()  # causal_conv1d_update shifts the state in place
        out = _causal_conv().causal_conv1d_update(x.to(conv_state.dtype), new_state, weight, bias, activation="silu")
        return out.to(x.dtype), new_state
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


def sdpa_attention(q, k, v, window: int, seq_idx=None):
    """The reference: SDPA with an explicit (L x L) mask, (b, l, h, d) in and out."""
    l = q.shape[1]
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


def flex_block_mask(batch: int, length: int, window: int, seq_idx: torch.Tensor | None, device, fused: bool = True):
    """FlexAttention's block-sparse mask for query i / key j: j <= i, i - j <= window (window >= 0),
    and, in packed mode, the same document (seq_idx). Blocks with no visible pair are skipped, so
    packed cost grows with the documents' own lengths, not with the whole batch's. fused=True builds
    it with a compiled kernel (never materialising the L x L grid); fused=False evaluates the grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx
        if window >= 0:
            visible = visible & (q_idx - kv_idx <= window)
        if seq_idx is not None:
            visible = visible & (seq_idx[b, q_idx] == seq_idx[b, kv_idx])
        return visible

    build = compiled("block_mask", create_block_mask) if fused else create_block_mask
    return build(mask_mod, batch if seq_idx is not None else None, None, length, length, device=device)


def flex_attention(q, k, v, window: int, seq_idx=None, fused: bool = True):
    """FlexAttention over (b, l, h, d). fused=False runs torch's unfused reference of the same
    block mask (materialises the scores: for tests only)."""
    from torch.nn.attention import flex_attention as fa

    b, l = q.shape[:2]
    block_mask = flex_block_mask(b, l, window, seq_idx, q.device, fused=fused)
    fn = compiled("flex", fa.flex_attention) if fused else fa.flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def attention(q, k, v, window: int, seq_idx=None, cu_seqlens=None, max_seqlen=None, mode="auto"):
    """Causal windowed attention over (b, l, h, d); packed mode passes seq_idx (b=1) and cu_seqlens."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    impl = choose("attention", _plan(mode).attention, q, needs_grad)
    if impl == "flash_attn":
        fa = _flash_attn()
        if cu_seqlens is not None:
            out = fa.flash_attn_varlen_func(
                q[0], k[0], v[0], cu_seqlens.int(), cu_seqlens.int(), max_seqlen, max_seqlen, causal=True,
                window_size=(window, -1),
            )
            return out[None]
        return fa.flash_attn_func(q, k, v, causal=True, window_size=(window, -1))
    if impl == "flex":
        return flex_attention(q, k, v, window, seq_idx=seq_idx)
    return sdpa_attention(q, k, v, window, seq_idx=seq_idx)


def attention_step(q, k_cache, v_cache, visible, mode="auto"):
    """One query per sample against its cache: q (b,1,h,d), caches (b,S,h,d), visible (b,S).
    SDPA under every setting (see the module docstring): one query needs no fused kernel."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=visible[:, None, None, :]
    )
    return out.transpose(1, 2)

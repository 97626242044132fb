"""The one dispatch point between the pure-MLX paths and the custom Metal kernels.

Every mixer (and the dechunk layer) calls these functions with its `use_kernels` setting:
  * "off": plain MLX ops (ssd.py, shifted-sum conv, mx.fast SDPA), on any device; the reference.
  * "on": the Metal kernels of `hnet_metal_kernels` (`ssd_scan`, `ssm_step`, `ema_dechunk`,
    `conv_step`), called with exactly the signatures of their pure twins below. Raises when the
    package does not import. (On Linux this only works with that package's emulator switched in.)
  * "auto": on a Mac (Metal available, default device the GPU, the package imports), each call
    asks `hnet_metal_kernels.dispatch.prefer_kernel`: the call's compiled variant must pass a
    check against the pure path (once per process), and the kernel must be faster than the pure
    path for the call's shape class (timed once on this machine at first use, remembered on disk).
    Pure MLX otherwise (always on Linux).
The default mode of a new model is `HNET_METAL_KERNELS` (on|off|auto, default auto); an explicit
`model.set_kernels(...)` wins. A missing hnet_metal_kernels package means pure MLX for "auto"; a
package that is installed but fails to import is reported once (a warning with the cause) and
"on" raises with that cause.
The pure functions are what tests/test_metal_kernels*.py hold the kernels to, so their
signatures are a contract: keep them unchanged.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from hnet_core.errors import HNetError

from . import ssd

KERNEL_MODES = ("auto", "on", "off")
METAL_PACKAGE = "hnet_metal_kernels"
ENV_MODE = "HNET_METAL_KERNELS"
_IMPORT_ERRORS: dict[str, str] = {}  # package -> why it failed to import (reported once)


def default_mode() -> str:
    """The `use_kernels` a new model starts with: $HNET_METAL_KERNELS, else "auto"."""
    mode = os.environ.get(ENV_MODE, "").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise HNetError(f"{ENV_MODE}={os.environ[ENV_MODE]!r} is not one of {KERNEL_MODES}; fix or unset it")
    return mode


@lru_cache(maxsize=None)
def _module(name: str):
    """The package, or None when it is not installed. Any other import failure is a bug in an
    installed package: it is reported once and remembered, so that "on" can raise with its cause."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == name or name.startswith(e.name + ".")):
            return None  # the package itself is absent: pure MLX, nothing to report
        why = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any failure while initialising the package is reported
        why = f"{type(e).__name__}: {e}"
    _IMPORT_ERRORS[name] = why
    warnings.warn(f"{name} is installed but failed to import ({why}); using the pure-MLX paths", RuntimeWarning,
                  stacklevel=3)
    return None


def _metal():
    return _module(METAL_PACKAGE)


def use_fused(mode: str, name: str, args: tuple | None = None) -> bool:
    """Whether kernel `name` of hnet_metal_kernels should run for this `use_kernels` mode and call
    (`args`: the kernel's positional arguments; "auto" gates and times on them, see the module doc)."""
    if mode not in KERNEL_MODES:
        raise HNetError(f"use_kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "off":
        return False
    module = _metal()
    present = module is not None and hasattr(module, name)
    if mode == "on":
        if not present:
            if METAL_PACKAGE in _IMPORT_ERRORS:
                raise HNetError(f"use_kernels='on': {METAL_PACKAGE} failed to import: {_IMPORT_ERRORS[METAL_PACKAGE]}")
            raise HNetError(
                f"use_kernels='on' needs the {METAL_PACKAGE} package with kernel {name!r} (Apple silicon); use 'auto'"
            )
        return True
    if not (present and mx.metal.is_available() and mx.default_device().type == mx.gpu):
        return False
    if args is None:  # no call to measure: the variant gate alone cannot be run either
        return False
    return bool(module.dispatch.prefer_kernel(name, tuple(args), pure_paths()))


@lru_cache(maxsize=None)
def pure_paths():
    """The pure twins below as hnet_metal_kernels.reference.PurePaths: what its checks (selftest, the
    measured dispatch, verify) hold the kernels to, plus this package's whole-model checks. Registered
    in pyproject.toml so that `python -m hnet_metal_kernels.selftest` / `verify` find it."""
    from hnet_metal_kernels.reference import PurePaths

    from . import kernel_checks

    return PurePaths(ssm_step=ssd.ssm_step, conv_step=lambda *a: conv_step(*a, mode="off"), ssd_scan=ssd.ssd_chunk_scan,
                     ema_dechunk=ssd.ema_dechunk, files=(ssd.__file__, __file__), model_checks=kernel_checks.CHECKS)


# -- Mamba2 scan ---------------------------------------------------------------------------


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, seq_idx=None, initial_state=None, mode: str = "auto"):
    """x (b,l,h,p), softplus'ed dt (b,l,h) fp32, A (h,), B/C (b,l,g,n), D (h,) | None,
    seq_idx (b,l) int32 | None, initial_state (b,h,p,n) | None -> y (b,l,h,p) fp32, final state (b,h,p,n) fp32."""
    if use_fused(mode, "ssd_scan", (x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)):
        return _metal().ssd_scan(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    return ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_state=initial_state)


def ssm_step(state, x, dt, dt_bias, A, B, C, D, mode: str = "auto"):
    """state (b,h,p,n) fp32, x (b,h,p), dt (b,h) before softplus, dt_bias/A/D (h,), B/C (b,g,n)
    -> y (b,h,p) fp32, new state (b,h,p,n) fp32."""
    if use_fused(mode, "ssm_step", (state, x, dt, dt_bias, A, B, C, D)):
        return _metal().ssm_step(state, x, dt, dt_bias, A, B, C, D)
    return ssd.ssm_step(state, x, dt, dt_bias, A, B, C, D)


# -- dechunk EMA ---------------------------------------------------------------------------


def ema_dechunk(values, p, chunk_index, seq_idx=None, mode: str = "auto"):
    """values (b,m,d), p (b,m) clamped, chunk_index (b,l) int32, seq_idx (b,m) int32 | None
    -> out (b,l,d) fp32 with out[:, t] = EMA(values)[:, chunk_index[:, t]]."""
    if use_fused(mode, "ema_dechunk", (values, p, chunk_index, seq_idx)):
        return _metal().ema_dechunk(values, p, chunk_index, seq_idx)
    return ssd.ema_dechunk(values, p, chunk_index, seq_idx)


# -- depthwise causal conv -----------------------------------------------------------------


def causal_conv1d_silu(x, weight, bias, seq_idx=None, mode: str = "auto"):
    """SiLU(depthwise causal conv) over (b, l, d) with weight (d, k); taps never cross a sequence start."""
    b, l, d = x.shape
    k = weight.shape[-1]
    out = mx.broadcast_to(bias.astype(x.dtype), (b, l, d))
    for shift in range(k):
        # tap (k - 1 - shift) multiplies x[t - shift]
        if shift >= l:
            break
        shifted = mx.pad(x[:, : l - shift], [(0, 0), (shift, 0), (0, 0)]) if shift else x
        if seq_idx is not None and shift:
            same = mx.pad(seq_idx[:, shift:] == seq_idx[:, : l - shift], [(0, 0), (shift, 0)], constant_values=False)
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, k - 1 - shift]
    return nn.silu(out)


def conv_step(conv_state, x, weight, bias, mode: str = "auto"):
    """Shift x (b, c) into conv_state (b, c, k); return SiLU(conv) (b, c) and the new state."""
    if use_fused(mode, "conv_step", (conv_state, x, weight, bias)):
        return _metal().conv_step(conv_state, x, weight, bias)
    new_state = mx.concatenate([conv_state[:, :, 1:], x[:, :, None].astype(conv_state.dtype)], axis=-1)
    out = (new_state * weight).sum(-1) + bias
    return nn.silu(out).astype(x.dtype), new_state


# -- attention -----------------------------------------------------------------------------


def window_mask(q_pos: mx.array, k_pos: mx.array, window: int) -> mx.array:
    """Causal sliding-window visibility: key j is visible to query i iff i - window <= j <= i."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = diff >= 0
    if window >= 0:
        visible = visible & (diff <= window)
    return visible


def attention(q, k, v, window: int, seq_idx=None, mode: str = "auto"):
    """Causal windowed attention over (b, h, l, d) (MLX's layout); packed mode passes seq_idx (b, l).

    mx.fast.scaled_dot_product_attention has no window argument, so the window is an explicit
    boolean mask (exact); a plain causal layer uses the built-in "causal" mask."""
    l, d = q.shape[2], q.shape[3]
    scale = d**-0.5
    if seq_idx is None and (window < 0 or window >= l - 1):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    pos = mx.arange(l)
    visible = window_mask(pos, pos, window)  # (l, l)
    if seq_idx is not None:
        visible = visible & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (b, l, l)
        visible = visible[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)


def attention_cached(q, k, v, visible, mode: str = "auto"):
    """Queries against cached + new keys: q (b,h,l,d), k/v (b,h,S,d), visible (b,l,S) bool."""
    scale = q.shape[-1] ** -0.5
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible[:, None])


def attention_step(q, k_cache, v_cache, visible, mode: str = "auto"):
    """One query per sample against its cache: q (b,h,1,d), caches (b,h,S,d), visible (b,S)."""
    scale = q.shape[-1] ** -0.5
    return mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=scale, mask=visible[:, None, None, :])

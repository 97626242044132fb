"""Whole-model checks of the Metal kernels, for `python -m hnet_metal_kernels.verify` on a Mac (MLX-specific:
the kernels are MLX's, so hnet_torch has no twin).

The kernel package checks each kernel against this package's pure paths; whether a *model* still
computes the same with kernels on, and how fast it runs, is this package's question. These checks
reach verify's report through `kernels.pure_paths()` (PurePaths.model_checks), so the kernel
package never imports the model.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

XL = "hnet_2stage_XL"

SMALL_CONFIG = {
    "arch_layout": ["m1", ["T1m1", ["t1M1"], "m1T1"], "m1"], "d_model": [32, 32, 64], "d_intermediate": [0, 64, 128],
    "ssm_cfg": {"chunk_size": 8, "d_conv": 4, "d_state": 16, "expand": 2},
    "attn_cfg": {"num_heads": [2, 2, 4], "rotary_emb_dim": [8, 8, 16], "window_size": [5, 3, -1]},
}


def random_model(config, dtype=mx.float32, noise: float = 0.02, seed: int = 0):
    """A model with the official init plus noise (routing then makes non-trivial decisions), in `dtype`."""
    from mlx.utils import tree_map

    from .lm import HNetForCausalLM

    mx.random.seed(seed)
    model = HNetForCausalLM(config)
    model.init_weights()
    model.set_dtype(dtype)
    model.update(tree_map(lambda p: p + (noise * mx.random.normal(p.shape)).astype(p.dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def _decode_logits(model, prompt: list[int], steps: list[int], max_seqlen: int | None = None) -> list[np.ndarray]:
    """Prefill `prompt`, then one compiled (or not: model.compile_step) decode step per byte of `steps`."""
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=max_seqlen or len(prompt) + len(steps) + 1)
    out = [model(mx.array([prompt]), cache=cache).logits[:, -1]]
    for b in steps:
        out.append(model.step(mx.array([[b]]), cache).logits[:, -1])
    mx.eval(out)
    return [np.array(o.astype(mx.float32)) for o in out]


def compiled_step() -> dict:
    """Prefill + mx.compile'd decode steps of a small fp32 model, kernels on vs off."""
    from hnet_core.config import HNetConfig

    model = random_model(HNetConfig.from_dict(SMALL_CONFIG))
    model.compile_step = True
    prompt, steps = list(b"The old lighthouse keeper climbed"), list(b" the spiral stairs")
    model.set_kernels("off")
    off = _decode_logits(model, prompt, steps)
    model.set_kernels("on")
    on = _decode_logits(model, prompt, steps)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(on, off))
    return {"max_abs_logit_diff": diff, "steps": len(steps), "result": "ok" if diff <= 1e-4 else f"FAIL: {diff:.3g} > 1e-4"}



def model_timing(quick: bool) -> list[dict]:
    from hnet_core.official import official_config

    model = random_model(official_config(XL), dtype=mx.bfloat16)
    prompt_bytes, decode_steps = (256, 16) if quick else (1024, 64)
    rng = np.random.default_rng(0)
    prompt = rng.integers(32, 127, prompt_bytes).tolist()
    steps = rng.integers(32, 127, decode_steps).tolist()
    size = prompt_bytes + decode_steps + 1
    rows, logits = [], {}
    for mode in ("off", "on", "auto"):
        model.set_kernels(mode)
        # warm-up at the same sizes: compiles the decode step and lets "auto" gate and time every
        # shape class it will meet, so the timed run below measures steady state
        _decode_logits(model, prompt, steps[:2], max_seqlen=size)
        cache = model.allocate_inference_cache(batch_size=1, max_seqlen=size)
        t = time.perf_counter()
        first = model(mx.array([prompt]), cache=cache).logits[:, -1]
        mx.eval(first)
        prefill_s = time.perf_counter() - t
        out = [first]
        t = time.perf_counter()
        for b in steps:
            out.append(model.step(mx.array([[b]]), cache).logits[:, -1])
            mx.eval(out[-1])
        decode_s = time.perf_counter() - t
        logits[mode] = [np.array(o.astype(mx.float32)) for o in out]
        rows.append({"kernels": mode, "prompt_bytes": prompt_bytes, "prefill_bytes_per_s": round(prompt_bytes / prefill_s, 1),
                     "decode_steps": decode_steps, "decode_bytes_per_s": round(decode_steps / decode_s, 2)})
    for row in rows:
        row["max_abs_logit_diff_vs_off"] = max(float(np.abs(a - b).max()) for a, b in zip(logits[row["kernels"]], logits["off"]))
    from hnet_metal_kernels import dispatch

    chosen = dispatch.default_dispatcher().decisions
    rows[-1]["auto_chose_kernel_for"] = sorted(k for k, d in chosen.items() if d.use_kernel)
    rows[-1]["auto_chose_pure_for"] = sorted(k for k, d in chosen.items() if not d.use_kernel)
    return rows


# (verify report section, fn(quick)): run only where Metal is available
CHECKS = (("compiled_step", lambda quick: compiled_step()), ("model_timing", model_timing))

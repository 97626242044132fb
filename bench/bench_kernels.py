"""Custom Metal kernels vs the pure-MLX paths at the shapes of hnet_2stage_XL (batch 1).

    python -m bench.bench_kernels [--seq-bytes 8192] [--repeats 3] [--phases decode prefill train]

For every recurrent op of the model, at each level where it runs, it times
  * decode:  one step (ssm_step, conv_step) of a Mamba layer,
  * prefill: the forward pass over an --seq-bytes prompt (ssd_scan, ema_dechunk),
  * train:   forward + backward of the same (gradients of every float input),
with the pure-MLX path (hnet_mlx, use_kernels="off") and with the Metal kernel
(hnet_metal_kernels, real `mx.fast.metal_kernel`). The kernel side needs Apple silicon: elsewhere
the table says so and only the pure-MLX side is measured (on this Linux box: MLX's CPU build).

Sequence lengths per level assume the routing ratios of the XL models (about 3 bytes per level-1
token and 3 level-1 tokens per level-2 token): level 0 runs --seq-bytes positions, level 1 a third.
Times are the best of --repeats after one warm-up, in ms. Each measurement is appended to
--results (JSON) when it finishes, so an interrupted run resumes where it stopped (--fresh: start
over; results of another device or of other shapes are not reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import mlx.core as mx
import numpy as np

from hnet_core.config import MAMBA_HEADDIM, HNetConfig
from hnet_core.official import official_config

F32 = mx.float32
DEFAULT_RESULTS = "bench/results_kernels.json"
RATIO = 3  # bytes per chunk at each routing stage (XL models' targets)


def xl_shapes(config: HNetConfig, seq_bytes: int) -> list[dict]:
    """One entry per level with Mamba layers: its SSM shapes and sequence length; plus the dechunk
    shapes of each routing stage."""
    levels = []
    length = seq_bytes
    for level, d_model in enumerate(config.d_model):
        ssm = config.ssm_cfg.at(level)
        d_inner = ssm["expand"] * d_model
        levels.append({
            "level": level, "length": length, "d_model": d_model, "heads": d_inner // MAMBA_HEADDIM,
            "headdim": MAMBA_HEADDIM, "d_state": ssm["d_state"], "chunk": ssm["chunk_size"], "d_conv": ssm["d_conv"],
            "conv_dim": d_inner + 2 * ssm["d_state"],
        })
        length = max(1, length // RATIO)
    return levels


def mamba_levels(config: HNetConfig) -> set[int]:
    """Levels with Mamba blocks (layer letters 'm'/'M')."""
    return {level for level in range(config.num_levels) if any(x.lower().startswith("m") for x in config.layers_at(level))}


# -- inputs --------------------------------------------------------------------------------


def inputs_for(op: str, lv: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32))  # noqa: E731
    h, p, n, L = lv["heads"], lv["headdim"], lv["d_state"], lv["length"]
    if op == "ssm_step":
        return (f(1, h, p, n), f(1, h, p), f(1, h), f(h), -mx.array(rng.uniform(1, 16, h).astype(np.float32)),
                f(1, 1, n), f(1, 1, n), f(h))
    if op == "conv_step":
        c, k = lv["conv_dim"], lv["d_conv"]
        return f(1, c, k), f(1, c), f(c, k), f(c)
    if op == "ssd_scan":
        dt = mx.array(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (1, L, h))).astype(np.float32))
        A = -mx.array(rng.uniform(1, 16, h).astype(np.float32))
        return f(1, L, h, p), dt, A, f(1, L, 1, n), f(1, L, 1, n), lv["chunk"], f(h)
    if op == "ema_dechunk":
        # dechunk at stage `level`: chunk outputs of width d_model[level] back onto `length` positions
        mask = rng.random(L) < 1.0 / RATIO
        mask[0] = True
        m = int(mask.sum())
        ci = mx.array(np.maximum(np.cumsum(mask) - 1, 0).astype(np.int32)[None])
        p_ = mx.array(np.clip(rng.random((1, m)), 1e-4, 1 - 1e-4).astype(np.float32))
        return f(1, m, lv["d_model"]), p_, ci
    raise ValueError(op)


def functions(op: str):
    """(pure, kernel) callables with the op's signature."""
    from hnet_mlx import kernels as pure

    import hnet_metal_kernels as hk

    factory = hk.MetalFactory()
    if op == "ssm_step":
        return (lambda *a: pure.ssm_step(*a, mode="off"), lambda *a: hk.ssm_step(*a, factory=factory))
    if op == "conv_step":
        return (lambda *a: pure.conv_step(*a, mode="off"), lambda *a: hk.conv_step(*a, factory=factory))
    if op == "ssd_scan":
        return (lambda x, dt, A, B, C, Q, D: pure.ssd_scan(x, dt, A, B, C, Q, D, mode="off"),
                lambda x, dt, A, B, C, Q, D: hk.ssd_scan(x, dt, A, B, C, Q, D, factory=factory))
    if op == "ema_dechunk":
        return (lambda v, p, ci: pure.ema_dechunk(v, p, ci, mode="off"), lambda v, p, ci: hk.ema_dechunk(v, p, ci, factory=factory))
    raise ValueError(op)


def training_step(fn, args):
    """Forward + backward w.r.t. every float array argument (a fixed random cotangent)."""
    float_idx = [i for i, a in enumerate(args) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]

    def loss(*floats):
        full = list(args)
        for i, a in zip(float_idx, floats):
            full[i] = a
        out = fn(*full)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * mx.cos(mx.arange(o.size, dtype=F32).reshape(o.shape))).sum() for o in outs)

    grad = mx.grad(loss, argnums=list(range(len(float_idx))))
    return lambda: grad(*[args[i] for i in float_idx])


def best_ms(run, repeats: int) -> float:
    mx.eval(run())  # warm-up: builds kernels, allocates
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - t0)
    return best * 1000


# -- driver --------------------------------------------------------------------------------

PHASES = {"decode": ("ssm_step", "conv_step"), "prefill": ("ssd_scan", "ema_dechunk"), "train": ("ssd_scan", "ema_dechunk")}


def plan(config: HNetConfig, seq_bytes: int, phases) -> list[dict]:
    levels = xl_shapes(config, seq_bytes)
    mamba = mamba_levels(config)
    rows = []
    for phase in phases:
        for op in PHASES[phase]:
            if op == "ema_dechunk":  # one dechunk per routing stage s: values of level s+1 onto level s
                for s in range(config.num_stages):
                    lv = dict(levels[s])
                    rows.append({"phase": phase, "op": op, "level": s, "lv": lv})
            else:
                for level in sorted(mamba):
                    rows.append({"phase": phase, "op": op, "level": level, "lv": levels[level]})
    return rows


def shape_text(op: str, lv: dict) -> str:
    if op == "ssm_step":
        return f"state (1,{lv['heads']},{lv['headdim']},{lv['d_state']})"
    if op == "conv_step":
        return f"state (1,{lv['conv_dim']},{lv['d_conv']})"
    if op == "ssd_scan":
        return f"x (1,{lv['length']},{lv['heads']},{lv['headdim']}) n={lv['d_state']} Q={lv['chunk']}"
    return f"values (1,~{lv['length'] // RATIO},{lv['d_model']}) -> {lv['length']} positions"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hnet_2stage_XL")
    ap.add_argument("--seq-bytes", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--results", default=DEFAULT_RESULTS)
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    args = ap.parse_args()

    metal = bool(mx.metal.is_available())
    device = f"{platform.machine()} {platform.system()}, MLX {mx.__version__}, default device {mx.default_device()}"
    if metal:
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        device += f", Metal: {info.get('device_name', 'yes')}"
    config = official_config(args.model)
    context = {"device": device, "model": args.model, "seq_bytes": args.seq_bytes, "repeats": args.repeats}

    saved = []
    if os.path.exists(args.results) and not args.fresh:
        with open(args.results) as f:
            data = json.load(f)
        if data.get("context") == context:
            saved = data["rows"]
    done = {(r["phase"], r["op"], r["level"], r["backend"]): r for r in saved}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        tmp = args.results + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"context": context, "rows": list(done.values())}, f, indent=1)
        os.replace(tmp, args.results)

    print(f"# hnet_metal_kernels vs pure MLX, {args.model} shapes, batch 1, {args.seq_bytes}-byte sequences")
    print(f"# {device}; best of {args.repeats}, ms")
    if not metal:
        print("# no Metal here: the kernel column needs Apple silicon; measuring the pure-MLX side only")
    print("| phase | op | level | shape | pure MLX (ms) | Metal kernel (ms) | speedup |")
    print("|---|---|---|---|---|---|---|")
    for row in plan(config, args.seq_bytes, args.phases):
        phase, op, level, lv = row["phase"], row["op"], row["level"], row["lv"]
        pure_fn, kernel_fn = functions(op)
        inputs = inputs_for(op, lv)
        times = {}
        for backend, fn in (("pure", pure_fn), ("kernel", kernel_fn)):
            key = (phase, op, level, backend)
            if backend == "kernel" and not metal:
                continue
            if key not in done:
                run = training_step(fn, inputs) if phase == "train" else (lambda fn=fn: fn(*inputs))
                done[key] = {"phase": phase, "op": op, "level": level, "backend": backend, "ms": best_ms(run, args.repeats)}
                save()
            times[backend] = done[key]["ms"]
        kernel = f"{times['kernel']:.3f}" if "kernel" in times else "needs Apple silicon"
        speedup = f"{times['pure'] / times['kernel']:.2f}x" if "kernel" in times else "-"
        print(f"| {phase} | {op} | {level} | {shape_text(op, lv)} | {times['pure']:.3f} | {kernel} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()

"""Prefill in pieces vs one pass: peak RSS and bytes/s for long prompts, hnet_torch and hnet_mlx.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python -m bench.bench_prefill_pieces \
        --shape bench_2stage_small --sizes 1000 10000 100000 --backends torch mlx

Every row runs in its own subprocess (so ru_maxrss is that row's peak alone): build the model with
random weights (official init, plus noise on the routing q/k so about half the bytes open a chunk,
as in the tests), read a prompt of N bytes of prose either in one forward pass (`one pass`) or in
pieces of --piece bytes extending one growing cache (`pieces`), and report the prefill time and
the process's peak RSS minus its RSS before the prefill (the model and framework are not counted).
A row over --max-rss-gb is stopped by an address-space limit and reported as such. --shape takes
an official config name (hnet_core/configs) or one of the reduced shapes below.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# hnet_2stage_XL's layout (m4 | T1m4 [T27] m4T1 | m4, windows 1023/1023/global) at a width and depth
# a shared 2-core CPU can prefill 100k bytes with in minutes.
SHAPES = {
    "bench_2stage_small": {
        "arch_layout": ["m4", ["T1m4", ["T4"], "m4T1"], "m4"], "d_model": [128, 192, 256],
        "d_intermediate": [0, 512, 768], "vocab_size": 256,
        "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 32, "expand": 2},
        "attn_cfg": {"num_heads": [4, 4, 4], "rotary_emb_dim": [32, 32, 32], "window_size": [1023, 1023, -1]},
        "tie_embeddings": False,
    },
    # The same layout again, tiny (~1M parameters): seconds per 100k bytes, for a quick look at memory.
    "bench_2stage_tiny": {
        "arch_layout": ["m2", ["T1m2", ["T2"], "m2T1"], "m2"], "d_model": [64, 96, 128],
        "d_intermediate": [0, 256, 384], "vocab_size": 256,
        "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 16, "expand": 2},
        "attn_cfg": {"num_heads": [2, 2, 2], "rotary_emb_dim": [16, 16, 16], "window_size": [1023, 1023, -1]},
        "tie_embeddings": False,
    },
}


def prose(n: int) -> bytes:
    here = os.path.dirname(os.path.abspath(__file__))
    corpus = open(os.path.join(here, "..", "README.md"), "rb").read()
    return (corpus * (n // len(corpus) + 1))[:n]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def config_for(shape: str):
    from hnet_core.config import HNetConfig

    if shape in SHAPES:
        return HNetConfig.from_dict(SHAPES[shape])
    from hnet_core import official_config

    return official_config(shape)


def run_torch(shape: str, n: int, piece: int | None) -> tuple[float, dict]:
    import torch

    from hnet_core.tokenizer import encode
    from hnet_torch import HNetForCausalLM

    torch.manual_seed(0)
    model = HNetForCausalLM(config_for(shape))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    ids = torch.tensor([encode(prose(n - 1))])
    before = rss_now()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if piece is None:
            out = model(ids)
            ratio = out.routing[0].boundary_mask.float().mean().item()
        else:
            cache = model.allocate_inference_cache(batch_size=1)
            chunks = 0
            for start in range(0, n, piece):
                out = model(ids[:, start : start + piece], cache=cache)
                chunks += int(out.routing[0].boundary_mask.sum())
            ratio = chunks / n
    return time.perf_counter() - t0, {"rss_before": before, "boundary_rate": ratio,
                                      "params": sum(p.numel() for p in model.parameters())}


def run_mlx(shape: str, n: int, piece: int | None) -> tuple[float, dict]:
    import mlx.core as mx
    import numpy as np

    from hnet_core.tokenizer import encode
    from hnet_mlx import HNetForCausalLM
    from hnet_mlx.cache import state_arrays
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = HNetForCausalLM(config_for(shape))
    model.init_weights()
    noisy = {k: v + 0.3 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())
             if "q_proj" in k or "k_proj" in k}
    model.load_weights(list(noisy.items()), strict=False)
    mx.eval(model.parameters())
    ids = mx.array([encode(prose(n - 1))], dtype=mx.int32)
    before = rss_now()
    t0 = time.perf_counter()
    if piece is None:
        out = model(ids)
        mx.eval(out.logits)
        ratio = float(np.array(out.routing[0].boundary_mask).mean())
    else:
        cache = model.allocate_inference_cache(batch_size=1)
        chunks = 0
        for start in range(0, n, piece):
            out = model(ids[:, start : start + piece], cache=cache)
            mx.eval(out.logits, state_arrays(cache.backbone))
            chunks += int(np.array(out.routing[0].boundary_mask).sum())
        ratio = chunks / n
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return time.perf_counter() - t0, {"rss_before": before, "boundary_rate": ratio, "params": params}


def child(args) -> None:
    limit = int(args.max_rss_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fn = run_torch if args.backend == "torch" else run_mlx
    try:
        seconds, info = fn(args.shape, args.n, args.piece or None)
    except (MemoryError, RuntimeError) as e:  # torch and MLX report a failed allocation as RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        print(json.dumps({"error": f"out of memory (address space capped at {args.max_rss_gb:g} GB)"}))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, **info}))


def main() -> None:
    from hnet_core.engine import DEFAULT_PREFILL_STEP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench_2stage_small")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--backends", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    p.add_argument("--piece", type=int, default=DEFAULT_PREFILL_STEP, help="Bytes per piece (the default prefill_step_size).")
    p.add_argument("--max-rss-gb", type=float, default=4.0, help="Address-space cap per row (one pass over 100k bytes "
                   "needs far more: its attention masks and scores grow with the square of the length).")
    p.add_argument("--timeout", type=float, default=900, help="Seconds per row before it is reported as too slow.")
    p.add_argument("--modes", nargs="+", default=["one-pass", "pieces"], choices=["one-pass", "pieces"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"shape {args.shape}; pieces of {args.piece} bytes; LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; "
          f"cap {args.max_rss_gb} GB address space per row")
    print(f"| backend | prompt bytes | mode | prefill s | bytes/s | peak RSS - RSS before (MB) | boundary rate |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for backend in args.backends:
        for n in args.sizes:
            for piece in [m for mode, m in (("one-pass", 0), ("pieces", args.piece)) if mode in args.modes]:
                mode = "one pass" if piece == 0 else f"pieces of {args.piece}"
                cmd = [sys.executable, "-m", "bench.bench_prefill_pieces", "--child", "--backend", backend, "--n", str(n),
                       "--piece", str(piece), "--shape", args.shape, "--max-rss-gb", str(args.max_rss_gb)]
                env = dict(os.environ)
                if backend == "torch":  # the preloaded BLAS is for MLX's CPU build; torch brings its own
                    env.pop("LD_PRELOAD", None)
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env,
                                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    why = (done.stderr.strip().splitlines() or [""])[-1][:70]
                    row = json.loads(lines[-1]) if lines else {"error": f"died (exit {done.returncode}) {why}".strip()}
                except subprocess.TimeoutExpired:
                    row = {"error": f"not finished in {args.timeout:.0f} s"}
                if "error" in row:
                    print(f"| {backend} | {n} | {mode} | - | - | {row['error']} | - |", flush=True)
                    continue
                grown = (row["peak_rss"] - row["rss_before"]) / 1e6
                print(f"| {backend} | {n} | {mode} | {row['seconds']:.2f} | {n / row['seconds']:.0f} | {grown:.0f} | "
                      f"{row['boundary_rate']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""What mx.compile buys in hnet_mlx's decode step, on this machine (MLX CPU build on Linux).

    python -m bench.bench_mlx_compile [--configs 1stage 2stage 3stage] [--batch 1 4] [--steps 64]

For each small test config (tests/conftest.py shapes, random weights with routing noise so both
boundary decisions occur) and batch size, it decodes --steps bytes (teacher-forced, after a
warm-up that includes tracing) with the four step variants: fused/split x compiled/uncompiled,
and prints ms per step. Interleaved repeats (best of --repeats) damp the noise of a shared machine.
These numbers describe the MLX CPU path on Linux, not Apple silicon.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mlx.core as mx
import numpy as np

from hnet_core.tokenizer import encode
from tests.conftest import SMALL_CONFIGS, TEXT, random_torch_model
from tests.mlx_helpers import mlx_from_torch

VARIANTS = [("fused", True), ("fused", False), ("split", True), ("split", False)]


def decode_ms(model, batch: int, steps: int, mode: str, compiled: bool) -> float:
    model.step_mode, model.compile_step = mode, compiled
    ids = np.array([encode(TEXT[i * 7 : i * 7 + 120]) for i in range(batch)], dtype=np.int32)
    prompt = 16
    cache = model.allocate_inference_cache(batch_size=batch, max_seqlen=prompt + steps + 8)
    model(mx.array(ids[:, :prompt]), cache=cache)
    for t in range(prompt, prompt + 4):  # warm-up (traces the compiled functions)
        np.array(model.step(mx.array(ids[:, t : t + 1]), cache).logits)
    t0 = time.perf_counter()
    for t in range(prompt + 4, prompt + 4 + steps):
        np.array(model.step(mx.array(ids[:, t : t + 1]), cache).logits)  # the host needs the logits each byte
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=sorted(SMALL_CONFIGS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"hnet_mlx decode step, MLX {mx.__version__} on {platform.machine()} CPU ({os.cpu_count()} cores), "
          f"ms per step (best of {args.repeats}); not Apple silicon")
    print("| config | batch | fused compiled | fused eager | split compiled | split eager | compile gain (fused) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        model = mlx_from_torch(random_torch_model(SMALL_CONFIGS[name]()))
        for batch in args.batch:
            best = {v: float("inf") for v in VARIANTS}
            for _ in range(args.repeats):
                for mode, compiled in VARIANTS:
                    best[mode, compiled] = min(best[mode, compiled], decode_ms(model, batch, args.steps, mode, compiled))
            cells = " | ".join(f"{best[v]:.2f}" for v in VARIANTS)
            print(f"| {name} | {batch} | {cells} | {best['fused', False] / best['fused', True]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

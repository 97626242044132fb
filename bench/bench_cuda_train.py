"""Training throughput of hnet_torch: the eager pure path with masked SDPA vs FlexAttention +
compiled SSD scan + torch.compile'd blocks, side by side in one run (one subprocess per variant,
so each peak memory is its own).

    python -m bench.bench_cuda_train                      # CUDA: hnet_2stage_XL, 8 x 8192 bytes, bf16 autocast
    python -m bench.bench_cuda_train --shape small --device cpu --seq-len 1024 --batch 4 --steps 4

Variants (`--kernels` / `--compile` of `hnet train`):
  eager     set_kernels("off"): pure scan, shifted-sum conv, SDPA with an (L x L) mask; no compile;
  compiled  scan=compiled, attention=flex (CUDA) or sdpa (CPU: torch 2.13 has no FlexAttention
            backward there), every Isotropic stack and routing module torch.compile'd.
On CPU the script also times a forward-only prefill of the same batch with masked SDPA vs
FlexAttention (which runs forward on CPU). Timed steps follow `--warmup` steps (compilation and
recompiles happen there); bytes/s = batch x seq_len x steps / time. Peak memory: CUDA
max_memory_allocated, CPU the process's peak RSS. Prints a markdown table; `--json` writes rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from .train_common import REPO, SMALL, repo_text, run_timed, seeded_backend


def run_variant(args) -> dict:
    import torch

    from hnet_core.config import HNetConfig
    from hnet_core.data import BatchSampler, frame
    from hnet_core.train_config import TrainConfig
    from hnet_torch.train import compile_counters

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = (HNetConfig.from_json(os.path.join(REPO, "hnet_core", "configs", "hnet_2stage_XL.json"))
           if args.shape == "xl" else HNetConfig.from_dict(SMALL))
    attention = "flex" if device.type == "cuda" else "sdpa"
    kernels = "off" if args.variant == "eager" else f"scan=compiled,conv=pure,attention={attention}"
    if args.phase == "prefill":
        kernels = "off" if args.variant == "eager" else "scan=pure,conv=pure,attention=flex"
    tc = TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.seq_len, lr=1e-3, warmup=10, dtype=args.dtype)
    backend = seeded_backend(cfg, device, tc, kernels=kernels,
                             compile="on" if args.variant == "compiled" and args.phase == "train" else "off")
    model = backend.model
    limit = max(4 * args.batch * args.seq_len, 1 << 20)
    sampler = BatchSampler(frame([repo_text(limit)[:limit]]), args.seq_len, args.batch, seed=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one():
        batch = sampler.next_batch()
        if args.phase == "train":
            return backend.train_step([batch], 1e-3).loss
        ids, _, cu = backend._tensors(batch)
        with torch.no_grad(), backend._autocast():
            return float(backend.model(ids, cu_seqlens=cu).logits.float().mean())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, warm = run_timed(one, args.warmup, sync)
    counts_warm = compile_counters()
    losses, seconds = run_timed(one, args.steps, sync)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    counts = compile_counters()
    return {"variant": args.variant, "phase": args.phase, "kernels": kernels, "device": device.type,
            "shape": args.shape, "params": sum(p.numel() for p in model.parameters()), "batch": args.batch,
            "seq_len": args.seq_len, "dtype": args.dtype, "steps": args.steps, "warmup_s": warm,
            "step_s": seconds / args.steps, "bytes_per_second": args.batch * args.seq_len * args.steps / seconds,
            "peak_gib": peak / 2**30, "last_loss": losses[-1], "graphs": counts["graphs"],
            "graphs_after_warmup": counts["graphs"] - counts_warm["graphs"], "graph_breaks": counts["graph_breaks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--shape", choices=["xl", "small"], default=None, help="default: xl on CUDA, small on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 8192 on CUDA, 1024 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 4 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 autocast (default: bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--phases", default=None, help="comma list of train,prefill (default: train on CUDA, both on CPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--variant", choices=["eager", "compiled"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["train", "prefill"], default="train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.shape = args.shape or ("xl" if cuda else "small")
    args.seq_len = args.seq_len or (8192 if cuda else 1024)
    args.batch = args.batch or (8 if cuda else 4)
    args.steps = args.steps or (10 if cuda else 4)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.variant is not None:  # child process: one variant, one JSON line
        print("ROW " + json.dumps(run_variant(args)), flush=True)
        return
    rows = []
    phases = args.phases.split(",") if args.phases else (["train"] if cuda else ["train", "prefill"])
    for phase in phases:
        for variant in ("eager", "compiled"):
            cmd = [sys.executable, "-m", "bench.bench_cuda_train", "--variant", variant, "--phase", phase,
                   "--device", args.device, "--shape", args.shape, "--seq-len", str(args.seq_len),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                print(f"{phase}/{variant} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(lines[-1][4:]))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {args.shape} shape, packed batch {args.batch} x {args.seq_len} bytes, "
          f"{args.dtype}, {args.steps} timed steps after {args.warmup} warm-up")
    print("| phase | variant | kernels | bytes/s | step (s) | warm-up (s) | peak GiB | graphs (new after warm-up) |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["phase"]: r["bytes_per_second"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        ratio = f" ({r['bytes_per_second'] / base[r['phase']]:.2f}x)" if r["phase"] in base else ""
        print(f"| {r['phase']} | {r['variant']} | `{r['kernels']}` | {r['bytes_per_second']:,.0f}{ratio} | "
              f"{r['step_s']:.3f} | {r['warmup_s']:.1f} | {r['peak_gib']:.2f} | {r['graphs']} ({r['graphs_after_warmup']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

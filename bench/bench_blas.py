"""MLX on Linux with and without the OpenBLAS preload (hnet_mlx/blas.py), beside torch, in one run.

    flock /tmp/heavy.lock python -m bench.bench_blas

Three configurations, each in its own fresh process (the BLAS is chosen once per process):
MLX with HNET_MLX_BLAS=off (the reference BLAS bundled with mlx[cpu]), MLX as `import hnet_mlx`
sets it up (OpenBLAS loaded before MLX), and torch. Each measures, on the same random fp32 weights
of a modest 2-stage model (--d-model): fp32 matmul GFLOP/s (--matmul n x n), prefill bytes/s (one
forward over --prefill-bytes), decode bytes/s (--decode-bytes steps after a 64-byte prompt) and
training bytes/s (median optimizer step of the trainer backend, batch x seq_len bytes). Prints a
markdown table. Linux CPU numbers; on macOS MLX uses Accelerate and the preload does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(d: int) -> dict:
    return {"arch_layout": ["m2", ["m2", ["T4"], "m2"], "m2"], "d_model": [d, d + d // 2, 2 * d],
            "d_intermediate": [0, 0, 5 * d], "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 64, "expand": 2},
            "attn_cfg": {"num_heads": [2, 3, 4], "rotary_emb_dim": [16, 16, 16], "window_size": [-1, -1, -1]}}


def text_bytes(n: int) -> bytes:
    base = (b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            b"must be in want of a wife. However little known the feelings or views of such a man may be. ")
    return (base * (n // len(base) + 1))[:n]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def worker_mlx(args) -> dict:
    import hnet_mlx  # first: loads OpenBLAS before MLX unless HNET_MLX_BLAS=off
    import mlx.core as mx

    from hnet_core.config import HNetConfig
    from hnet_core.data import BatchSampler, frame
    from hnet_core.tokenizer import encode
    from hnet_core.train_config import TrainConfig
    from hnet_mlx.train import MLXBackend

    a, b = mx.random.normal((args.matmul, args.matmul)), mx.random.normal((args.matmul, args.matmul))
    mx.eval(a @ b)
    gflops = 2 * args.matmul**3 / best(lambda: mx.eval(a @ b), 3) / 1e9
    model = hnet_mlx.load_pretrained(args.weights)
    ids = mx.array([encode(text_bytes(args.prefill_bytes))])
    mx.eval(model(ids[:, :64]).logits)
    prefill = ids.shape[1] / best(lambda: mx.eval(model(ids).logits), 2)

    def decode():
        cache = model.allocate_inference_cache(batch_size=1)
        prompt = mx.array([encode(text_bytes(64))])
        mx.eval(model(prompt, cache=cache).logits)
        t = time.perf_counter()
        for byte in text_bytes(args.decode_bytes):
            mx.eval(model.step(mx.array([[byte]]), cache).logits)
        return args.decode_bytes / (time.perf_counter() - t)

    decode()
    decode_bps = decode()
    tc = TrainConfig(steps=100, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, warmup=5)
    sampler = BatchSampler(frame([text_bytes(1 << 18)]), args.seq_len, args.batch_size, seed=0)
    train_model = hnet_mlx.load_pretrained(args.weights)
    backend = MLXBackend(train_model, tc)
    backend.train_step([sampler.next_batch()], 1e-3)
    steps = sorted(best(lambda: backend.train_step([sampler.next_batch()], 1e-3), 1) for _ in range(args.train_steps))
    train = args.batch_size * args.seq_len / steps[len(steps) // 2]
    return {"name": "MLX " + mx.__version__, "blas": hnet_mlx.blas.status, "gflops": gflops, "prefill": prefill,
            "decode": decode_bps, "train": train}


def worker_torch(args) -> dict:
    import torch

    from hnet_core.data import BatchSampler, frame
    from hnet_core.tokenizer import encode
    from hnet_core.train_config import TrainConfig
    from hnet_torch import load_pretrained
    from hnet_torch.train import TorchBackend

    a, b = torch.randn(args.matmul, args.matmul), torch.randn(args.matmul, args.matmul)
    a @ b
    gflops = 2 * args.matmul**3 / best(lambda: a @ b, 3) / 1e9
    model = load_pretrained(args.weights)
    ids = torch.tensor([encode(text_bytes(args.prefill_bytes))])
    with torch.inference_mode():
        model(ids[:, :64])
        prefill = ids.shape[1] / best(lambda: model(ids), 2)

        def decode():
            cache = model.allocate_inference_cache(batch_size=1)
            model(torch.tensor([encode(text_bytes(64))]), cache=cache)
            t = time.perf_counter()
            for byte in text_bytes(args.decode_bytes):
                model.step(torch.tensor([[byte]]), cache).logits.numpy()
            return args.decode_bytes / (time.perf_counter() - t)

        decode()
        decode_bps = decode()
    tc = TrainConfig(steps=100, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, warmup=5)
    sampler = BatchSampler(frame([text_bytes(1 << 18)]), args.seq_len, args.batch_size, seed=0)
    backend = TorchBackend(load_pretrained(args.weights).train(), tc, torch.device("cpu"))
    backend.train_step([sampler.next_batch()], 1e-3)
    steps = sorted(best(lambda: backend.train_step([sampler.next_batch()], 1e-3), 1) for _ in range(args.train_steps))
    train = args.batch_size * args.seq_len / steps[len(steps) // 2]
    return {"name": f"torch {torch.__version__} ({torch.get_num_threads()} threads)", "blas": "torch's bundled",
            "gflops": gflops, "prefill": prefill, "decode": decode_bps, "train": train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--matmul", type=int, default=1024)
    ap.add_argument("--prefill-bytes", type=int, default=4096)
    ap.add_argument("--decode-bytes", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps((worker_mlx if args.worker == "mlx" else worker_torch)(args)), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model")
        code = ("import sys, json, torch; from hnet_core.config import HNetConfig; from hnet_torch import HNetForCausalLM, "
                "save_pretrained; torch.manual_seed(0); m = HNetForCausalLM(HNetConfig.from_dict(json.loads(sys.argv[1]))); "
                "m.init_weights(); save_pretrained(m, sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, json.dumps(bench_config(args.d_model)), weights], check=True)
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "weights")]
        rows = []
        for worker, env in [("mlx", {"HNET_MLX_BLAS": "off"}), ("mlx", {}), ("torch", {})]:
            environment = {k: v for k, v in os.environ.items() if k not in ("HNET_MLX_BLAS", "LD_PRELOAD")}
            out = subprocess.run([sys.executable, "-m", "bench.bench_blas", "--worker", worker, "--weights", weights,
                                  *passthrough], env={**environment, **env}, cwd=REPO, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {rows[-1]['name']} / {rows[-1]['blas']}", file=sys.stderr, flush=True)
    print(f"\nmodel: {json.dumps(bench_config(args.d_model))}")
    print(f"matmul {args.matmul}x{args.matmul} fp32; prefill {args.prefill_bytes} bytes; decode {args.decode_bytes} bytes "
          f"after 64; training batch {args.batch_size} x {args.seq_len} bytes (median of {args.train_steps} steps)\n")
    print("| framework | BLAS | matmul GFLOP/s | prefill bytes/s | decode bytes/s | training bytes/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        blas = r["blas"].split(",")[0] if r["name"].startswith("MLX") else "torch's bundled (MKL/OpenBLAS)"
        print(f"| {r['name']} | {blas} | {r['gflops']:.1f} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['train']:.0f} |")


if __name__ == "__main__":
    main()

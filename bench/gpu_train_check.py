"""The PyTorch trainer on a CUDA GPU: CPU/GPU agreement, fp32 vs bf16 autocast speed, exact resume, the CLI.

    python -m bench.gpu_train_check [--out DIR] [--steps 30]

Needs a CUDA GPU (prints a notice and exits 0 without one). Corpus: the repository's own .py and
.md files concatenated (nothing to download). Checks, in one process:
  1. the same 3 optimizer steps on CPU and on CUDA in fp32 (same init, same batches): losses and
     weights agree;
  2. training speed of a small and a medium 2-stage config in fp32 and with bf16 autocast
     (`--dtype bfloat16`), bytes/s over timed steps after warm-up; whether the fused kernels
     (mamba_ssm, causal_conv1d, flash_attn) were importable, i.e. which path ran;
  3. exact resume on CUDA: 12 steps straight vs 6 + resume + 6;
  4. `python -m hnet_torch.train --device cuda --dtype bfloat16` end to end, then `hnet eval`.
Writes DIR/gpu_train_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

import torch

from hnet_core.config import HNetConfig
from hnet_core.data import BatchSampler, frame
from hnet_core.train_config import TrainConfig

from .train_common import REPO, SMALL, repo_text, run_timed, seeded_backend

MEDIUM = {
    "arch_layout": ["m4", ["T1m4", ["T8"], "m4T1"], "m4"], "d_model": [512, 768, 1024], "d_intermediate": [0, 2048, 2816],
    "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 64, "expand": 2},
    "attn_cfg": {"num_heads": [8, 12, 16], "rotary_emb_dim": [32, 48, 64], "window_size": [1023, 1023, -1]},
}


def corpus(directory: str) -> str:
    path = os.path.join(directory, "corpus.txt")
    with open(path, "wb") as f:
        f.write(repo_text(2_000_000))
    return path


def check_cpu_vs_cuda(text: bytes) -> dict:
    tc = TrainConfig(steps=100, batch_size=4, seq_len=512, lr=2e-3, warmup=2)
    out = {}
    for device in ("cpu", "cuda"):
        backend = seeded_backend(HNetConfig.from_dict(SMALL), device, tc)
        sampler = BatchSampler(frame([text]), 512, 4, seed=0)
        losses = [backend.train_step([sampler.next_batch()], tc.lr_at(i)).loss for i in range(3)]
        out[device] = (losses, {k: v.detach().float().cpu() for k, v in backend.model.state_dict().items()})
    weight_diff = max(float((out["cpu"][1][k] - out["cuda"][1][k]).abs().max()) for k in out["cpu"][1])
    loss_diff = max(abs(a - b) for a, b in zip(out["cpu"][0], out["cuda"][0]))
    return {"losses_cpu": out["cpu"][0], "losses_cuda": out["cuda"][0], "max_loss_diff": loss_diff,
            "max_weight_diff": weight_diff}


def speed(config: dict, name: str, dtype: str, text: bytes, batch: int, seq_len: int, steps: int) -> dict:
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq_len, lr=1e-3, warmup=10, dtype=dtype)
    backend = seeded_backend(HNetConfig.from_dict(config), "cuda", tc)
    sampler = BatchSampler(frame([text]), seq_len, batch, seed=0)
    params = sum(p.numel() for p in backend.model.parameters())
    torch.cuda.reset_peak_memory_stats()

    def step():
        return backend.train_step([sampler.next_batch()], 1e-3).loss

    warm_losses, _ = run_timed(step, 3, torch.cuda.synchronize)
    timed_losses, seconds = run_timed(step, steps, torch.cuda.synchronize)
    losses = warm_losses + timed_losses
    return {"config": name, "params": params, "dtype": dtype, "batch": batch, "seq_len": seq_len, "steps": steps,
            "step_s": seconds / steps, "bytes_per_second": batch * seq_len * steps / seconds,
            "first_loss": losses[0], "last_loss": losses[-1], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def check_resume(directory: str, data: str) -> dict:
    from hnet_torch import load_pretrained
    from hnet_torch.train import train

    cfg = os.path.join(directory, "small.json")
    HNetConfig.from_dict(SMALL).to_json(cfg)
    out = {}
    for dtype in ("float32", "bfloat16"):
        tc = TrainConfig(steps=12, batch_size=4, seq_len=512, lr=2e-3, warmup=2, save_every=6, eval_every=6,
                         val_fraction=0.01, dtype=dtype, log_every=1)
        a, b = os.path.join(directory, f"straight_{dtype}"), os.path.join(directory, f"split_{dtype}")
        train(cfg, None, data, a, tc, device="cuda", show_progress=False)
        train(cfg, None, data, b, tc, device="cuda", stop_at=6, show_progress=False)
        train(None, None, data, b, tc, resume="latest", device="cuda", show_progress=False)
        wa, wb = load_pretrained(os.path.join(a, "model")).state_dict(), load_pretrained(os.path.join(b, "model")).state_dict()
        out[dtype] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return out


def check_cli(directory: str, data: str) -> dict:
    cfg = os.path.join(directory, "small.json")
    run = os.path.join(directory, "cli_run")
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "hnet_torch.train", "--config", cfg, "--data", data, "--out", run, "--steps", "40",
           "--batch-size", "8", "--seq-len", "1024", "--device", "cuda", "--dtype", "bfloat16", "--save-every", "20",
           "--eval-every", "20", "--log-every", "10"]
    train = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ev = subprocess.run([sys.executable, "-m", "hnet_core.cli", "eval", "--backend", "torch", "--device", "cuda",
                         "--model", os.path.join(run, "model"), "--data", data, "--max-bytes", "50000", "--json"],
                        capture_output=True, text=True, env=env)
    report = json.loads(ev.stdout) if ev.returncode == 0 else None
    return {"train_rc": train.returncode, "train_tail": (train.stdout + train.stderr)[-800:], "eval_rc": ev.returncode,
            "eval": report, "eval_err": ev.stderr[-800:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "runs", "gpu_check")))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check")
        return
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    data = corpus(work)
    with open(data, "rb") as f:
        text = f.read()
    fused = {name: importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d", "flash_attn")}
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "fused_kernels_importable": fused}
    print(json.dumps(result), flush=True)
    result["cpu_vs_cuda"] = check_cpu_vs_cuda(text)
    print("cpu vs cuda:", result["cpu_vs_cuda"], flush=True)
    rows = []
    for name, cfg, batch, seq in (("small", SMALL, 8, 2048), ("medium", MEDIUM, 4, 4096)):
        for dtype in ("float32", "bfloat16"):
            rows.append(speed(cfg, name, dtype, text, batch, seq, args.steps))
            print(rows[-1], flush=True)
    result["speed"] = rows
    result["resume_max_weight_diff"] = check_resume(work, data)
    print("resume:", result["resume_max_weight_diff"], flush=True)
    result["cli"] = check_cli(work, data)
    print("cli:", {k: v for k, v in result["cli"].items() if k != "train_tail"}, flush=True)
    with open(os.path.join(args.out, "gpu_train_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['device']}, torch {result['torch']}, fused kernels importable: {fused}")
    print("| config | params | dtype | batch x bytes | step (ms) | bytes/s | loss first -> last | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['batch']} x {r['seq_len']} | "
              f"{1000 * r['step_s']:.1f} | {r['bytes_per_second']:,.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()

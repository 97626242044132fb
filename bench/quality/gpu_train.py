"""Train the bundled model's recipe on one CUDA GPU inside a fixed time budget, and bring back what ships.

Made for the lent device machine (bench/quality/README.md, "Training on a GPU"): no network, PyTorch
but not this package installed, the working tree plus carried paths at most 64 MiB on the way there,
and at most 8 files of 16 MiB each on the way back.

    python -m bench.quality.gpu_train stage                  # here: training text as .xz in runs/quality/gpu_data
    python -m bench.quality.gpu_train run --budget 480      # there, carrying runs/quality/gpu_data; writes $OUT
    python -m bench.quality.gpu_train unpack FILES runs/gpu  # here: FILES = the returned folder -> a run directory
    python -m bench.quality.ship --run runs/gpu --notes bench/quality/bundled_notes.md

`run` first trains a short probe to measure bytes per second on that machine (pure PyTorch kernels,
no torch.compile: the fused-kernel packages have no wheels there and a compile costs minutes of the
budget), then plans the number of steps that fits what is left, so that the WSD schedule's decay ends
inside the budget, and trains them with `hnet train` in bfloat16 mixed precision. `--time-limit`
guards the plan; a run it stops still returns its last checkpoint's weights. What comes back:
config.json, the final weights as float16 safetensors split into pieces under 16 MiB, the run's
metrics.jsonl and train_config.json, train.log and summary.json (device, steps, bytes, bytes/s).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

GPU_DATA = os.path.join(REPO, "runs", "quality", "gpu_data")
CONFIG = os.path.join(HERE, "configs", "hnet_2stage_gpu.json")
PIECE_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB
PIECE_PREFIX = "model.safetensors.part"
PROBE_STEPS = 30
# Flags shared by the probe and the real run (the batch shape decides the throughput being probed).
TRAIN_FLAGS = ["--lr", "2e-3", "--schedule", "wsd", "--decay-fraction", "0.2", "--alpha", "0.03",
               "--lr-multipliers", "2,1.5,1", "--val-fraction", "0.01", "--eval-bytes", "262144",
               "--kernels", "off", "--compile", "off", "--keep-last", "1"]


def stage(train_dir: str, dst: str) -> None:
    """Compress the prepared training text (quality.py prepare) file by file; the trainer reads .xz."""
    if not os.path.isdir(train_dir):
        raise SystemExit(f"{train_dir} does not exist; run `python -m bench.quality.quality prepare` first")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in sorted(os.listdir(train_dir)):
        with open(os.path.join(train_dir, name), "rb") as f, lzma.open(os.path.join(tmp, name + ".xz"), "wb", preset=6) as g:
            shutil.copyfileobj(f, g, 2**20)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    size = sum(os.path.getsize(os.path.join(dst, n)) for n in os.listdir(dst))
    print(f"wrote {dst}: {size / 2**20:.1f} MiB (carry it: runs/quality/gpu_data)")


def hnet_train(args: list[str], log) -> int:
    """`hnet train` from the source tree (the package is not installed on the device machine)."""
    cmd = [sys.executable, "-c", "import sys; from hnet_core.cli import main; sys.argv[0] = 'hnet'; main()", "train", *args]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    return proc.wait()


def measured_rate(run: str) -> float:
    """Bytes per second of the probe's last logged window (after the first window's warm-up)."""
    from hnet_core.metrics import read_metrics

    train = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"]
    if len(train) < 2:
        raise SystemExit(f"the probe logged {len(train)} windows; it needs 2 to measure a rate")
    return train[-1]["bytes_per_second"]


def plan_steps(rate: float, seconds: float, bytes_per_step: int, margin: float = 0.85) -> int:
    """Steps that fit `seconds` at `rate` bytes/s, keeping (1 - margin) for evaluations and saving."""
    return max(int(rate * seconds * margin / bytes_per_step), 1)


def split_file(path: str, out_dir: str, piece_bytes: int = PIECE_BYTES) -> list[str]:
    names = []
    with open(path, "rb") as f:
        while chunk := f.read(piece_bytes):
            name = f"{PIECE_PREFIX}{len(names)}"
            with open(os.path.join(out_dir, name), "wb") as g:
                g.write(chunk)
            names.append(name)
    return names


def export_weights(run: str, out_dir: str, piece_bytes: int = PIECE_BYTES) -> dict:
    """The finished model (or the last checkpoint of a stopped run) as float16 pieces + config.json."""
    import torch

    from hnet_core import checkpoint as ckpt
    from hnet_torch import load_pretrained, save_pretrained

    final = os.path.join(run, ckpt.FINAL_MODEL)
    source = final if os.path.isdir(final) else ckpt.latest_checkpoint(run)
    if source is None:
        raise SystemExit(f"{run} holds no model and no checkpoint")
    model = load_pretrained(source).float()
    tmp = os.path.join(out_dir, "fp16.tmp")
    save_pretrained(model.to(torch.float16), tmp, force=True)
    pieces = split_file(os.path.join(tmp, "model.safetensors"), out_dir, piece_bytes)
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(out_dir, "config.json"))
    shutil.rmtree(tmp)
    return {"weights_from": os.path.relpath(source, run), "pieces": pieces}


def run(args: argparse.Namespace) -> None:
    import torch

    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "budget_s": args.budget, "batch_size": args.batch_size, "seq_len": args.seq_len}
    shape = ["--config", args.config, "--data", args.data, "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--device", device, "--dtype", args.dtype, *TRAIN_FLAGS]
    with open(os.path.join(args.out, "train.log"), "w") as log:
        probe = os.path.join(args.work, "probe")
        shutil.rmtree(probe, ignore_errors=True)
        rc = hnet_train([*shape, "--out", probe, "--steps", str(args.probe_steps), "--warmup", "10",
                         "--log-every", str(max(args.probe_steps // 3, 1)), "--eval-every", "1000000",
                         "--save-every", "1000000"], log)
        if rc != 0:
            raise SystemExit(f"the probe failed (exit {rc}); see {args.out}/train.log")
        rate = measured_rate(probe)
        left = args.budget - (time.time() - start) - args.reserve
        if left < 30:
            raise SystemExit(f"the probe left {left:.0f} s of the {args.budget:.0f} s budget; raise --budget or lower --probe-steps")
        steps = plan_steps(rate, left, args.batch_size * args.seq_len)
        summary.update(probe_bytes_per_second=rate, planned_steps=steps, planned_seconds=left)
        print(f"probe: {rate:,.0f} bytes/s; planning {steps} steps for {left:.0f} s", flush=True)
        main_run = os.path.join(args.work, "run")
        shutil.rmtree(main_run, ignore_errors=True)
        train_start = time.time()
        rc = hnet_train([*shape, "--out", main_run, "--steps", str(steps), "--warmup", str(min(500, steps // 10 + 1)),
                         "--log-every", "50", "--eval-every", str(max(steps // 8, 1)),
                         "--save-every", str(max(steps // 4, 1)), "--time-limit", str(max(left, 1))], log)
        summary.update(train_exit=rc, train_wall_s=time.time() - train_start)
    from hnet_core import checkpoint as ckpt
    from hnet_core.metrics import read_metrics

    records = read_metrics(os.path.join(main_run, "metrics.jsonl"))
    last = ckpt.latest_checkpoint(main_run)
    step = ckpt.read_state(last)["step"] if last else 0
    summary.update(steps=step, bytes_seen=step * args.batch_size * args.seq_len,
                   bytes_per_second=step * args.batch_size * args.seq_len / max(summary["train_wall_s"], 1e-9),
                   last_eval=next((r for r in reversed(records) if r["kind"] == "eval"), None))
    summary.update(export_weights(main_run, args.out))
    for name in ("metrics.jsonl", "train_config.json"):
        shutil.copy(os.path.join(main_run, name), os.path.join(args.out, name))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


def unpack(files: str, dst: str) -> None:
    """The returned folder -> a run directory (model/, metrics.jsonl, train_config.json) for ship.py."""
    from hnet_torch import load_pretrained, save_pretrained

    pieces = sorted((n for n in os.listdir(files) if n.startswith(PIECE_PREFIX)), key=lambda n: int(n[len(PIECE_PREFIX):]))
    if not pieces:
        raise SystemExit(f"{files} holds no {PIECE_PREFIX}* files")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    raw = os.path.join(tmp, "raw")
    os.makedirs(raw)
    with open(os.path.join(raw, "model.safetensors"), "wb") as g:
        for name in pieces:
            with open(os.path.join(files, name), "rb") as f:
                shutil.copyfileobj(f, g)
    shutil.copy(os.path.join(files, "config.json"), os.path.join(raw, "config.json"))
    save_pretrained(load_pretrained(raw), os.path.join(tmp, "model"), force=True)  # adds the tokenizer files
    shutil.rmtree(raw)
    for name in ("metrics.jsonl", "train_config.json", "summary.json", "train.log"):
        if os.path.exists(os.path.join(files, name)):
            shutil.copy(os.path.join(files, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    print(f"wrote {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="compress the prepared training text for the trip to the device machine")
    s.add_argument("--train", default=os.path.join(REPO, "runs", "quality", "data", "train"))
    s.add_argument("--out", default=GPU_DATA)
    r = sub.add_parser("run", help="probe, plan and train inside --budget seconds; results in --out")
    r.add_argument("--budget", type=float, default=480, help="seconds for everything this command does")
    r.add_argument("--reserve", type=float, default=45, help="seconds kept for exporting and copying back")
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    r.add_argument("--work", default="/tmp/hnet_gpu_train", help="run directories (not brought back)")
    r.add_argument("--data", default=GPU_DATA)
    r.add_argument("--config", default=CONFIG)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seq-len", type=int, default=2048)
    r.add_argument("--probe-steps", type=int, default=PROBE_STEPS)
    r.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    r.add_argument("--device", default=None, help="default: cuda when available (cpu only to test this script)")
    u = sub.add_parser("unpack", help="rebuild a run directory from the returned files")
    u.add_argument("files")
    u.add_argument("dst")
    args = ap.parse_args()
    if args.command == "stage":
        stage(args.train, args.out)
    elif args.command == "run":
        run(args)
    else:
        unpack(args.files, args.dst)


if __name__ == "__main__":
    main()

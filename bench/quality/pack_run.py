"""Pack a training run's latest checkpoint small enough to carry to another session or machine.

    python -m bench.quality.pack_run runs/bundled runs/bundled_packed

Not for git: the repository holds no checkpoints (tests/test_repository.py fails on a tracked file over
2 MB outside the bundled model and the fixtures). The packed directory is itself a run directory
(train_config.json, metrics.jsonl and one checkpoint), so training continues with the trainer's own resume:

    cp -r runs/bundled_packed runs/bundled
    hnet train --config bench/quality/configs/hnet_2stage.json --data runs/quality/data/train \
        --out runs/bundled --resume [...the run's flags...]

Weights stay float32 (resuming must not round them); AdamW's two moment estimates are stored as
bfloat16, which halves the file and is why a packed resume is close to, not bit-identical with,
an unpacked one (torch's Optimizer.load_state_dict casts them back to the parameters' float32).
"""

from __future__ import annotations

import argparse
import os
import shutil



def pack(run: str, dst: str) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    from hnet_core import checkpoint as ckpt

    src = ckpt.latest_checkpoint(run)
    if src is None:
        raise SystemExit(f"no checkpoint in {run}")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    step_dir = os.path.join(tmp, "checkpoints", os.path.basename(src))
    os.makedirs(step_dir)
    for name in ("train_config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(run, name), os.path.join(tmp, name))
    for name in os.listdir(src):
        if name != ckpt.OPTIMIZER_NAME:
            shutil.copy(os.path.join(src, name), os.path.join(step_dir, name))
    state = load_file(os.path.join(src, ckpt.OPTIMIZER_NAME))
    small = {k: (v.to(torch.bfloat16) if k.endswith((".exp_avg", ".exp_avg_sq")) else v) for k, v in state.items()}
    save_file(small, os.path.join(step_dir, ckpt.OPTIMIZER_NAME))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return os.path.join(dst, "checkpoints", os.path.basename(src))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (what hnet train --out wrote)")
    parser.add_argument("dst", help="packed run directory to write")
    args = parser.parse_args()
    path = pack(args.run, args.dst)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.dst) for f in fs)
    print(f"packed {path}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

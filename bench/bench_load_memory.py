"""Peak memory and time of `hnet convert torch-to-mlx` (and back) and of torch `load_pretrained`,
against the size of what they produce, on a random-weights `.pt` in the official format.

    python -m bench.bench_load_memory --shape hnet_1stage_L --work /tmp/mem    # a 1.36 GB bf16 .pt
    python -m bench.bench_load_memory --quick                                   # the tests' small shape

Each operation runs in a process of its own; what it costs is its peak resident memory (VmHWM)
minus the peak of the same process doing only its imports, so neither this script nor the
libraries' own footprint counts. Ratios: convert against the output directory's weights, load
against the model's weights in their dtype. The test (tests/test_streaming_memory.py) holds each
ratio to its bound on the small shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Big enough that one copy of the weights (~125 MB in bf16) stands well above the noise of a
# process's own allocations, small enough to write, convert and load in seconds.
SMALL_SHAPE = {
    "arch_layout": ["m2", ["T4"], "m2"], "d_model": [512, 1024], "d_intermediate": [0, 2816],
    "ssm_cfg": {"chunk_size": 64, "d_conv": 4, "d_state": 64, "expand": 2},
    "attn_cfg": {"num_heads": [8, 8], "rotary_emb_dim": [32, 32], "window_size": [511, -1]},
}

_PEAK = ("def _peak():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n"
         "            return int(line.split()[1]) * 1024\n")

# name -> (imports, the operation; it may set `produced`, the bytes it is measured against). The
# imports build the model once without weights (meta device; MLX is lazy) because that imports
# modules on first use: a fixed cost the same for any size, not part of what loading holds.
_MLX = ("from hnet_core.config import HNetConfig\nfrom hnet_mlx.lm import HNetForCausalLM\n"
        "HNetForCausalLM(HNetConfig.from_json(CFG))\n")
OPERATIONS = {
    "convert": (_MLX + "from hnet_mlx.convert import torch_to_mlx",
                "s = torch_to_mlx(PT, OUT + '/mlx', config=CFG, force=True)\nproduced = s.disk_bytes"),
    "convert -q": (_MLX + "from hnet_mlx.convert import torch_to_mlx",
                   "s = torch_to_mlx(PT, OUT + '/mlx_q', config=CFG, quantize=True, force=True)\nproduced = s.disk_bytes"),
    "mlx-to-torch": (_MLX + "from hnet_mlx.convert import mlx_to_torch",
                     "s = mlx_to_torch(OUT + '/mlx', OUT + '/torch', force=True)\nproduced = s.disk_bytes"),
    "torch load": ("import torch\nfrom hnet_core.config import HNetConfig\nfrom hnet_torch import load_pretrained\n"
                   "from hnet_torch.lm import HNetForCausalLM\n"
                   "with torch.device('meta'):\n    HNetForCausalLM(HNetConfig.from_json(CFG))",
                   "m = load_pretrained(PT, config=CFG, dtype=DTYPE)\n"
                   "produced = sum(t.numel() * t.element_size() for t in {id(t): t for t in m.state_dict().values()}.values())"),
}


def write_random_pt(config: dict, path: str, dtype: str = "bfloat16", seed: int = 0) -> int:
    """A `.pt` of random weights in the official layout (torch.save of a state dict); returns its size."""
    import torch

    from hnet_core.config import HNetConfig
    from hnet_core.official import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    state = {name: (0.02 * torch.randn(shape, generator=generator)).to(getattr(torch, dtype))
             for name, shape in expected_shapes(HNetConfig.from_dict(config)).items()}
    torch.save(state, path)
    return os.path.getsize(path)


def measure(operation: str, pt: str, config: str, out: str, dtype: str = "bfloat16", code_dir: str = ROOT) -> dict:
    """{peak: bytes above the import-only baseline, seconds, produced: bytes, ratio} of one operation,
    run with the project checkout at `code_dir`."""
    imports, run = OPERATIONS[operation]
    setup = f"import json, time\n{_PEAK}PT, CFG, OUT, DTYPE = {pt!r}, {config!r}, {out!r}, {dtype!r}\n{imports}\n"
    key = (setup, code_dir)
    if key not in _baselines:
        _baselines[key] = _child(setup, "produced = 0", code_dir)["peak"]
    result = _child(setup, run, code_dir)
    peak = max(0, result["peak"] - _baselines[key])
    return {"operation": operation, "peak": peak, "seconds": result["seconds"], "produced": result["produced"],
            "ratio": peak / result["produced"]}


_baselines: dict[tuple[str, str], int] = {}  # the import-only peak, once per set of imports


def _child(setup: str, body: str, code_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = (setup + "start = time.perf_counter()\n" + body +
            "\nprint(json.dumps({'peak': _peak(), 'seconds': time.perf_counter() - start, 'produced': produced}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800,
                          cwd=code_dir)  # "-c" puts the working directory first on sys.path
    if done.returncode != 0:
        raise RuntimeError(f"failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help="an official model name (random weights of its shape)")
    parser.add_argument("--quick", action="store_true", help="the tests' small shape (~125 MB in bf16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--work", default=None, help="directory for the .pt and the outputs (removed afterwards)")
    parser.add_argument("--operations", default=",".join(OPERATIONS), help="comma-separated subset of: "
                        + ", ".join(OPERATIONS))
    parser.add_argument("--code", default=ROOT, help="run the operations with the checkout in this directory "
                        "(e.g. `git archive` of an older commit, to compare before and after)")
    args = parser.parse_args()
    if args.shape:
        from hnet_core.official import official_config

        config = official_config(args.shape).to_dict()
    else:
        config = SMALL_SHAPE
    work = tempfile.mkdtemp(prefix="hnet-mem-", dir=args.work)
    try:
        pt, cfg = os.path.join(work, "model.pt"), os.path.join(work, "config.json")
        with open(cfg, "w", encoding="utf-8") as f:
            json.dump(config, f)
        size = write_random_pt(config, pt, args.dtype)
        print(f"{args.shape or 'small shape'}: {size / 1e9:.2f} GB {args.dtype} .pt")
        print(f"{'operation':<14} {'peak above imports':>19} {'output / weights':>17} {'ratio':>6} {'time':>8}")
        for operation in args.operations.split(","):
            r = measure(operation, pt, cfg, work, args.dtype, os.path.abspath(args.code))
            print(f"{operation:<14} {r['peak'] / 1e9:>16.2f} GB {r['produced'] / 1e9:>14.2f} GB "
                  f"{r['ratio']:>6.2f} {r['seconds']:>7.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

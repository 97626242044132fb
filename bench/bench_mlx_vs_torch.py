"""MLX vs torch on this CPU, side by side in one run: prefill and decode bytes/s and peak memory.

    python -m bench.bench_mlx_vs_torch --models hnet_1stage_L hnet_2stage_XL --dtypes float32 bfloat16 float16

Each (framework, shape, dtype) runs in its own process (bench_torch.py or bench_mlx.py, same random
weights from bench_torch.build, same prompt text and protocol), so frameworks never share a process
and each row's peak memory is that process's peak resident set (os.wait4). MLX runs with OpenBLAS
preloaded when libopenblas0-pthread is installed (the mlx[cpu] wheel's bundled reference BLAS is
about 19x slower for fp32 matmul); the table says which. MLX's CPU half-precision matmul is slow,
so MLX half-precision prefill uses --half-prefill-bytes. Finished measurements are kept in
--results and skipped on a rerun (--fresh starts over). Linux CPU numbers, not Apple silicon.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def run_child(cmd: list[str], env: dict) -> int:
    """Run to completion; return the child's peak resident memory in bytes."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {' '.join(cmd)}")
    return usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hnet_1stage_L", "hnet_2stage_XL"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--prefill-bytes", type=int, default=1024)
    ap.add_argument("--half-prefill-bytes", type=int, default=256, help="MLX fp16/bf16 prefill length")
    ap.add_argument("--decode-bytes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(HERE, "results_mlx_vs_torch.json"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    results = {} if args.fresh or not os.path.exists(args.results) else json.load(open(args.results))
    work = tempfile.mkdtemp(prefix="hnet_bench_")
    weights = os.path.join(tempfile.gettempdir(), "hnet_bench_weights")
    blas = "OpenBLAS" if os.path.exists(OPENBLAS) else "reference BLAS (mlx[cpu] wheel)"
    for model in args.models:
        for dtype in args.dtypes:
            for fw in ("torch", "mlx"):
                key = f"{model}/{dtype}/{fw}"
                if key in results or (fw == "torch" and dtype == "float16"):
                    continue  # torch's CPU fp16 matmul is not a path anyone uses; bf16 is
                half = dtype != "float32"
                prefill = args.half_prefill_bytes if (fw == "mlx" and half) else args.prefill_bytes
                out = os.path.join(work, key.replace("/", "_") + ".json")
                common = ["--model", model, "--dtypes", dtype, "--prefill-bytes", str(prefill),
                          "--decode-bytes", str(args.decode_bytes), "--repeats", str(args.repeats),
                          "--results", out, "--fresh"]
                env = dict(os.environ)
                if fw == "torch":
                    cmd = [sys.executable, "-m", "bench.bench_torch", *common]
                else:
                    cmd = [sys.executable, "-m", "bench.bench_mlx", *common, "--step-modes", "split",
                           "--weights-dir", weights]
                    if os.path.exists(OPENBLAS):
                        env["LD_PRELOAD"] = OPENBLAS
                print(f"== {key}", flush=True)
                peak = run_child(cmd, env)
                raw = json.load(open(out))
                pre = next(v for k, v in raw.items() if k.endswith("/prefill"))
                dec = next(v for k, v in raw.items() if "/decode" in k)
                results[key] = {"prefill_bytes": pre["bytes"], "prefill_bps": pre["bytes_per_s"],
                                "decode_bps": dec["bytes_per_s"], "peak_rss": peak,
                                "boundary_rate": dec["boundary_rate"]}
                tmp = args.results + ".tmp"
                json.dump(results, open(tmp, "w"), indent=1)
                os.replace(tmp, args.results)
    print(f"\nMLX ({blas}, split decode step) vs torch (eager) on this CPU, {os.cpu_count()} cores; random weights of "
          "the official shapes; peak = the process's peak resident memory. Linux CPU path, not Apple silicon.")
    print("| shape | dtype | MLX prefill B/s | torch prefill B/s | MLX decode B/s | torch decode B/s | MLX peak GB | torch peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for dtype in args.dtypes:
            m, t = results.get(f"{model}/{dtype}/mlx"), results.get(f"{model}/{dtype}/torch")
            if not m:
                continue
            tp = f"{t['prefill_bps']:.1f}" if t else "-"
            td = f"{t['decode_bps']:.2f}" if t else "-"
            tm = f"{t['peak_rss'] / 1e9:.2f}" if t else "-"
            print(f"| {model} | {dtype} | {m['prefill_bps']:.1f} ({m['prefill_bytes']} B) | {tp} | {m['decode_bps']:.2f} | "
                  f"{td} | {m['peak_rss'] / 1e9:.2f} | {tm} |")


if __name__ == "__main__":
    main()

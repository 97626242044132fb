"""Prefill and decode throughput of hnet_mlx on this machine's CPU, with the same random weights,
prompt and protocol as bench/bench_torch.py (official shapes).

    python -m bench.bench_mlx --model hnet_1stage_L --dtypes float32 float16 bfloat16

The weights come from bench_torch.build (torch RNG, same seed), written once by a torch subprocess
into --weights-dir and converted to MLX on load, so MLX and torch compute with identical weights
and MLX runs in a process without torch. Prefill: one forward over --prefill-bytes of real text
(best of --repeats). Decode: prefill --decode-prompt bytes, then --decode-bytes teacher-forced
steps, each step's logits copied to the host (as generation does). --step-modes compares the
fused and split decode steps (see hnet_mlx/lm.py). Results are appended to --results (JSON) as
each measurement finishes, so an interrupted run resumes; --fresh starts over.

BLAS: the mlx[cpu] Linux wheel links a reference BLAS. Run with
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 (apt-get install libopenblas0-pthread) to
give MLX OpenBLAS; the table states which one was used. These are Linux CPU numbers, not Apple silicon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import mlx.core as mx
import numpy as np

from hnet_core.tokenizer import encode
from hnet_mlx import load_pretrained

from .bench_torch import sample_text  # pure Python: reading the corpus
from .timing import best_time, timed_decode

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def blas_in_use() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    return "OpenBLAS (LD_PRELOAD)" if "openblas" in preload else "reference BLAS bundled with mlx[cpu]"


def torch_weights(name: str, directory: str) -> str:
    """Our torch model directory holding bench_torch.build(name, float32), made once by a subprocess."""
    path = os.path.join(directory, f"{name}_seed0_float32")
    if not os.path.exists(os.path.join(path, "config.json")):
        code = ("import sys, torch; from bench.bench_torch import build; "
                "from hnet_torch import save_pretrained; save_pretrained(build(sys.argv[1], torch.float32), sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, name, path], check=True, cwd=REPO)
    return path


def measure_prefill(model, text: bytes, repeats: int) -> dict:
    ids = mx.array([encode(text)])
    mx.eval(model(ids[:, :64]).logits)  # warm-up

    def prefill():
        out = model(ids)
        mx.eval(out.logits)
        return out

    mx.reset_peak_memory()
    best, out = best_time(prefill, repeats)
    rate = float(out.routing[0].boundary_mask.astype(mx.float32).mean().item())
    return {"bytes": ids.shape[1], "seconds": best, "bytes_per_s": ids.shape[1] / best, "boundary_rate": rate,
            "peak_memory": int(mx.get_peak_memory())}


def measure_decode(model, text: bytes, prompt_bytes: int, steps: int) -> dict:
    ids = np.array([encode(text)], dtype=np.int32)
    mx.reset_peak_memory()
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=prompt_bytes + steps + 8)

    def step(x):  # the logits copied to the host, as generation does (the warm-up steps trace the compiled step)
        out = model.step(x, cache)
        np.array(out.logits.astype(mx.float32))
        return out

    seconds, outs = timed_decode(lambda x: mx.eval(model(mx.array(x), cache=cache).logits), step, ids, prompt_bytes, steps)
    boundaries = sum(int(np.array(out.routing[0].boundary_mask).sum()) for out in outs)
    return {"bytes": steps, "seconds": seconds, "bytes_per_s": steps / seconds, "boundary_rate": boundaries / steps,
            "peak_memory": int(mx.get_peak_memory())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hnet_1stage_L")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--step-modes", nargs="+", default=["split", "fused"])
    ap.add_argument("--eager", action="store_true", help="decode with compile_step=False (to measure mx.compile)")
    ap.add_argument("--prefill-bytes", type=int, default=2048)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-bytes", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "hnet_bench_weights"))
    ap.add_argument("--results", default=os.path.join(HERE, "results_mlx.json"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    results = {}
    if os.path.exists(args.results) and not args.fresh:
        results = json.load(open(args.results))
    text = sample_text(max(args.prefill_bytes, args.decode_prompt + args.decode_bytes + 8))
    blas = blas_in_use()
    for dtype_name in args.dtypes:
        key = f"{args.model}/{dtype_name}/{blas}" + ("/eager" if args.eager else "")
        todo = ([] if args.eager else [("prefill", None)]) + [("decode", m) for m in args.step_modes]
        todo = [(m, s) for m, s in todo if f"{key}/{m}" + (f"/{s}" if s else "") not in results]
        if not todo:
            continue
        model = load_pretrained(torch_weights(args.model, args.weights_dir), dtype=dtype_name)
        for m, step_mode in todo:
            if m == "prefill":
                res = measure_prefill(model, text[: args.prefill_bytes - 1], args.repeats)
            else:
                model.step_mode, model.compile_step = step_mode, not args.eager
                res = measure_decode(model, text, args.decode_prompt, args.decode_bytes)
            name = f"{key}/{m}" + (f"/{step_mode}" if step_mode else "")
            results[name] = res
            tmp = args.results + ".tmp"
            json.dump(results, open(tmp, "w"), indent=1)
            os.replace(tmp, args.results)
            print(f"{name}: {res['bytes_per_s']:.2f} bytes/s, peak {res['peak_memory'] / 1e9:.2f} GB", flush=True)
        del model
    print(f"\nhnet_mlx on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__},"
          f" {blas}), {args.model} shape, bench_torch's random weights; Linux CPU, not Apple silicon")
    print("| dtype | prefill bytes/s | decode bytes/s (" + " / ".join(args.step_modes) + ") | peak memory prefill / decode |"
          " boundary rate (prefill / decode) |")
    print("|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        key = f"{args.model}/{dtype_name}/{blas}" + ("/eager" if args.eager else "")
        p = results.get(f"{args.model}/{dtype_name}/{blas}/prefill")  # prefill has no compiled step
        d = [results.get(f"{key}/decode/{s}") for s in args.step_modes]
        if p and all(d):
            rates = " / ".join(f"{x['bytes_per_s']:.2f}" for x in d)
            print(f"| {dtype_name} | {p['bytes_per_s']:.1f} ({p['bytes']} B) | {rates} | {p['peak_memory'] / 1e9:.2f} / "
                  f"{d[0]['peak_memory'] / 1e9:.2f} GB | {p['boundary_rate']:.2f} / {d[0]['boundary_rate']:.2f} |")


if __name__ == "__main__":
    main()

"""ONNX runtime memory against decode speed, one process per configuration: how much the sessions'
weight pre-packing costs in resident memory and what it buys in bytes/s (issue 24, item 3).

    python -m bench.bench_onnx_memory EXPORT_DIR [--quantized INT8_DIR INT4_DIR] [--steps 200]

For the float32 export EXPORT_DIR, each pre-packing policy of OnnxHNet (`prepack=None`: the
default, `False`: none, `True`: all, or only the step graphs), and the same for every quantized export, a fresh process loads the
model (OnnxHNet + warm_up(1): every session it will use, created and run once), prefills `--prompt`
bytes of English (best of 3), takes a first decode step, then teacher-forces `--steps` more bytes at
batch 1. It reports load time, prefill and decode bytes/s, the first step, the resident set after
load and at its peak (ru_maxrss), split into file-backed pages (the mapped weights file) and
anonymous memory (onnxruntime's own copies: pre-packed weights, buffers), and the weights file's
size. Run it on an otherwise idle machine; numbers from a shared one vary by tens of percent.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "..", "shared", "data", "austen.txt.xz")
PROMPT = 512
# --policies: OnnxHNet's prepack argument (None: its default; a tuple: the graphs that pre-pack)
POLICIES = {"default": None, "off": False, "all": True, "step": ("step", "step_cond"),
            "step+extend": ("step", "step_cond", "extend")}


def _status() -> dict[str, int]:
    """The process's resident set now, bytes: total, file-backed, anonymous (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssFile", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(path: str, prepack: str, steps: int, prompt: int = PROMPT) -> dict:
    import numpy as np

    from export.runtime import OnnxHNet

    with lzma.open(TEXT, "rb") as f:
        data = f.read(200_000)[100_000 : 100_000 + prompt + steps + 1]
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)[None]
    started = time.perf_counter()
    model = OnnxHNet(path, provider="cpu", prepack=POLICIES[prepack])
    model.warm_up(1)
    load = time.perf_counter() - started
    after_load = _status()
    prefill = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.prefill(ids[:, :prompt], capacity=prompt + steps + 1)
        prefill = min(prefill, time.perf_counter() - t0)
    t0 = time.perf_counter()
    model.step(ids[:, prompt : prompt + 1])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in range(prompt + 1, prompt + 1 + steps):
        model.step(ids[:, t : t + 1])
    decode = time.perf_counter() - t0
    end = _status()
    weights = os.path.getsize(os.path.join(path, model.meta["weights"]["file"]))
    return {"load_s": load, "prefill_Bps": prompt / prefill, "first_step_ms": first * 1e3,
            "decode_Bps": steps / decode, "weights_MB": weights / 1e6,
            "rss_load_MB": after_load["VmRSS"] / 1e6, "rss_end_MB": end["VmRSS"] / 1e6,
            "file_end_MB": end["RssFile"] / 1e6, "anon_end_MB": end["RssAnon"] / 1e6,
            "peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            "sessions": sorted(model.sessions)}


def run(path: str, prepack: str, steps: int, prompt: int) -> dict:
    job = json.dumps({"path": path, "prepack": prepack, "steps": steps, "prompt": prompt})
    out = subprocess.run([sys.executable, "-m", "bench.bench_onnx_memory", "--worker", job],
                         cwd=os.path.join(HERE, ".."), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", nargs="?")
    parser.add_argument("--quantized", nargs="*", default=[], help="quantized exports of the same model")
    parser.add_argument("--policies", nargs="*", default=["default", "off", "step", "all"], choices=sorted(POLICIES),
                        help="pre-packing policies to run on every export")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=PROMPT, help="prompt bytes before decoding")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["path"], job["prepack"], job["steps"], job["prompt"])))
        return
    rows = [(os.path.basename(d.rstrip("/")), p, run(d, p, args.steps, args.prompt))
            for d in [args.export, *args.quantized] for p in args.policies]
    print("| export | prepack | weights MB | load s | prefill B/s | first step ms | decode B/s | RSS after load MB "
          "| peak RSS MB | of which file / anon at end MB | peak / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, policy, r in rows:
        print(f"| {name} | {policy} | {r['weights_MB']:.0f} | {r['load_s']:.1f} | {r['prefill_Bps']:.0f} | "
              f"{r['first_step_ms']:.1f} | {r['decode_Bps']:.1f} | {r['rss_load_MB']:.0f} | {r['peak_MB']:.0f} | "
              f"{r['file_end_MB']:.0f} / {r['anon_end_MB']:.0f} | {r['peak_MB'] / r['weights_MB']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

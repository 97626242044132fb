"""Decode speed per backend against the per-byte limits of this machine (issue 24).

    python -m bench.bench_decode --quick          # the bundled model and a ~30M 2-stage model
    python -m bench.bench_decode --rows 1stage_100M hnet_1stage_L --backends torch onnx

Every (model, backend, batch) runs in its own process, twice: on an idle machine and while a
busy-loop child this script starts (and stops) keeps one core busy. Each process loads the model
and prefills 16 bytes (load time: both, so first-call costs such as kernel compilation count
there), prefills `--prompt` bytes of real text per sample (prefill B/s), takes one first step
(first-step time), then teacher-forces `--steps` more bytes, never a repeated byte (decode B/s),
and reports the boundaries each routing stage took and its peak RSS (VmHWM).

The limits beside each row come from the same run. A byte reads the outer level's weights every
step but an inner level's only when the step reaches it (a boundary at every stage above it; at
batch B, when some sample does), so

    weight bytes per step = sum over levels of (bytes of the level's weights) x (share of steps reaching it)
    bandwidth limit (B/s) = batch x measured read bandwidth / weight bytes per step
    compute limit (B/s)   = measured matmul rate / (2 x weights used per byte)

with the read bandwidth of a pass over 256 MB and the rate of a 1024^3 float32 matmul measured
first (numpy, in this process). "reached" is the decode rate over the smaller limit. Attention
caches (a few KB per byte at these lengths) and per-step overheads are outside the model: they
are exactly what "reached" shows. Random-weight rows are written once under --work.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import time

import numpy as np

from hnet_core.config import HNetConfig
from hnet_core.official import expected_shapes, official_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUNDLED = os.path.join(ROOT, "hnet_core", "demo_model")
CORPUS = os.path.join(ROOT, "..", "shared", "data", "austen.txt.xz")
BACKENDS = ("torch", "torch-int8", "mlx", "onnx")  # torch-int8: hnet_torch.quantize (int8 Linear weights)
WEIGHT_BYTES = {"torch-int8": 1}  # bytes per weight read for the bandwidth limit (else float32's 4; the
# few layers torch-int8 keeps float are counted at 1 too, so its limit is slightly optimistic)

# Random-weight rows: small shapes in the official style, and the official shapes.
ROWS: dict[str, dict | str | None] = {
    "bundled": None,
    "2stage_30M": {
        "arch_layout": ["m2", ["m2", ["T6"], "m2"], "m2"], "d_model": [256, 384, 512], "d_intermediate": [0, 0, 1536],
        "vocab_size": 256, "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 64, "expand": 2},
        "attn_cfg": {"num_heads": [4, 6, 8], "rotary_emb_dim": [32, 32, 32], "window_size": [-1, -1, -1]},
    },
    "1stage_100M": {
        "arch_layout": ["m4", ["T10"], "m4"], "d_model": [512, 768], "d_intermediate": [0, 2048],
        "vocab_size": 256, "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2},
        "attn_cfg": {"num_heads": [8, 12], "rotary_emb_dim": [32, 32], "window_size": [-1, -1]},
    },
    "hnet_1stage_L": "hnet_1stage_L",
    "hnet_2stage_XL": "hnet_2stage_XL",  # ~13 GB of memory for fp32 in torch: not for a shared 2-core machine
}
QUICK_ROWS = ("bundled", "2stage_30M")


def sample_rows(batch: int, length: int) -> list[bytes]:
    """`batch` slices of real English text (different places in the book), `length` bytes each."""
    if os.path.exists(CORPUS):
        with lzma.open(CORPUS) as f:
            data = f.read(400_000)
    else:  # a clone without ../shared: the repository's own prose
        data = open(os.path.join(BUNDLED, "MODEL_CARD.md"), "rb").read() * 40
    return [data[10_000 + k * 50_000:][:length] for k in range(batch)]


# -- one measurement, in its own process -------------------------------------------------------


def _open(backend: str, path: str, batch: int):
    """(prefill(ids) -> boundaries per stage, step(ids) -> same, sync) for one backend."""
    if backend in ("torch", "torch-int8"):
        import torch

        from hnet_torch import load_pretrained
        from hnet_torch.quantize import quantize_int8

        torch.set_grad_enabled(False)
        model = load_pretrained(path).eval()
        if backend == "torch-int8":
            model = quantize_int8(model)
        state = {}

        def counts(out):
            return [int(r.boundary_mask.sum()) for r in out.routing]

        def prefill(ids):
            state["cache"] = model.allocate_inference_cache(batch_size=len(ids))
            return counts(model(torch.tensor(ids), cache=state["cache"]))

        return prefill, lambda ids: counts(model.step(torch.tensor(ids), state["cache"]))
    if backend == "mlx":
        import hnet_mlx  # noqa: F401  (loads OpenBLAS before MLX)
        import mlx.core as mx

        from hnet_core.backends import load_model

        # As `hnet generate --backend mlx` loads it: the bundled model (stored in float16) in float32,
        # like the torch and ONNX rows; MLX's float16 matmuls on a CPU are about 2x slower.
        model = load_model("mlx", path).model
        state = {}

        def counts(out):  # one evaluation, as the generation adapter does
            sums = [r.boundary_mask.sum() for r in out.routing]
            mx.eval(out.logits, *sums)
            return [int(n.item()) for n in sums]

        def prefill(ids):
            state["cache"] = model.allocate_inference_cache(batch_size=len(ids))
            return counts(model(mx.array(ids), cache=state["cache"]))

        # numpy ids, as the generation adapter passes them (checked on the host, not with a device sync)
        return prefill, lambda ids: counts(model.step(np.asarray(ids, dtype=np.int32), state["cache"]))
    from export.runtime import OnnxHNet

    model = OnnxHNet(path)
    model.warm_up(batch)  # as `hnet generate` does: the step session is created at load

    def counts(out):
        return [int(np.asarray(r.boundary_mask).sum()) for r in out.routing]

    return (lambda ids: counts(model.prefill(np.asarray(ids, dtype=np.int64))),
            lambda ids: counts(model.step(np.asarray(ids, dtype=np.int64))))


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss over from the parent through fork and exec (here: the bandwidth test's 256 MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def measure(backend: str, path: str, batch: int, prompt: int, steps: int) -> dict:
    rows = sample_rows(batch, prompt + steps + 1)
    t0 = time.perf_counter()
    prefill, step = _open(backend, path, batch)
    prefill([list(r[:16]) for r in rows])  # warm-up: first-call costs (kernel choice, compilation) go to load
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefill([list(r[:prompt]) for r in rows])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step([[r[prompt]] for r in rows])
    first = time.perf_counter() - t0
    reached = None  # per stage: steps in which some sample reached the level below it
    t0 = time.perf_counter()
    for t in range(prompt + 1, prompt + 1 + steps):
        counts = step([[r[t]] for r in rows])
        reached = [0] * len(counts) if reached is None else reached
        reached = [n + (c > 0) for n, c in zip(reached, counts)]
    decode_s = time.perf_counter() - t0
    peak = peak_rss()
    return {"load_s": load, "prefill_Bps": batch * prompt / prefill_s, "first_step_s": first,
            "decode_Bps": batch * steps / decode_s, "step_s": decode_s / steps,
            "reached": [n / steps for n in reached or []], "peak_rss": peak}


# -- the machine's limits ------------------------------------------------------------------------


def machine_limits() -> dict:
    """Read bandwidth (bytes/s) of a pass over 256 MB, and float32 matmul FLOP/s (numpy)."""
    a = np.ones(64 << 20, dtype=np.float32)
    best = min(_timed(a.sum) for _ in range(5))
    m = np.ones((1024, 1024), dtype=np.float32)
    mm = min(_timed(lambda: m @ m) for _ in range(5))
    return {"bandwidth": a.nbytes / best, "matmul": 2 * 1024 ** 3 / mm}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def level_weights(config: HNetConfig, bytes_per_weight: int = 4) -> list[int]:
    """Weight bytes a step reads at each level (the embedding: one row; the LM head: all of it)."""
    out = [0] * config.num_levels
    for name, shape in expected_shapes(config).items():
        n = int(np.prod(shape))
        if name == "embeddings.weight":
            n = shape[1]
        level = min(name.count("main_network."), config.num_levels - 1)
        out[level] += n * bytes_per_weight
    return out


def limits(config: HNetConfig, result: dict, batch: int, machine: dict, bytes_per_weight: int = 4) -> dict:
    weights = level_weights(config, bytes_per_weight)
    share = [1.0, *result["reached"]]  # level 0 every step; level k when stage k fired
    step_bytes = sum(w * s for w, s in zip(weights, share))
    flops_per_step = 2 * step_bytes / bytes_per_weight * batch  # a multiply-add per weight per sample reaching it
    bw = batch * machine["bandwidth"] / step_bytes
    fl = batch * machine["matmul"] / flops_per_step
    return {"weight_MB_per_step": step_bytes / 1e6, "limit_bw_Bps": bw, "limit_flops_Bps": fl,
            "reached_fraction": result["decode_Bps"] / min(bw, fl)}


# -- rows, processes, the table ------------------------------------------------------------------


def model_dir(row: str, backend: str, work: str, log) -> str:
    """The directory `backend` loads for `row` (random weights written once under `work`)."""
    if row == "bundled":
        if backend != "onnx":
            return BUNDLED
        from export.cache import bundled_export

        return bundled_export(log=log)
    base = os.path.join(work, row)
    if not os.path.exists(os.path.join(base, "config.json")):
        log(f"writing random weights for {row} to {base}")
        _run_worker({"make": row, "dir": base}, busy=False)
    if backend != "onnx":
        return base
    onnx_dir = base + "-onnx"
    if not os.path.exists(os.path.join(onnx_dir, "export.json")):
        log(f"exporting {row} to {onnx_dir}")
        _run_worker({"export": base, "dir": onnx_dir}, busy=False)
    return onnx_dir


def make_random(row: str, directory: str) -> None:
    import torch

    from hnet_torch.lm import HNetForCausalLM
    from hnet_torch.loading import save_pretrained

    spec = ROWS[row]
    config = official_config(spec) if isinstance(spec, str) else HNetConfig.from_dict(spec)
    torch.manual_seed(0)
    model = HNetForCausalLM(config)
    with torch.no_grad():  # spread the routing's decisions like a trained model's
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    save_pretrained(model, directory)


def _run_worker(job: dict, busy: bool) -> dict:
    """Run one job in a fresh process (with a bounded busy-loop child beside it when `busy`)."""
    spinner = None
    if busy:  # one core kept busy; it ends by itself after 15 minutes should this script die
        spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 900\n"
                                    "while time.time() < end: pass"])
    try:
        out = subprocess.run([sys.executable, "-m", "bench.bench_decode", "--worker", json.dumps(job)], cwd=ROOT,
                             capture_output=True, text=True, timeout=3600)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise SystemExit(f"worker {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = ["model", "backend", "batch", "load s", "first step ms", "prefill B/s", "decode B/s idle", "busy",
            "busy/idle", "limit B/s (bandwidth)", "limit B/s (matmul)", "reached idle", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        idle, busy = r["idle"], r.get("busy")
        cells = [r["row"], r["backend"], r["batch"], f"{idle['load_s']:.2f}", f"{1e3 * idle['first_step_s']:.1f}",
                 f"{idle['prefill_Bps']:.0f}", f"{idle['decode_Bps']:.0f}",
                 f"{busy['decode_Bps']:.0f}" if busy else "-",
                 f"{busy['decode_Bps'] / idle['decode_Bps']:.2f}" if busy else "-",
                 f"{r['limit_bw_Bps']:.0f}", f"{r['limit_flops_Bps']:.0f}", f"{r['reached_fraction']:.2f}",
                 f"{idle['peak_rss'] / 2**20:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only the rows {', '.join(QUICK_ROWS)}")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=None)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--prompt", type=int, default=256, help="prompt bytes per sample")
    parser.add_argument("--steps", type=int, default=200, help="teacher-forced decode steps")
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a busy core")
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "hnet-mlx", "bench"))
    parser.add_argument("--json", default=None, help="also write every measurement here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if "make" in job:
            make_random(job["make"], job["dir"])
            print("{}")
        elif "export" in job:
            from export.exporter import export_onnx

            export_onnx(job["export"], job["dir"])
            print("{}")
        else:
            print(json.dumps(measure(job["backend"], job["path"], job["batch"], job["prompt"], job["steps"])))
        return
    rows = args.rows or (list(QUICK_ROWS) if args.quick else [r for r in ROWS if r != "hnet_2stage_XL"])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    machine = machine_limits()
    log(f"read bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, matmul {machine['matmul'] / 1e9:.0f} GFLOP/s")
    results = []
    for row in rows:
        spec = ROWS[row]
        config = (HNetConfig.from_json(os.path.join(BUNDLED, "config.json")) if spec is None else
                  official_config(spec) if isinstance(spec, str) else HNetConfig.from_dict(spec))
        for backend in args.backends:
            path = model_dir(row, backend, args.work, log)
            for batch in args.batch:
                job = {"backend": backend, "path": path, "batch": batch, "prompt": args.prompt, "steps": args.steps}
                r = {"row": row, "backend": backend, "batch": batch, "idle": _run_worker(job, busy=False)}
                if not args.no_busy:
                    r["busy"] = _run_worker(job, busy=True)
                r.update(limits(config, r["idle"], batch, machine, WEIGHT_BYTES.get(backend, 4)))
                results.append(r)
                log(table([r]).splitlines()[-1])
    print(f"read bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, float32 matmul {machine['matmul'] / 1e9:.0f} GFLOP/s\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

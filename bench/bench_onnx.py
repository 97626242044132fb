"""Prefill and decode throughput of the ONNX export in onnxruntime vs hnet_torch eager on this CPU,
with the same random weights, and the size of the exported files.

    python -m bench.bench_onnx                       # hnet_1stage_L shape + a small 2-stage shape
    python -m bench.bench_onnx --models small_2stage --threads 2

Same protocol as bench/bench_torch.py (whose `build`, `measure_prefill` and `measure_decode` run
the torch side): prefill = one forward over --prefill-bytes of real text, best of --repeats;
decode = prefill --decode-prompt bytes, 4 warm-up steps, then --decode-bytes teacher-forced
steps with the logits brought to the host. onnxruntime decodes with step.onnx ("where": every
level every step) and step_cond.onnx ("cond": inner levels under an ONNX If, skipped when the
byte is no boundary). Each model is exported once into --work (kept, so a rerun resumes), and
every measurement is appended to --results as it finishes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import numpy as np
import torch

from hnet_core.config import HNetConfig
from hnet_core.tokenizer import encode

from . import bench_torch
from .bench_torch import build, measure_decode, measure_prefill, sample_text
from .timing import best_time, timed_decode

HERE = os.path.dirname(os.path.abspath(__file__))

# A small 2-stage H-Net (about 40 M parameters) in the official style: Mamba outside, attention
# inside, sliding windows at the outer levels.
SMALL_2STAGE = {
    "arch_layout": ["m2", ["T1m2", ["T6"], "m2T1"], "m2"], "d_model": [256, 384, 512], "d_intermediate": [0, 1024, 1536],
    "vocab_size": 256, "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 64, "expand": 2},
    "attn_cfg": {"num_heads": [4, 6, 8], "rotary_emb_dim": [32, 32, 32], "window_size": [255, 255, -1]},
    "tie_embeddings": False,
}


def build_model(name: str):
    if name == "small_2stage":
        original = bench_torch.official_config
        bench_torch.official_config = lambda _name: HNetConfig.from_dict(SMALL_2STAGE)  # same init recipe
        try:
            return build(name, torch.float32)
        finally:
            bench_torch.official_config = original
    return build(name, torch.float32)


def export_dir(work: str, name: str, model, max_seqlen: int) -> str:
    from hnet_export.exporter import export_model

    path = os.path.join(work, name)
    meta = os.path.join(path, "export.json")
    if os.path.exists(meta) and json.load(open(meta))["max_seqlen"] == max_seqlen:
        return path
    t0 = time.perf_counter()
    export_model(model, path, max_seqlen=max_seqlen, batch_variants=True, force=True,
                 log=lambda m: print(f"  {m}", flush=True))
    print(f"  exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def onnx_prefill(model, text: bytes, repeats: int) -> dict:
    ids = np.array([encode(text)])
    model.prefill(ids[:, :64])  # warm-up
    best, out = best_time(lambda: model.prefill(ids), repeats)
    rate = float(out.routing[0].boundary_mask.mean())
    return {"bytes": ids.shape[1], "seconds": best, "bytes_per_s": ids.shape[1] / best, "boundary_rate": rate}


def onnx_decode(model, text: bytes, prompt_bytes: int, steps: int) -> dict:
    ids = np.array([encode(text)])
    seconds, outs = timed_decode(lambda x: model.prefill(x, capacity=prompt_bytes + steps + 8), model.step, ids,
                                 prompt_bytes, steps)
    boundaries = sum(int(out.routing[0].boundary_mask.sum()) for out in outs)
    return {"steps": steps, "seconds": seconds, "bytes_per_s": steps / seconds, "boundary_rate": boundaries / steps}


def batch_rows(text: bytes, batch: int, length: int) -> np.ndarray:
    """`batch` rows of real text (BOS + bytes), each from a different offset."""
    step = max(1, (len(text) - length) // batch)
    return np.array([encode(text[b * step : b * step + length - 1]) for b in range(batch)])


@torch.inference_mode()
def torch_decode_batch(model, rows: np.ndarray, prompt_bytes: int, steps: int) -> dict:
    ids = torch.from_numpy(rows)
    cache = model.allocate_inference_cache(batch_size=ids.shape[0], max_seqlen=prompt_bytes + steps + 8)
    seconds, _ = timed_decode(lambda x: model(x, cache=cache), lambda x: model.step(x, cache), ids, prompt_bytes, steps)
    return {"bytes": steps * ids.shape[0], "seconds": seconds, "bytes_per_s": steps * ids.shape[0] / seconds}


def onnx_decode_batch(model, rows: np.ndarray, prompt_bytes: int, steps: int) -> dict:
    seconds, _ = timed_decode(lambda x: model.prefill(x, capacity=prompt_bytes + steps + 8), model.step, rows,
                              prompt_bytes, steps)
    return {"bytes": steps * rows.shape[0], "seconds": seconds, "bytes_per_s": steps * rows.shape[0] / seconds}


def dir_sizes(path: str) -> dict:
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hnet_1stage_L", "small_2stage"])
    ap.add_argument("--prefill-bytes", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-bytes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="batch size of the batched decode measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--work", default=os.path.join(HERE, "..", "runs", "bench_onnx"), help="exports are kept here")
    ap.add_argument("--results", default=os.path.join(HERE, "results_onnx.json"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {} if args.fresh or not os.path.exists(args.results) else json.load(open(args.results))
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}

    def save():
        tmp = args.results + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.results)

    text = sample_text(max(args.prefill_bytes, args.decode_prompt + args.decode_bytes + 8) * (args.batch + 1))
    rows = batch_rows(text, args.batch, args.decode_prompt + args.decode_bytes + 8)
    max_seqlen = max(args.prefill_bytes, args.decode_prompt + args.decode_bytes + 8) + 64
    for name in args.models:
        entry = results.setdefault(name, {})
        keys = ("torch_prefill", "torch_decode", "torch_decode_batch", "onnx_prefill", "onnx_decode_where",
                "onnx_decode_cond", "onnx_decode_batch_where", "onnx_decode_batch_cond", "files")
        todo = [k for k in keys if k not in entry]
        if not todo:
            continue
        print(f"{name}: building random weights", flush=True)
        model = build_model(name)
        entry["parameters"] = sum(p.numel() for p in model.parameters())
        path = export_dir(args.work, name, model, max_seqlen)
        entry["files"] = dir_sizes(path)
        save()
        with torch.inference_mode():
            if "torch_prefill" not in entry:
                entry["torch_prefill"] = measure_prefill(model, text[: args.prefill_bytes - 1], args.repeats)
                save()
            if "torch_decode" not in entry:
                entry["torch_decode"] = measure_decode(model, text, args.decode_prompt, args.decode_bytes)
                save()
            if "torch_decode_batch" not in entry:
                entry["torch_decode_batch"] = torch_decode_batch(model, rows, args.decode_prompt, args.decode_bytes)
                save()
            print(f"  torch done: {entry['torch_prefill']['bytes_per_s']:.0f} / {entry['torch_decode']['bytes_per_s']:.2f} B/s",
                  flush=True)
        del model
        gc.collect()
        from hnet_export import OnnxHNet

        for variant in ("where", "cond"):
            key, batch_key = f"onnx_decode_{variant}", f"onnx_decode_batch_{variant}"
            if key in entry and batch_key in entry and "onnx_prefill" in entry:
                continue
            onnx_model = OnnxHNet(path, provider="cpu", threads=args.threads, step_variant=variant)
            if "onnx_prefill" not in entry:
                entry["onnx_prefill"] = onnx_prefill(onnx_model, text[: args.prefill_bytes - 1], args.repeats)
                save()
            if key not in entry:
                entry[key] = onnx_decode(onnx_model, text, args.decode_prompt, args.decode_bytes)
                save()
            if batch_key not in entry:
                entry[batch_key] = onnx_decode_batch(onnx_model, rows, args.decode_prompt, args.decode_bytes)
                save()
            del onnx_model
            gc.collect()
        print("  onnx done", flush=True)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    m = results["machine"]
    print(f"\nCPU {m['cpu']}, {m['threads']} threads, torch {m['torch']} eager, onnxruntime {m['onnxruntime']}; "
          "float32, random weights")
    print(f"prefill: {args.prefill_bytes} bytes, batch 1 (best of {args.repeats}); decode: {args.decode_bytes} "
          f"teacher-forced steps after a {args.decode_prompt}-byte prompt, batch 1 and batch {args.batch} "
          "(bytes/s counts every sample's bytes)\n")
    print("| model | params | prefill B/s torch | prefill B/s onnx | decode B/s torch | decode B/s onnx where "
          f"| decode B/s onnx cond | batch {args.batch} decode B/s torch / where / cond | stage-0 boundary rate | exported files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, e in results.items():
        if name == "machine" or "onnx_decode_batch_cond" not in e:
            continue
        files = ", ".join(f"{f} {s / 1e6:.1f} MB" for f, s in e["files"].items() if s > 1e5)
        batch = " / ".join(f"{e[k]['bytes_per_s']:.1f}" for k in ("torch_decode_batch", "onnx_decode_batch_where",
                                                                    "onnx_decode_batch_cond"))
        print(f"| {name} | {e['parameters'] / 1e6:.0f} M | {e['torch_prefill']['bytes_per_s']:.0f} "
              f"| {e['onnx_prefill']['bytes_per_s']:.0f} | {e['torch_decode']['bytes_per_s']:.2f} "
              f"| {e['onnx_decode_where']['bytes_per_s']:.2f} | {e['onnx_decode_cond']['bytes_per_s']:.2f} "
              f"| {batch} | {e['onnx_decode_where']['boundary_rate']:.2f} | {files} |")


if __name__ == "__main__":
    main()

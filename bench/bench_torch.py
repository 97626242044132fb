"""Prefill and decode throughput of hnet_torch on this machine's CPU (random weights, official shapes).

    python -m bench.bench_torch --model hnet_1stage_L --dtypes float32 bfloat16

Prefill: one forward over a prompt of --prefill-bytes real text bytes (best of --repeats).
Decode: prefill --decode-prompt bytes, then --decode-bytes steps fed with the real continuation
(teacher forcing keeps the work identical across runs; random weights make greedy output loop).
Results are appended to --results (JSON) as each measurement finishes, so an interrupted run
resumes where it stopped; --fresh starts over. Random weights route about half of the bytes to the
inner network (the trained 1-stage model routes about one in six), which the table reports.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform

import torch

from hnet_core import official_config
from hnet_core.tokenizer import encode
from hnet_torch import HNetForCausalLM

from .timing import best_time, timed_decode

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "canterbury_text4.txt.xz")


def sample_text(n: int) -> bytes:
    if os.path.exists(CORPUS):
        with lzma.open(CORPUS) as f:
            data = f.read(200_000)
    else:  # a clone without ../shared: any real prose will do
        data = open(__file__, "rb").read() * 50
    return data[10_000 : 10_000 + n]


def build(name: str, dtype: torch.dtype, seed: int = 0) -> HNetForCausalLM:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = HNetForCausalLM(official_config(name), dtype=dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.init_weights()
        for name_, p in model.named_parameters():
            if "A_log" in name_:
                p.uniform_(0, 2.7)  # log U[1, 16] like mamba's init
            elif "dt_bias" in name_:
                p.uniform_(-6, -2)
            elif name_.endswith("D") or "norm" in name_:
                p.fill_(1.0)
    return model.eval()


@torch.inference_mode()
def measure_prefill(model, text: bytes, repeats: int) -> dict:
    ids = torch.tensor([encode(text)])
    model(ids[:, :64])  # warm-up
    best, out = best_time(lambda: model(ids), repeats)
    rate = out.routing[0].boundary_mask.float().mean().item()
    return {"bytes": ids.shape[1], "seconds": best, "bytes_per_s": ids.shape[1] / best, "boundary_rate": rate}


@torch.inference_mode()
def measure_decode(model, text: bytes, prompt_bytes: int, steps: int) -> dict:
    ids = torch.tensor([encode(text)])
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=prompt_bytes + steps + 8)
    seconds, outs = timed_decode(lambda x: model(x, cache=cache), lambda x: model.step(x, cache), ids, prompt_bytes, steps)
    boundaries = sum(int(out.routing[0].boundary_mask.sum()) for out in outs)
    return {"bytes": steps, "seconds": seconds, "bytes_per_s": steps / seconds, "boundary_rate": boundaries / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hnet_1stage_L")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prefill-bytes", type=int, default=2048)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-bytes", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--results", default="bench/results_torch.json")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    if os.path.exists(args.results) and not args.fresh:
        results = json.load(open(args.results))
    text = sample_text(max(args.prefill_bytes, args.decode_prompt + args.decode_bytes + 8))
    for dtype_name in args.dtypes:
        key = f"{args.model}/{dtype_name}"
        todo = [m for m in ("prefill", "decode") if f"{key}/{m}" not in results]
        if not todo:
            continue
        model = build(args.model, getattr(torch, dtype_name))
        for m in todo:
            if m == "prefill":
                res = measure_prefill(model, text[: args.prefill_bytes - 1], args.repeats)
            else:
                res = measure_decode(model, text, args.decode_prompt, args.decode_bytes)
            results[f"{key}/{m}"] = res
            tmp = args.results + ".tmp"
            json.dump(results, open(tmp, "w"), indent=1)
            os.replace(tmp, args.results)
            print(f"{key} {m}: {res['bytes_per_s']:.1f} bytes/s", flush=True)
        del model
    print(f"\nhnet_torch on CPU ({platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}),"
          f" {args.model} shape, random weights")
    print(f"| dtype | prefill bytes/s ({args.prefill_bytes} B) | decode bytes/s | boundary rate (prefill / decode) |")
    print("|---|---|---|---|")
    for dtype_name in args.dtypes:
        p = results.get(f"{args.model}/{dtype_name}/prefill")
        d = results.get(f"{args.model}/{dtype_name}/decode")
        if p and d:
            print(f"| {dtype_name} | {p['bytes_per_s']:.1f} | {d['bytes_per_s']:.2f} | {p['boundary_rate']:.2f} / {d['boundary_rate']:.2f} |")


if __name__ == "__main__":
    main()

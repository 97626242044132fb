"""Quantized ONNX exports (int8 / int4 MatMulNBits) against float32 on this CPU: decode speed, peak
memory with and without weights shared between sessions, export time, and quality on real text.

    flock /tmp/heavy.lock python -m bench.bench_onnx_quant                    # everything
    python -m bench.bench_onnx_quant --models small_2stage medium_1stage --skip-quality

Speed: random weights of each shape (bench_torch.build), exported once in float32 (kept under
--work), then quantize_export to int8 and int4 (block size --block-size). Each configuration runs
in its own process (so its peak RSS is its own): load, generate 64 bytes greedily at batch 1
(peak RSS "load + 64 bytes"), then teacher-forced decode of --decode-bytes bytes of English at
batch 1 (the runtime's choice: step_cond) and at batch --batch (step), bytes/s counting every
sample's bytes. torch eager decodes the same text in the parent for the ratio. "private" is the
runtime before sharing: every session loads and pre-packs its own copy of the weights.

Quality: the bundled model (hnet_core/demo_model) exported float32 / int8 / int4, bits per byte over
--quality-bytes of the Brown corpus's held-out tail (bench/quality keeps it out of training) in windows of 1024, and
the share of stage-0 boundary decisions that differ from float32; also int4 with the encoders
quantized too (the default keeps them float) or only the stage-0 one float, to see which
quantization moves the boundaries.
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

from .timing import timed_decode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

DATA = os.environ.get("HNET_DATA", os.path.join(ROOT, "..", "shared", "data"))  # --data sets it for the children
# About 100 M parameters, the official 1-stage layout at a smaller width.
MEDIUM_1STAGE = {
    "arch_layout": ["m4", ["T12"], "m4"], "d_model": [512, 768], "d_intermediate": [0, 2048], "vocab_size": 256,
    "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2},
    "attn_cfg": {"num_heads": [8, 12], "rotary_emb_dim": [32, 48], "window_size": [1023, -1]},
    "tie_embeddings": False,
}
KINDS = ("float32", "int8", "int4")
# (label, kind, share_weights, prepack), None = the runtime's default: the default for each kind, and
# "private" (every session loads and pre-packs its own copy: the runtime before sharing).
CONFIGS = [("float32", "float32", None, None), ("float32 private", "float32", False, True),
           ("float32 no prepack", "float32", None, False), ("int8", "int8", None, None),
           ("int8 private", "int8", False, None), ("int4", "int4", None, None), ("int4 private", "int4", False, None)]


def english(n: int, offset: int = 10_000) -> bytes:
    with lzma.open(os.path.join(DATA, "austen.txt.xz")) as f:
        return f.read(offset + n)[offset:]


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss would carry the parent's peak over fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build_model(name: str):
    import torch

    from hnet_core.config import HNetConfig

    from . import bench_torch
    from .bench_onnx import build_model as build_named

    if name == "medium_1stage":
        original = bench_torch.official_config
        bench_torch.official_config = lambda _name: HNetConfig.from_dict(MEDIUM_1STAGE)
        try:
            return bench_torch.build(name, torch.float32)
        finally:
            bench_torch.official_config = original
    return build_named(name)


def child(argv: list[str]) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    kind = argv[0]
    out: dict = {}
    if kind == "export":  # export name dir max_seqlen
        import torch

        from hnet_export.exporter import export_model

        torch.set_num_threads(2)
        t0 = time.perf_counter()
        model = build_model(argv[1])
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["build_s"] = time.perf_counter() - t0
        result = export_model(model, argv[2], max_seqlen=int(argv[3]), force=True)
        out.update(export_s=result.seconds, files=result.files, peak_rss=peak_rss())
    elif kind == "decode":  # decode dir threads share prepack batch steps
        from hnet_core.sampling import SamplingParams
        from hnet_core.tokenizer import encode
        from hnet_export import OnnxHNet, stream_generate

        path, threads, share, prepack, batch, steps = argv[1], int(argv[2]), argv[3], argv[4], int(argv[5]), int(argv[6])
        t0 = time.perf_counter()
        chosen = {} if share == "auto" else {"share_weights": share == "1"}  # "auto": the runtime's default
        model = OnnxHNet(path, provider="cpu", threads=threads, **chosen,
                         prepack=None if prepack == "auto" else prepack == "1")
        for _ in stream_generate(model, ["The old lighthouse keeper"], max_tokens=64,
                                 sampling=SamplingParams(temperature=0)):
            pass
        out["load_generate_s"] = time.perf_counter() - t0
        out["peak_rss"] = peak_rss()
        prompt = 64
        for b in (1, batch):
            rows = np.array([encode(english(prompt + steps + 8, 10_000 + 5_000 * i)[: prompt + steps + 7]) for i in range(b)])
            seconds, _ = timed_decode(lambda x: model.prefill(x, capacity=prompt + steps + 8), model.step, rows,
                                      prompt, steps)
            out[f"batch{b}_bytes_per_s"] = b * steps / seconds
    print(json.dumps(out), flush=True)


def run_child(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_onnx_quant", "--child", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_decode(name: str, steps: int, batch: int, threads: int) -> dict:
    import torch

    from hnet_core.tokenizer import encode

    torch.set_num_threads(threads)
    model = build_model(name)
    out = {}
    prompt = 64
    with torch.inference_mode():
        for b in (1, batch):
            ids = torch.tensor([encode(english(prompt + steps + 8, 10_000 + 5_000 * i)[: prompt + steps + 7]) for i in range(b)])
            cache = model.allocate_inference_cache(batch_size=b, max_seqlen=prompt + steps + 8)
            seconds, _ = timed_decode(lambda x: model(x, cache=cache), lambda x: model.step(x, cache), ids, prompt, steps)
            out[f"batch{b}_bytes_per_s"] = b * steps / seconds
    return out


def speed(args, results: dict, save) -> None:
    from hnet_export.exporter import quantize_export
    from hnet_export.weights import Quantization

    for name in args.models:
        entry = results.setdefault(name, {})
        base = os.path.join(args.work, name)
        fp32 = os.path.join(base, "float32")
        if "export" not in entry or not os.path.exists(os.path.join(fp32, "export.json")):
            print(f"{name}: exporting float32", flush=True)
            entry["export"] = run_child("export", name, fp32, 1024)
            save()
        for kind in KINDS[1:]:
            if not os.path.exists(os.path.join(base, kind, "export.json")):
                t0 = time.perf_counter()
                result = quantize_export(fp32, os.path.join(base, kind), Quantization(kind, args.block_size), force=True)
                entry[f"quantize_{kind}_s"] = time.perf_counter() - t0
                entry[f"files_{kind}"] = result.files
                save()
        if "torch" not in entry:
            print(f"{name}: torch eager", flush=True)
            entry["torch"] = torch_decode(name, args.decode_bytes, args.batch, args.threads)
            save()
        for label, kind, share, prepack in CONFIGS:
            if label not in entry:
                print(f"{name}: {label}", flush=True)
                entry[label] = run_child("decode", os.path.join(base, kind), args.threads,
                                         "auto" if share is None else int(share),
                                         "auto" if prepack is None else int(prepack), args.batch, args.decode_bytes)
                save()


def bits_per_byte(model, text: bytes, window: int = 1024) -> tuple[float, np.ndarray]:
    from hnet_core.tokenizer import encode

    nll, total, decisions = 0.0, 0, []
    for start in range(0, len(text) - window // 2, window - 1):
        ids = np.array([encode(text[start : start + window - 1])])
        out = model.prefill(ids)
        logits = out.logits[0, :-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum()
        total += ids.shape[1] - 1
        decisions.append(out.routing[0].boundary_mask[0])
    return nll / total / np.log(2), np.concatenate(decisions)


def quality(args, results: dict, save) -> None:
    from hnet_export import OnnxHNet
    from hnet_export.exporter import export_onnx, quantize_export
    from hnet_export.weights import KEEP_FLOAT, Quantization

    base = os.path.join(args.work, "demo_model")
    fp32 = os.path.join(base, "float32")
    if not os.path.exists(os.path.join(fp32, "export.json")):
        export_onnx(os.path.join(ROOT, "hnet_core", "demo_model"), fp32, max_seqlen=1024, force=True)
    # int4's default keeps only the stage-0 encoder float (weights.KEEP_FLOAT_INT4).
    variants = {"int8": Quantization("int8", args.block_size), "int4": Quantization("int4", args.block_size),
                "int4, encoders quantized too": Quantization("int4", args.block_size, keep_float=KEEP_FLOAT),
                "int4, every encoder float": Quantization("int4", args.block_size, keep_float=KEEP_FLOAT + ("encoder.",)),
                "int4 block 128": Quantization("int4", 128)}
    # The Brown corpus's last 300 KB (from a line start), which bench/quality holds out of the bundled
    # model's training data.
    held_out = os.path.join(DATA, "brown_detagged.txt.xz")
    with lzma.open(held_out) as f:
        full = f.read()
    start = full.index(b"\n", len(full) - 300_000) + 1
    text = full[start : start + args.quality_bytes]
    entry = results.setdefault("quality", {"text": f"{os.path.basename(held_out)}, {len(text)} bytes of its held-out tail"})
    ref = None
    for label in ("float32", *variants):
        path = fp32 if label == "float32" else os.path.join(base, label.replace(" ", "_").replace(",", ""))
        if label != "float32" and not os.path.exists(os.path.join(path, "export.json")):
            quantize_export(fp32, path, variants[label], force=True)
        bpb, decisions = bits_per_byte(OnnxHNet(path, provider="cpu", threads=args.threads), text)
        ref = decisions if ref is None else ref
        entry[label] = {"bpb": bpb, "boundary_rate": float(decisions.mean()),
                        "boundaries_differing": float(np.mean(decisions != ref)),
                        "weights_mb": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6}
        save()


def print_tables(results: dict, args) -> None:
    print(f"\n{results['machine']}; decode: {args.decode_bytes} teacher-forced bytes of English after a 64-byte prompt")
    print("\n| model | params | export s / peak GB | torch B/s b1 / b4 | float32 | int8 | int4 | int8 / fp32 b1 | "
          "int4 / fp32 b1 | fp32 / torch b1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        e = results.get(name, {})
        if not all(k in e for k in ("torch", "float32", "int8", "int4")):
            continue
        ex = e["export"]

        def b(k):
            return f"{e[k]['batch1_bytes_per_s']:.1f} / {e[k][f'batch{args.batch}_bytes_per_s']:.1f}"

        f1 = e["float32"]["batch1_bytes_per_s"]
        print(f"| {name} | {ex['parameters'] / 1e6:.0f} M | {ex['export_s']:.0f} / {ex['peak_rss'] / 1e9:.1f} "
              f"| {b('torch')} | {b('float32')} | {b('int8')} | {b('int4')} "
              f"| {e['int8']['batch1_bytes_per_s'] / f1:.2f}x | {e['int4']['batch1_bytes_per_s'] / f1:.2f}x "
              f"| {f1 / e['torch']['batch1_bytes_per_s']:.2f}x |")
    print(f"\n(B/s at batch 1 / batch {args.batch}.) Peak RSS, load + 64 generated bytes (GB), and batch-1 decode B/s:\n")
    print("| model | weights file GB float32 / int8 / int4 | " + " | ".join(c[0] for c in CONFIGS) + " |")
    print("|---|---|" + "---|" * len(CONFIGS))
    for name in args.models:
        e = results.get(name, {})
        if not all(c[0] in e for c in CONFIGS):
            continue
        sizes = [e["export"]["files"].get("weights.onnx.data", 0)] + [e.get(f"files_{k}", {}).get("weights.onnx.data", 0)
                                                                    for k in KINDS[1:]]
        cells = [f"{e[c[0]]['peak_rss'] / 1e9:.2f} ({e[c[0]]['batch1_bytes_per_s']:.1f})" for c in CONFIGS]
        print(f"| {name} | {' / '.join(f'{s / 1e9:.2f}' for s in sizes)} | " + " | ".join(cells) + " |")
    q = results.get("quality")
    if q:
        print(f"\nQuality of the bundled model on {q['text']}:\n")
        print("| export | bits per byte | vs float32 | stage-0 boundary rate | boundary decisions differing | MB on disk |")
        print("|---|---|---|---|---|---|")
        for label, r in q.items():
            if isinstance(r, dict):
                print(f"| {label} | {r['bpb']:.4f} | {r['bpb'] - q['float32']['bpb']:+.4f} | {r['boundary_rate']:.3f} "
                      f"| {r['boundaries_differing']:.4f} | {r['weights_mb']:.1f} |")


def main() -> None:
    global DATA
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hnet_1stage_L", "medium_1stage", "small_2stage"])
    ap.add_argument("--decode-bytes", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--quality-bytes", type=int, default=16_000)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--data", default=DATA, help="directory of the .xz texts (../shared/data of the repository)")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_onnx_quant"))
    ap.add_argument("--results", default=os.path.join(HERE, "results_onnx_quant.json"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    DATA = os.environ["HNET_DATA"] = os.path.abspath(args.data)
    import onnxruntime
    import torch

    results = {} if args.fresh or not os.path.exists(args.results) else json.load(open(args.results))
    results["machine"] = (f"{os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__} eager, "
                          f"onnxruntime {onnxruntime.__version__}, block size {args.block_size}")

    def save():
        with open(args.results + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.results + ".tmp", args.results)

    if not args.skip_quality:
        quality(args, results, save)
    if not args.skip_speed:
        speed(args, results, save)
    print_tables(results, args)


if __name__ == "__main__":
    main()

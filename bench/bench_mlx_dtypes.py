"""Which MLX dtypes pay off on this CPU: prefill and decode of the bundled model in float32,
bfloat16, 8-bit and 4-bit (each converted with `hnet convert torch-to-mlx`).

    python -m bench.bench_mlx_dtypes                  # bundled model, ~2 min
    python -m bench.bench_mlx_dtypes --model DIR      # any torch or MLX model directory / .pt

Decode is teacher-forced on English text (one byte per step, logits copied to the host as
generation does), after a short warm-up; prefill is one forward over --prefill-bytes. On Apple
silicon bf16 and the quantized kernels are the fast paths; this measures what they cost elsewhere.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import hnet_mlx  # first: it gives MLX OpenBLAS before mlx loads its reference BLAS
import hnet_mlx.blas
import mlx.core as mx

from hnet_core.backends import DEMO_MODEL
from hnet_mlx import load_pretrained
from hnet_mlx.convert import torch_to_mlx

from .bench_mlx import measure_decode, measure_prefill
from .bench_torch import sample_text

VARIANTS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
            "8-bit": {"quantize": True, "q_bits": 8}, "4-bit": {"quantize": True, "q_bits": 4}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--prefill-bytes", type=int, default=256)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-bytes", type=int, default=64)
    args = ap.parse_args()
    text = sample_text(args.prefill_bytes + args.decode_prompt + args.decode_bytes + 64)
    print(f"{args.model} on {mx.default_device()}, {hnet_mlx.blas.describe()}")
    print(f"{'dtype':<9} {'prefill B/s':>12} {'decode B/s':>11}")
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants:
            out = os.path.join(work, name)
            torch_to_mlx(args.model, out, **VARIANTS[name])
            model = load_pretrained(out)
            prefill = measure_prefill(model, text[: args.prefill_bytes], repeats=2)
            decode = measure_decode(model, text, args.decode_prompt, args.decode_bytes)
            print(f"{name:<9} {prefill['bytes_per_s']:>12.0f} {decode['bytes_per_s']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()

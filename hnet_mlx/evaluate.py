"""The MLX forward behind `hnet eval --backend mlx`, and `hnet-mlx eval` (MLX-specific command).

    forward = make_forward("runs/a/model")
    logits, routing = forward(ids, mask)   # numpy (B, L) int32 / bool in; numpy out
    hnet-mlx eval --model runs/a/model --data held_out.txt [--max-bytes N] [--json]

hnet_torch/evaluate.py is the torch twin; hnet_core.backends.eval_forward picks one by name. The
command runs the same evaluation as `hnet eval --backend mlx` (hnet_core/evaluate.py: sliding
windows that score every byte once, per-stage compression, throughput); `--json` prints one object
with bits_per_byte, bytes, compression_ratios (outermost stage first) and bytes_per_second.
"""

from __future__ import annotations

import click
import mlx.core as mx
import numpy as np

from hnet_core.evaluate import eval_options, run_eval

from .loading import load


def make_forward(model_path: str, device: str | None = None, dtype: str | None = None):
    """forward(ids (B, L), mask (B, L)) -> (logits (B, L, V) float32, [(boundary_mask, valid) per stage]).
    `device` is accepted for the shared interface; MLX runs on its default device."""
    model, _ = load(model_path, dtype=dtype) if dtype else load(model_path)

    def forward(ids: np.ndarray, mask: np.ndarray):
        out = model(mx.array(ids), mask=mx.array(mask))
        routing = [(np.array(r.boundary_mask), np.array(r.valid) if r.valid is not None
                    else np.ones(r.boundary_mask.shape, bool)) for r in out.routing]
        return np.array(out.logits.astype(mx.float32)), routing

    return forward


@click.command("eval")
@eval_options
def eval_command(model_path, data, max_bytes, window, stride, batch_size, as_json, dtype):
    """Bits per byte of a model on a text, per-stage compression and throughput."""
    run_eval("mlx", model_path, data, max_bytes, window, stride, batch_size, as_json, dtype=dtype)

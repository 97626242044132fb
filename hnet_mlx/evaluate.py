"""`hnet-mlx eval`: bits per byte of an MLX model on a text (MLX-specific command).

    hnet-mlx eval --model runs/a/model --data held_out.txt [--max-bytes N] [--json]

The same evaluation as `hnet eval --backend mlx` (hnet_core/evaluate.py: sliding windows that
score every byte once, per-stage compression, throughput); `--json` prints one object with
bits_per_byte, bytes, compression_ratios (outermost stage first) and bytes_per_second.
"""

from __future__ import annotations

import click

from hnet_core.evaluate import eval_options, run_eval


@click.command("eval")
@eval_options
def eval_command(model_path, data, max_bytes, window, stride, batch_size, as_json, dtype):
    """Bits per byte of a model on a text, per-stage compression and throughput."""
    run_eval("mlx", model_path, data, max_bytes, window, stride, batch_size, as_json, dtype=dtype)

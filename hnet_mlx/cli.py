"""The `hnet-mlx` command (MLX-specific: hnet_torch has no twin; its commands live in `hnet`).

    hnet-mlx generate --model DIR --prompt "Hello"
    hnet-mlx cache-prompt --model DIR --prompt-file DOC.txt --out doc.safetensors
    hnet-mlx generate --model DIR --prompt-cache-file doc.safetensors --prompt " and then"
    hnet-mlx chunks --model DIR --text "..." [--html page.html]
    hnet-mlx train / finetune / fuse / eval
    hnet-mlx add-mlx-lm DIR             (make an older model directory an mlx-lm and transformers one)
    hnet-mlx blas-hook install          (OpenBLAS for mlx_lm.* commands on Linux)
"""

from __future__ import annotations

import os
import sys

import click

from hnet_core.backends import DEMO_MODEL
from hnet_core.cli import (HNetGroup, cache_prompt_file, prefill_options, prefill_step_option, read_prompts,
                           run_generation, sampling_options)
from hnet_core.errors import HNetError

LAZY_COMMANDS = {
    "train": ("hnet_mlx.train", "train_command", "mlx"),
    "finetune": ("hnet_mlx.train", "finetune_command", "mlx"),
    "fuse": ("hnet_mlx.lora", "fuse_command", "mlx"),
    "eval": ("hnet_mlx.evaluate", "eval_command", "mlx"),
    "blas-hook": ("hnet_core.blas_hook_cli", "blas_hook_command", None),
}

# The small demo model shipped with the package (hnet_core/demo_model), used when --model is omitted.
BUNDLED_MODEL = DEMO_MODEL

NO_MODEL = (
    "no --model given and the bundled demo model is missing from this install; download an official checkpoint "
    "(e.g. hnet_2stage_XL.pt from huggingface.co/cartesia-ai/hnet_2stage_XL), convert it once with "
    "`hnet convert torch-to-mlx hnet_2stage_XL.pt hnet_2stage_XL-mlx`, then pass --model hnet_2stage_XL-mlx"
)


def resolve_model(path: str | None, bundled: str = BUNDLED_MODEL) -> str:
    if path:
        return path
    if os.path.isdir(bundled):
        return bundled
    raise HNetError(NO_MODEL)


def _model_name(path: str | None) -> str:
    """How a page names the model: its directory's name, or "bundled demo model"."""
    if not path or os.path.abspath(path) == os.path.abspath(BUNDLED_MODEL):
        return "bundled demo model"
    return os.path.basename(os.path.normpath(path))


def load_mlx(path: str, dtype: str | None = None):
    from hnet_core.backends import load_model

    return load_model("mlx", resolve_model(path), dtype=dtype)


def stage_masks(model, data: bytes):
    """Per-stage boundary masks (numpy) of BOS + data, with the BOS position dropped at byte level."""
    import mlx.core as mx
    import numpy as np

    from hnet_core.chunks import byte_boundaries
    from hnet_core.tokenizer import encode

    out = model(mx.array([encode(data)]))
    masks = [np.array(r.boundary_mask[0]) for r in out.routing]
    return [b[1:] for b in byte_boundaries(masks)]


@click.group(cls=HNetGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hnet-mlx")
def main() -> None:
    """H-Net on Apple silicon with MLX: generate, inspect chunks, train and fine-tune."""


@main.command()
@click.option("--model", "model_path", default=None,
              help="Converted model directory (hnet convert torch-to-mlx) or a training run directory. Default: the "
                   "bundled demo model.")
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="Prompt text (its bytes as given, invalid UTF-8 included), or - for stdin. Repeat it to generate "
                   "several prompts together.")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), default=None,
              help="A file with one prompt per line, all generated together (ragged lengths are fine).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; the demo model, stored in float16: float32).")
@click.option("--show-chunks", is_flag=True,
              help="After generating, print prompt + output coloured by the first stage's chunks.")
@sampling_options
@prefill_options
def generate(model_path, prompts, batch_file, dtype, show_chunks, **kw):
    """Generate text from a prompt, streaming UTF-8 as it is produced."""
    prompts = read_prompts(prompts)
    if batch_file:
        if not os.path.exists(batch_file):
            raise HNetError(f"--batch file not found: {batch_file}")
        with open(batch_file, "rb") as f:  # raw bytes, like every prompt
            prompts += [line.rstrip(b"\r\n") for line in f if line.strip()]
    if not prompts:
        raise HNetError("give a prompt with --prompt TEXT (or --prompt - for stdin, or --batch FILE)")
    loaded = load_mlx(model_path, dtype)
    if kw.get("verbose"):
        from . import blas

        click.echo(blas.describe(), err=True)  # which BLAS runs MLX's CPU matmuls (Linux: see hnet_mlx/blas.py)
    if not show_chunks:
        run_generation(loaded, prompts, **kw)
        return
    from rich.console import Console

    from hnet_core.chunks import render_terminal, segment

    texts = run_generation(loaded, prompts, out=open(os.devnull, "w"), **kw)
    console = Console(highlight=False)
    for prompt, text in zip(prompts, texts):
        data = prompt + text.encode("utf-8")
        seg = segment(data, stage_masks(loaded.model, data))
        console.print(render_terminal(seg, 0))


@main.command("cache-prompt")
@click.option("--model", "model_path", default=None,
              help="Converted model directory (hnet convert torch-to-mlx). Default: the bundled demo model.")
@click.option("--prompt-file", required=True, type=click.Path(dir_okay=False), help="The text to read once.")
@click.option("--out", "out_path", required=True, help="Prompt cache file to write (.safetensors).")
@prefill_step_option()
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored).")
def cache_prompt(model_path, prompt_file, out_path, prefill_step_size, dtype):
    """Read a long text once and save the model's state, for `generate --prompt-cache-file`."""
    cache_prompt_file(load_mlx(model_path, dtype), prompt_file, out_path, prefill_step_size)


@main.command()
@click.option("--model", "model_path", default=None,
              help="Converted model directory or a training run directory. Default: the bundled demo model.")
@click.option("--text", default=None, help="Text to segment.")
@click.option("--file", "file_path", type=click.Path(dir_okay=False), default=None, help="Read the text from a file.")
@click.option("--max-bytes", default=8192, show_default=True, type=int, help="Use at most this many bytes of --file.")
@click.option("--html", "html_path", default=None,
              help="Also write a standalone HTML page here (missing directories are created).")
def chunks(model_path, text, file_path, max_bytes, html_path):
    """Show how each stage segments a text, with per-stage compression ratios."""
    from rich.console import Console
    from rich.table import Table

    from hnet_core.chunks import chunk_counts, render_html, render_terminal, segment
    from hnet_core.io import atomic_write_text, check_output_path

    if (text is None) == (file_path is None):
        raise HNetError("give exactly one of --text TEXT or --file PATH")
    if file_path is not None:
        if not os.path.exists(file_path):
            raise HNetError(f"file not found: {file_path}")
        with open(file_path, "rb") as f:
            data = f.read(max_bytes)
    else:
        data = os.fsencode(text)  # the bytes given in argv, invalid UTF-8 included
    if not data:
        raise HNetError("the text is empty; give at least one byte")
    if html_path:
        check_output_path(html_path, "--html page")
    loaded = load_mlx(model_path)
    boundaries = stage_masks(loaded.model, data)
    seg = segment(data, boundaries)
    ratios = seg.compression_ratios(boundaries)
    counts = chunk_counts(boundaries)
    console = Console(highlight=False)
    for stage in range(len(boundaries)):
        console.rule(f"stage {stage}: {counts[stage]} chunks, {ratios[stage]:.2f} bytes per chunk")
        console.print(render_terminal(seg, stage))
    table = Table(title="compression")
    table.add_column("stage")
    table.add_column("chunks", justify="right")
    table.add_column("bytes per chunk", justify="right")
    table.add_column("tokens per chunk (vs previous stage)", justify="right")
    previous = seg.byte_count
    for stage, n in enumerate(counts):
        table.add_row(str(stage), str(n), f"{ratios[stage]:.2f}", f"{previous / n:.2f}")
        previous = n
    console.print(table)
    if html_path:
        atomic_write_text(html_path, render_html(seg, ratios, title=f"H-Net chunks ({_model_name(model_path)})"))
        click.echo(f"wrote {html_path}", err=True)


@main.command("add-mlx-lm")
@click.argument("directory", type=click.Path(file_okay=False))
def add_mlx_lm(directory):
    """Add what mlx-lm and transformers need (tokenizer.json, tokenizer_config.json, config keys,
    model_file, auto_map modules) to an existing model DIRECTORY, so `mlx_lm.generate --model
    DIRECTORY --trust-remote-code` and `AutoModelForCausalLM.from_pretrained(DIRECTORY,
    trust_remote_code=True)` run it."""
    from hnet_core import mlx_lm_files

    written = mlx_lm_files.add_to_directory(directory)
    click.echo(f"{directory}: wrote {', '.join(written)}; try "
               f"mlx_lm.generate --model {directory} --trust-remote-code --prompt \"Hello\"")


if __name__ == "__main__":
    sys.exit(main())

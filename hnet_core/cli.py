"""The `hnet` command: generate with any backend, and the tools around the models.

    hnet generate --backend torch --model MODEL --prompt "Hello"
    hnet cache-prompt --model MODEL --prompt-file DOC.txt --out doc.safetensors
    hnet generate --model MODEL --prompt-cache-file doc.safetensors --prompt " and then"
    hnet convert torch-to-mlx SRC DST          hnet convert mlx-to-torch SRC DST
    hnet export onnx --model MODEL --out DIR
    hnet train / eval / plot / data prepare

Subcommands live beside the code they drive and are imported only when used, so `hnet generate
--backend onnx` never imports torch. A user mistake prints one line (`Error: ...`), no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

import click

from .errors import HNetError

# name -> (module, attribute, pip extra that provides it)
LAZY_COMMANDS = {
    "convert": ("hnet_mlx.convert", "convert", "mlx"),  # reads .pt without torch (hnet_core/torch_zip.py)
    "export": ("hnet_export.cli", "export", "onnx,torch"),
    "train": ("hnet_torch.train", "train_command", "torch"),
    "eval": ("hnet_core.evaluate", "eval_command", "torch"),
    "plot": ("hnet_core.plot", "plot_command", "train"),
    "data": ("hnet_core.data", "data_command", ""),
    "serve": ("hnet_core.serve.cli", "serve_command", "serve"),
}


class HNetGroup(click.Group):
    """A click group that imports subcommands lazily and turns HNetError into a one-line error."""

    def __init__(self, *args, lazy: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr, extra = self.lazy[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:
                reason = str(e)
                hint = f"pip install 'hnet-mlx[{extra}]'" if extra else "reinstall hnet-mlx"

                @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
                @click.argument("args", nargs=-1, type=click.UNPROCESSED)
                def unavailable(args):
                    raise click.ClickException(f"`{name}` needs packages that are not installed ({reason}); {hint}")

                return unavailable
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        # Listing the commands imports their modules; what those print on import (hnet_mlx's BLAS
        # hint) concerns running a command, not reading --help.
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            super().format_commands(ctx, formatter)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HNetError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            # A path the system refused (the writers check theirs first; this is the net for the rest).
            if e.filename is None:
                raise
            raise click.ClickException(f"cannot use {e.filename}: {e.strerror or e}") from None


def read_prompts(prompts: Sequence[str]) -> list[bytes]:
    """The prompts as the raw bytes the user gave: argv as the OS passed it (os.fsencode undoes Python's
    surrogateescape decoding, so invalid UTF-8 passes through unchanged), `-` as stdin's bytes."""
    out = []
    for p in prompts:
        if p == "-":
            out.append(sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else os.fsencode(sys.stdin.read()))
        else:
            out.append(os.fsencode(p))
    return out


def show_bytes(data: bytes) -> str:
    """Printable text of raw bytes (invalid UTF-8 shown as U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def sampling_options(f):
    """The sampling flags shared by `hnet generate` and `hnet-mlx generate`."""
    options = [
        click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Bytes to generate."),
        click.option("--temperature", "--temp", "temperature", default=1.0, show_default=True, type=float,
                     help="Sampling temperature; 0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass (1 = off)."),
        click.option("--top-k", default=0, show_default=True, type=int, help="Keep the k most likely bytes (0 = off)."),
        click.option("--min-p", default=0.0, show_default=True, type=float,
                     help="Drop bytes below min_p x the top probability (0 = off)."),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=float,
                     help="Penalise bytes seen in the last 64 (1 = off)."),
        click.option("--seed", default=None, type=int, help="Random seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--verbose", "-v", is_flag=True, help="Print throughput, memory and chunk statistics after generating."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def prefill_step_option(help_text: str = "Bytes per piece"):
    """`--prefill-step-size` (its default and its check live in hnet_core.engine)."""
    from .engine import DEFAULT_PREFILL_STEP

    return click.option("--prefill-step-size", default=None, type=int,
                        help=f"{help_text} (default {DEFAULT_PREFILL_STEP}; must be positive).")


def prefill_options(f):
    """`--prefill-step-size` and `--prompt-cache-file`, shared by `hnet generate` and `hnet-mlx generate`."""
    f = click.option("--prompt-cache-file", default=None, type=click.Path(dir_okay=False),
                     help="Continue the text cached by `cache-prompt` (torch, mlx): --prompt is what follows it.")(f)
    return prefill_step_option("Read the prompt in pieces of this many bytes, extending one cache, so memory "
                               "stays flat for long prompts")(f)


def cache_prompt_file(loaded, prompt_file: str, out_path: str, prefill_step_size: int | None) -> None:
    """Read a prompt file into a new cache and save it (the `cache-prompt` commands)."""
    from .engine import cache_prompt, check_prefill_step
    from .prompt_cache import save_with

    check_prefill_step(prefill_step_size)  # before reading a long file
    try:
        with open(prompt_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HNetError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
    cache, metadata = cache_prompt(loaded.adapter, data, prefill_step_size)
    metadata["source"] = prompt_file
    save_with(loaded.adapter, out_path, cache, metadata)
    click.echo(f"wrote {out_path}: BOS + {len(data)} bytes of {prompt_file} (the last byte is read again with "
               "the continuation)", err=True)


def run_generation(loaded, prompts: list[bytes], max_tokens: int, temperature: float, top_p: float, top_k: int,
                   min_p: float, repetition_penalty: float, seed: int | None, stop: Sequence[str], verbose: bool,
                   out=None, on_step=None, prefill_step_size: int | None = None,
                   prompt_cache_file: str | None = None) -> list[str]:
    """Stream one prompt's text to `out` as it is generated (or collect a batch), then print stats.
    With a prompt cache file, the one prompt continues the cached text."""
    from .engine import check_prefill_step, stream_generate
    from .sampling import SamplingParams

    out = out or sys.stdout
    if max_tokens < 0:
        raise HNetError(f"--max-tokens must be >= 0, got {max_tokens}")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    check_prefill_step(prefill_step_size)  # before a prompt cache file is read
    extra: dict = {}
    feed = prompts
    if prompt_cache_file is not None:
        from .prompt_cache import continuation, load_with

        if len(prompts) != 1:
            raise HNetError("--prompt-cache-file continues one text: give exactly one --prompt")
        cache, metadata = load_with(loaded.adapter, prompt_cache_file)
        data, context = continuation(metadata, prompts[0])
        feed = [data]
        extra.update(prompt_cache=cache, context=[context])
    texts = [""] * len(prompts)
    gen = stream_generate(loaded.adapter, feed, max_tokens=max_tokens, sampling=params, stop=stop,
                          prefill_step_size=prefill_step_size, **extra)
    stats = None
    while True:
        try:
            step = next(gen)
        except StopIteration as done:
            stats = done.value
            break
        for b, t in enumerate(step.texts):
            texts[b] += t
        if on_step is not None:
            on_step(step)
        elif len(prompts) == 1 and step.texts[0]:
            safe_write(out, step.texts[0])
    if on_step is None:
        if len(prompts) == 1:
            safe_write(out, "\n")
        else:
            for i, t in enumerate(texts):
                safe_write(out, f"=== [{i}] {show_bytes(prompts[i])!r}\n{t}\n")
    if verbose and stats is not None:
        stats.load_seconds = getattr(loaded, "load_seconds", None)
        print_stats(stats)
    return texts


def safe_write(out, text: str) -> None:
    """Write and flush; a terminal that cannot show a character gets '?' instead of a crash."""
    try:
        out.write(text)
    except UnicodeEncodeError:
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(text.encode(encoding, errors="replace").decode(encoding))
    out.flush()


def print_stats(stats) -> None:
    err = sys.stderr
    peak_memory = stats.peak_memory
    err.write("=" * 10 + "\n")
    if stats.load_seconds is not None:
        err.write(f"Load: {stats.load_seconds:.2f} s\n")
    err.write(f"Prompt: {stats.prompt_bytes} bytes, {stats.prefill_bytes_per_second:.1f} bytes/s\n")
    err.write(f"Generation: {stats.generated_bytes} bytes, {stats.decode_bytes_per_second:.1f} bytes/s\n")
    if stats.first_step_seconds is not None:  # the Generation rate includes the first step; this splits it off
        err.write(f"Decode: first step {stats.first_step_seconds * 1e3:.1f} ms, then "
                  f"{stats.steady_bytes_per_second:.1f} bytes/s\n")
    if peak_memory:
        err.write(f"Peak memory: {peak_memory[0] / 1e9:.3f} GB ({peak_memory[1]})\n")
    for s, ratio in enumerate(stats.chunk_lengths):
        err.write(f"Stage {s}: {stats.stage_boundaries[s]} chunks over {stats.stage_tokens[s]} tokens, "
                  f"{ratio:.2f} tokens per chunk\n")
    err.flush()


@click.group(cls=HNetGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hnet-mlx")
def main() -> None:
    """H-Net: tokenizer-free hierarchical byte-level language models (PyTorch, MLX, ONNX)."""


@main.command()
@click.option("--backend", type=click.Choice(["torch", "mlx", "onnx"]), default="torch", show_default=True,
              help="Which implementation runs the model.")
@click.option("--model", "model_path", default=None,
              help="Model directory, a training run directory (its final model, else newest checkpoint), or an "
                   "official .pt checkpoint (torch); an export directory for onnx. Default (torch, mlx): the bundled "
                   "model (5.0M parameters, 2 stages, trained on English prose and documentation; its "
                   "MODEL_CARD.md says how well it does).")
@click.option("--config", default=None, help="Config JSON for a .pt checkpoint (optional for the official ones).")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="Prompt text (its bytes as given, invalid UTF-8 included), or - for stdin. Repeat to generate a "
                   "batch together.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights dtype (torch, mlx). Default: float32 in torch, as stored in mlx (the demo model: float32).")
@click.option("--device", default=None, help="torch device (cpu, cuda, mps) or onnx provider (cpu, cuda, auto).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="torch on the CPU: int8 Linear weights (torch dynamic quantization; 2-3.6x faster decoding of "
                   "100M-700M models measured, some accuracy cost: docs/torch.md). MLX and ONNX quantize at "
                   "conversion/export.")
@sampling_options
@prefill_options
def generate(backend, model_path, config, prompts, dtype, device, quantize, **kw):
    """Generate text from a prompt, streaming UTF-8 as it is produced."""
    from .backends import DEMO_MODEL, load_model

    prompts = read_prompts(prompts)
    if model_path is None:
        model_path = DEMO_MODEL  # for onnx: its export, built once into the user's cache (backends.py)
    loaded = load_model(backend, model_path, config=config, dtype=dtype, device=device, batch=len(prompts),
                        quantize=quantize)
    run_generation(loaded, prompts, **kw)


@main.command("cache-prompt")
@click.option("--backend", type=click.Choice(["torch", "mlx"]), default="torch", show_default=True,
              help="Which implementation reads the prompt (the file loads in either).")
@click.option("--model", "model_path", default=None, help="Model directory, or an official .pt checkpoint (torch). "
                                                          "Default: the bundled demo model.")
@click.option("--config", default=None, help="Config JSON for a .pt checkpoint (optional for the official ones).")
@click.option("--prompt-file", required=True, type=click.Path(dir_okay=False), help="The text to read once.")
@click.option("--out", "out_path", required=True, help="Prompt cache file to write (.safetensors).")
@prefill_step_option()
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights dtype (default float32).")
@click.option("--device", default=None, help="torch device (cpu, cuda, mps).")
def cache_prompt(backend, model_path, config, prompt_file, out_path, prefill_step_size, dtype, device):
    """Read a long text once and save the model's state, for `generate --prompt-cache-file`."""
    from .backends import DEMO_MODEL, load_model

    loaded = load_model(backend, model_path or DEMO_MODEL, config=config, dtype=dtype, device=device)
    cache_prompt_file(loaded, prompt_file, out_path, prefill_step_size)


if __name__ == "__main__":
    main()

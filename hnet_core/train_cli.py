"""Command-line flags shared by `hnet train` (PyTorch) and `hnet-mlx train` / `finetune` (MLX).

Every training setting of `TrainConfig` is a flag; `--train-config FILE.json` supplies a base that
flags override. Only flags the user actually typed count as explicit, which is what `--resume`
compares against the saved run.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from .errors import HNetError
from .train_config import SCHEDULES, TrainConfig


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise HNetError(f"{flag} takes comma-separated numbers like 3,3; got {text!r}") from None


# (flag, TrainConfig field, click kwargs)
_FLAGS = [
    ("--steps", "steps", {"type": int, "help": "Optimizer steps to train (total, including resumed ones)."}),
    ("--batch-size", "batch_size", {"type": int, "help": "Global batch: sequences per optimizer step, over all processes."}),
    ("--seq-len", "seq_len", {"type": int, "help": "Bytes per training sequence."}),
    ("--lr", "lr", {"type": float, "help": "Peak learning rate."}),
    ("--warmup", "warmup", {"type": int, "help": "Linear warmup steps."}),
    ("--schedule", "schedule", {"type": click.Choice(SCHEDULES), "help": "Decay after warmup."}),
    ("--min-lr-ratio", "min_lr_ratio", {"type": float, "help": "Final learning rate as a fraction of --lr."}),
    ("--decay-fraction", "decay_fraction", {"type": float, "help": "WSD: fraction of the steps spent decaying (at the end)."}),
    ("--weight-decay", "weight_decay", {"type": float, "help": "AdamW weight decay (not on biases, norms, A_log, D, dt_bias, pad_dimension)."}),
    ("--grad-clip", "grad_clip", {"type": float, "help": "Clip the global gradient norm (0 = off)."}),
    ("--grad-accum", "grad_accum", {"type": int, "help": "Micro-batches per optimizer step."}),
    ("--alpha", "alpha", {"type": float, "help": "Ratio-loss weight (official 0.03)."}),
    ("--target-ratios", "target_ratios", {"type": str, "help": "Target bytes per chunk per stage, outermost first, e.g. 3,3."}),
    ("--lr-multipliers", "lr_multipliers", {"type": str, "help": "Learning-rate multiplier per level, outermost first, e.g. 2,1.5,1."}),
    ("--packing", "packing", {"type": click.Choice(["packed", "padded"]), "help": "Packed windows with cu_seqlens, or padded documents."}),
    ("--save-every", "save_every", {"type": int, "help": "Steps between checkpoints."}),
    ("--eval-every", "eval_every", {"type": int, "help": "Steps between validation evaluations."}),
    ("--eval-bytes", "eval_bytes", {"type": int, "help": "Validation bytes scored per evaluation."}),
    ("--log-every", "log_every", {"type": int, "help": "Steps between metric log lines."}),
    ("--keep-last", "keep_last", {"type": int, "help": "Checkpoints to keep."}),
    ("--val-fraction", "val_fraction", {"type": float, "help": "Fraction of the data held out for validation (its tail)."}),
    ("--seed", "seed", {"type": int, "help": "Seed for initialisation and data order."}),
    ("--dtype", "dtype", {"type": click.Choice(["float32", "bfloat16"]), "help": "bfloat16 = mixed precision."}),
]
FIELDS = [f for _, f, _ in _FLAGS]


def train_options(defaults: dict | None = None):
    """Decorator: the data/output flags and every TrainConfig flag (help shows the command's defaults)."""
    base = TrainConfig().to_dict()
    base.update(defaults or {})

    def decorate(func):
        return _add_options(func, base)

    return decorate


def _add_options(func, base: dict):
    for flag, field, kw in reversed(_FLAGS):
        value = base.get(field)
        if value is None:
            shown = "6 for 1 stage, 3 per stage otherwise" if field == "target_ratios" else "1 per level"
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
        kw = {**kw, "help": f"{kw['help']}  [default: {shown}]"}
        func = click.option(flag, field, default=None, **kw)(func)
    func = click.option("--time-limit", "time_limit", type=float, default=None,
                        help="Stop this session after so many seconds (checkpoint saved; --resume continues).")(func)
    func = click.option("--stop-at", "stop_at", type=int, default=None,
                        help="Stop this session after that step (checkpoint saved; --resume continues the same schedule).")(func)
    func = click.option("--train-config", "train_config", default=None,
                        help="JSON file of training settings (flags override it).")(func)
    func = click.option("--restart-data", "restart_data", is_flag=True, default=False,
                        help="With --resume: keep weights, optimizer and schedule but start the data order afresh "
                             "(to continue on changed training data).")(func)
    func = click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None,
                        help="Continue the run in --out from its latest checkpoint (or from the checkpoint directory given).")(func)
    func = click.option("--out", "out", required=True, help="Run directory: checkpoints, metrics.jsonl, final model.")(func)
    func = click.option("--data", "data", required=True,
                        help="Training text: a file, a directory, JSONL ({\"text\": ...}) or a prepared .bin.")(func)
    return func


def config_from_options(ctx: click.Context, options: dict, defaults: dict | None = None) -> tuple[TrainConfig, dict]:
    """(TrainConfig, explicitly typed settings) from the parsed flags; `defaults` are command defaults."""
    base = TrainConfig.from_json(options["train_config"]).to_dict() if options.get("train_config") else {}
    values = dict(defaults or {})
    values.update(base)
    explicit = {}
    for field in FIELDS:
        value = options.get(field)
        if value is None:
            continue
        if field in ("target_ratios", "lr_multipliers"):
            value = _floats(value, "--" + field.replace("_", "-"))
        values[field] = value
        if ctx.get_parameter_source(field) == ParameterSource.COMMANDLINE:
            explicit[field] = value
    return TrainConfig.from_dict(values), explicit

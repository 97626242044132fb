"""The `hnet-mlx` command (MLX-specific: hnet_torch has no twin; its commands live in `hnet`).

    hnet-mlx generate --model DIR --prompt "Hello"
    hnet-mlx chunks --model DIR --text "..."
    hnet-mlx train / finetune / fuse / eval
"""

from __future__ import annotations

import click

from hnet_core.cli import HNetGroup

LAZY_COMMANDS = {
    "train": ("hnet_mlx.train", "train_command", "mlx"),
    "finetune": ("hnet_mlx.train", "finetune_command", "mlx"),
    "fuse": ("hnet_mlx.lora", "fuse_command", "mlx"),
    "eval": ("hnet_mlx.evaluate", "eval_command", "mlx"),
}


@click.group(cls=HNetGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hnet-mlx")
def main() -> None:
    """H-Net on Apple silicon with MLX: generate, inspect chunks, train and fine-tune."""


if __name__ == "__main__":
    main()

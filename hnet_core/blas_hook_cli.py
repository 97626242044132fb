"""`hnet-mlx blas-hook install|remove|status`: the start-up hook of mlx_blas_startup.py."""

from __future__ import annotations

import os

import click

from .io import atomic_write_text
from .mlx_blas_startup import ENV, PTH_LINE, pth_path


@click.command("blas-hook")
@click.argument("action", type=click.Choice(["install", "remove", "status"]), default="status")
def blas_hook_command(action: str) -> None:
    """Make mlx-lm's own commands (mlx_lm.generate, mlx_lm.evaluate, ...) use the system OpenBLAS on
    Linux without LD_PRELOAD: install writes a start-up hook (.pth) into this environment's
    site-packages; remove deletes it; status says whether it is there."""
    path = pth_path()
    if action == "install":
        atomic_write_text(path, PTH_LINE)
        click.echo(f"wrote {path}: mlx_lm.* commands now load OpenBLAS before MLX ({ENV}=off turns it off)")
    elif action == "remove":
        if os.path.exists(path):
            os.remove(path)
        click.echo(f"removed {path}")
    else:
        click.echo(f"{path}: {'installed' if os.path.exists(path) else 'not installed'}")

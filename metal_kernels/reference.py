"""What a kernel is held to: the plain-MLX twins of the kernels, supplied by the package that uses them.

This package does not define the math its kernels compute; the model package that calls them does,
with a pure-MLX function of exactly each kernel wrapper's signature (the readable reference path).
Every check here (selftest, the measured dispatch's gate and timing, verify) takes those functions
as a `PurePaths` argument, so the dependency points one way: the model package uses the kernels,
never the reverse. The command-line checks (`python -m hnet_metal_kernels.selftest` / `verify`)
find the pure paths through the entry point group ENTRY_POINT_GROUP, which the installed model
package registers (pyproject.toml: a function returning its PurePaths).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "hnet_metal_kernels.pure_paths"

# verify report section -> fn(quick) -> rows: a check of a whole model using the kernels (Metal only)
ModelCheck = Callable[[bool], Any]


@dataclass(frozen=True)
class PurePaths:
    """The pure twin of every kernel (same positional arguments as the kernel wrapper, no `factory`),
    the source files they live in (a change there re-measures dispatch decisions) and, optionally,
    whole-model checks for the verify report."""

    ssm_step: Callable
    conv_step: Callable
    ssd_scan: Callable
    ema_dechunk: Callable
    files: tuple[str, ...] = ()
    model_checks: tuple[tuple[str, ModelCheck], ...] = ()

    def of(self, kernel: str) -> Callable:
        if kernel not in ("ssm_step", "conv_step", "ssd_scan", "ema_dechunk"):
            raise ValueError(f"unknown kernel {kernel!r}")
        return getattr(self, kernel)


class NoPurePaths(RuntimeError):
    """No installed package registered its pure paths (the command-line checks need them)."""


def registered() -> PurePaths:
    """The pure paths the installed model package registered under ENTRY_POINT_GROUP."""
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if not found:
        raise NoPurePaths(f"no package registered pure paths under the entry point group {ENTRY_POINT_GROUP!r}; "
                          "install (or reinstall, `pip install -e .`) the model package that uses these kernels")
    return found[0].load()()

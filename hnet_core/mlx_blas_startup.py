"""OpenBLAS for mlx-lm's own commands on Linux, from a start-up hook (`hnet-mlx blas-hook install`).

`hnet_mlx` loads the system OpenBLAS before MLX (hnet_mlx/blas.py), but `mlx_lm.generate`,
`mlx_lm.evaluate`, ... import MLX before they reach our model code, so MLX binds its slow bundled
reference BLAS first. Only a library loaded before MLX helps: LD_PRELOAD=libopenblas.so.0, or code
that runs at interpreter start-up. `hnet-mlx blas-hook install` writes a one-line `.pth` file into
site-packages that calls `run()` when Python starts; it acts only when all of these hold, and does
nothing otherwise (so other programs in the environment are untouched):

- Linux; HNET_MLX_BLAS is not `off` (a path there names another LP64 CBLAS library);
- the process is an mlx-lm command (`mlx_lm.X ...` or `python -m mlx_lm ...`, read from
  sys.orig_argv, which Python sets before it reads .pth files);
- MLX is installed and not imported yet, and the library loads.

This module imports nothing but the standard library (it runs before anything else); the command
that installs the hook is hnet_core/blas_hook_cli.py.
"""

from __future__ import annotations

import os
import sys

ENV = "HNET_MLX_BLAS"
OFF = ("off", "0", "no", "false", "none")
CANDIDATES = ("libopenblas.so.0", "libopenblas.so")
PTH_NAME = "hnet_mlx_blas.pth"
# Every Python start in the environment reads this line: it tests argv before importing anything of ours.
PTH_LINE = ("import sys; 'mlx_lm' in ' '.join(getattr(sys, 'orig_argv', [])[1:4]) and "
            "__import__('hnet_core.mlx_blas_startup').mlx_blas_startup.run()\n")


def is_mlx_lm_command(argv: list[str]) -> bool:
    """argv as in sys.orig_argv: [python, script, ...] for console scripts, [python, -m, module, ...]."""
    if "-m" in argv[1:]:
        i = argv.index("-m", 1)
        return i + 1 < len(argv) and argv[i + 1].split(".")[0] == "mlx_lm"
    return len(argv) >= 2 and os.path.basename(argv[1]).split(".")[0] == "mlx_lm"


def run() -> str | None:
    """Load the BLAS into the global symbol scope if this process qualifies; returns the library loaded."""
    setting = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux") or setting.lower() in OFF:
        return None
    if not is_mlx_lm_command(list(getattr(sys, "orig_argv", []))) or "mlx.core" in sys.modules:
        return None
    import importlib.util

    if importlib.util.find_spec("mlx") is None:
        return None
    import ctypes

    for name in ([setting] if setting else CANDIDATES):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return name
    return None  # none installed: hnet_mlx's own warning says what to do


def pth_path() -> str:
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)

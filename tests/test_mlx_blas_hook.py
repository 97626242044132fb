"""The start-up hook that gives mlx-lm's own commands OpenBLAS on Linux (hnet_core/mlx_blas_startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest

from hnet_core import mlx_blas_startup

DEMO = os.path.join(os.path.dirname(__file__), "..", "hnet_core", "demo_model")
LATE = "MLX was imported before hnet_mlx could load OpenBLAS"


@pytest.mark.parametrize("argv, expected", [
    (["python", "/env/bin/mlx_lm.generate", "--model", "m"], True),
    (["python", "-m", "mlx_lm", "evaluate"], True),
    (["python", "-m", "mlx_lm.perplexity"], True),
    (["python", "-m", "json.tool"], False),
    (["python", "script.py", "mlx_lm"], False),
    (["python", "-c", "import mlx_lm"], False),
    (["python"], False),
])
def test_the_hook_acts_only_for_mlx_lm_commands(argv, expected):
    assert mlx_blas_startup.is_mlx_lm_command(argv) is expected


def test_the_hook_does_nothing_when_turned_off(monkeypatch):
    monkeypatch.setenv(mlx_blas_startup.ENV, "off")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "mlx_lm", "generate"], raising=False)
    assert mlx_blas_startup.run() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the hook acts on Linux only")
def test_mlx_lm_generate_gets_openblas_from_the_installed_hook(tmp_path):
    pytest.importorskip("mlx.core")
    import ctypes.util

    if not ctypes.util.find_library("openblas"):
        pytest.skip("no system OpenBLAS")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's import path (the project and its dependencies)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    with open(os.path.join(purelib, "aa_paths.pth"), "w") as f:
        f.write("\n".join([root, *(p for p in sys.path if p and os.path.isdir(p))]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(mlx_blas_startup.ENV, None)
    env.pop("LD_PRELOAD", None)

    def generate() -> str:
        out = subprocess.run([python, "-m", "mlx_lm", "generate", "--model", DEMO, "--trust-remote-code", "--prompt",
                              "Hi", "--max-tokens", "4"], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0 and "Generation:" in out.stdout + out.stderr, out.stderr[-2000:]
        return out.stderr

    assert LATE in generate()  # without the hook MLX binds its reference BLAS first
    with open(os.path.join(purelib, mlx_blas_startup.PTH_NAME), "w") as f:  # what `blas-hook install` writes
        f.write(mlx_blas_startup.PTH_LINE)
    assert LATE not in generate()

"""hnet_mlx loads an optimized BLAS before MLX on Linux (hnet_mlx/blas.py): which one is reported,
HNET_MLX_BLAS=off turns it off, and importing mlx first gives the LD_PRELOAD hint. Each case runs in
a fresh interpreter, since the choice is made once per process. (Speed: bench/bench_blas.py.)"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")

HAS_OPENBLAS = ctypes.util.find_library("openblas") is not None


def run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("HNET_MLX_BLAS", "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environment, **env})


REPORT = "import hnet_mlx, mlx.core as mx; mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4))); print(hnet_mlx.blas.describe())"


@pytest.mark.skipif(not HAS_OPENBLAS, reason="no libopenblas on this system (apt-get install libopenblas0)")
def test_openblas_is_loaded_before_mlx_and_reported():
    result = run(REPORT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BLAS: OpenBLAS (") and "loaded before MLX" in result.stdout
    assert "hnet_mlx:" not in result.stderr  # no hint when all is well


def test_env_var_turns_it_off():
    result = run(REPORT, HNET_MLX_BLAS="off")
    assert result.returncode == 0 and "bundled reference BLAS (HNET_MLX_BLAS=off)" in result.stdout, result.stderr


def test_mlx_imported_first_gets_the_ld_preload_hint_once():
    result = run("import mlx.core; import hnet_mlx; from hnet_mlx import blas; blas.preload(); "
                 "print(blas.describe())")
    assert result.returncode == 0, result.stderr
    assert "MLX was imported first" in result.stdout
    assert result.stderr.count("LD_PRELOAD=") == 1


def test_a_missing_library_named_in_the_env_var_is_one_clear_line():
    result = run(REPORT, HNET_MLX_BLAS="/nonexistent/libblas.so")
    assert result.returncode == 0 and "could not be loaded" in result.stdout
    assert result.stderr.count("HNET_MLX_BLAS=/nonexistent/libblas.so could not be loaded") == 1


def test_a_few_rows_times_a_wide_weight_go_through_small_kernel_blocks(monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn

    from hnet_mlx import blas

    layer = nn.Linear(256, 1536, bias=True)
    one, many = mx.random.normal((1, 1, 256)), mx.random.normal((1, 64, 256))
    monkeypatch.setattr(blas, "_has_small_kernels", lambda: True)
    blocks = mx.concatenate([one @ layer.weight[:768].T, one @ layer.weight[768:].T], axis=-1) + layer.bias
    assert mx.array_equal(blas.linear(layer, one), blocks)  # 1 x 1536 > 1200 outputs: two 768-row blocks
    assert mx.allclose(blas.linear(layer, one), layer(one), rtol=1e-5, atol=1e-5)
    assert mx.array_equal(blas.linear(layer, many), layer(many))  # a prefill's rows: the plain product
    monkeypatch.setattr(blas, "_has_small_kernels", lambda: False)  # other OpenBLAS kernels, or no OpenBLAS
    assert mx.array_equal(blas.linear(layer, one), layer(one))

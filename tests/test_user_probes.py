"""What a new user's mistakes and first commands get: one clear line for a device this machine lacks
or a sampling value that is not a finite number, the right words, and no noise from libraries we call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hnet_core.cli import main as hnet_main
from hnet_core.backends import available_devices, check_device
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams

from conftest import FIXTURE_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
NODE = shutil.which("node")


def one_line_error(result, expected: str) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines[-1] == f"Error: {expected}", result.output
    assert "Traceback" not in result.output


# -- --device -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "bogus"])
@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "hi", "-m", "2"],
    ["eval", "--data", os.path.join(REPO, "pyproject.toml")],
    ["cache-prompt", "--prompt-file", os.path.join(REPO, "pyproject.toml"), "--out", "never.safetensors"],
])
def test_a_device_this_machine_lacks_is_one_line_naming_the_available_ones(tmp_path, command, device):
    available = available_devices("torch")
    if device in available:
        pytest.skip(f"this machine has {device}")
    result = CliRunner().invoke(hnet_main, [*command, "--device", device])
    why = "is not a torch device" if device == "bogus" else "is not available here"
    one_line_error(result, f"--device {device} {why}; available here for the torch backend: {', '.join(available)}")
    assert not (tmp_path / "never.safetensors").exists()


def test_training_checks_its_device_the_same_way(tmp_path):
    from hnet_torch.train import init_distributed

    if "mps" in available_devices("torch"):
        pytest.skip("this machine has mps")
    with pytest.raises(HNetError, match="--device mps is not available here; available here for the torch backend"):
        init_distributed("mps")


def test_onnx_and_mlx_devices_are_checked_against_their_frameworks():
    assert check_device("onnx", "cpu") == "cpu" and check_device("onnx", None) is None
    with pytest.raises(HNetError, match="--device tpu is not a onnx device; available here for the onnx backend: auto, cpu"):
        check_device("onnx", "tpu")
    pytest.importorskip("mlx.core")
    if "gpu" not in available_devices("mlx"):
        with pytest.raises(HNetError, match="--device gpu is not available here; available here for the mlx backend: cpu"):
            check_device("mlx", "gpu")


# -- sampling values --------------------------------------------------------------------------------

NON_FINITE = [
    ("--temperature", "inf", "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ("--temperature", "nan", "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--top-p", "nan", "top_p must be in (0, 1] (1 = off), got nan"),
    ("--min-p", "inf", "min_p must be in [0, 1) (0 = off), got inf"),
    ("--repetition-penalty", "inf", "repetition_penalty must be a finite number > 0 (1 = off), got inf"),
]


@pytest.mark.parametrize("flag, value, message", NON_FINITE)
def test_non_finite_sampling_values_are_refused_by_the_cli(flag, value, message):
    one_line_error(CliRunner().invoke(hnet_main, ["generate", "--prompt", "hi", "-m", "2", flag, value]), message)


@pytest.mark.parametrize("flag, value, message", NON_FINITE)
def test_non_finite_sampling_values_are_refused_by_the_python_api(flag, value, message):
    with pytest.raises(HNetError) as e:
        SamplingParams(**{flag[2:].replace("-", "_"): float(value)})
    assert str(e.value) == message


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("flag, value, message", NON_FINITE + [
    ("--max-tokens", "-5", "--max-tokens must be >= 0, got -5"), ("-m", "-5", "--max-tokens must be >= 0, got -5")])
def test_node_cli_gives_the_same_line(flag, value, message):
    """Before any model is read: the directory does not even exist."""
    proc = subprocess.run([NODE, os.path.join(REPO, "export", "js", "cli.mjs"), "--model", "/nonexistent",
                           "--prompt", "hi", flag, value], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"Error: {message}", proc.stderr


# -- words --------------------------------------------------------------------------------------


def test_eval_on_an_empty_file_says_evaluation_needs_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = CliRunner().invoke(hnet_main, ["eval", "--data", str(empty)])
    one_line_error(result, f"data {empty} is empty; evaluation needs at least one byte of text")


def test_a_legacy_pt_with_torch_installed_is_told_how_to_resave_it(tmp_path):
    torch = pytest.importorskip("torch")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    from hnet_core.torch_zip import read_state_dict

    with pytest.raises(HNetError) as e:
        read_state_dict(str(legacy))
    assert "pip install torch" not in str(e.value)
    assert "re-save it in the zip format once with torch" in str(e.value)


def test_the_chunk_page_names_the_bundled_model(tmp_path):
    pytest.importorskip("mlx.core")
    from hnet_mlx.cli import main as mlx_main

    page = tmp_path / "chunks.html"
    result = CliRunner().invoke(mlx_main, ["chunks", "--text", "Hello there", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "<title>H-Net chunks (bundled demo model)</title>" in page.read_text()


# -- noise --------------------------------------------------------------------------------------


def test_help_prints_no_blas_hint():
    """HNET_MLX_BLAS naming a missing library makes hnet_mlx print a line on import; --help imports
    the command modules to list them and must stay quiet."""
    proc = subprocess.run([sys.executable, "-m", "hnet_core.cli", "--help"], capture_output=True, text=True,
                          env=dict(ENV, HNET_MLX_BLAS="/nonexistent/libblas.so"), timeout=120)
    assert proc.returncode == 0 and "convert" in proc.stdout
    assert proc.stderr == ""


def test_mlx_lm_tokenizer_loading_has_no_model_type_warning():
    pytest.importorskip("mlx_lm")
    code = ("import hnet_mlx.mlx_lm_model; from mlx_lm.utils import load_tokenizer; from pathlib import Path; "
            "load_tokenizer(Path('hnet_core/demo_model'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "You are using a model of type" not in proc.stderr


TRACE_TINY = """
import torch
from hnet_export.tracing import trace as _trace
from hnet_export.layout import TensorSpec

class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2

_trace(Double(), [TensorSpec("x", "float32", [2, 3], "in")], [TensorSpec("y", "float32", [2, 3], "out")], 18, None)
"""


def test_onnx_tracing_hides_the_torchvision_notes():
    """torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (and 15 more) the first
    time a process exports; H-Net uses no torchvision op."""
    pytest.importorskip("onnx")
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: torch.onnx has nothing to say about it")
    proc = subprocess.run([sys.executable, "-c", TRACE_TINY], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr

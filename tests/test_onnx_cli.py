"""`hnet export onnx` user mistakes: one-line errors, no traceback, nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURE_DIR, config_2stage
from hnet_core.cli import main as hnet_main
from hnet_core.errors import HNetError
from hnet_export.exporter import export_model
from hnet_torch import HNetForCausalLM

MODEL = os.path.join(FIXTURE_DIR, "model.pt")
CONFIG = os.path.join(FIXTURE_DIR, "config.json")


def run(*args: str):
    return CliRunner().invoke(hnet_main, ["export", "onnx", *args])


def test_export_group_lists_the_onnx_command():
    result = CliRunner().invoke(hnet_main, ["export", "--help"])
    assert result.exit_code == 0 and "onnx" in result.output
    result = run("--help")
    assert result.exit_code == 0
    for flag in ("--model", "--config", "--out", "--opset", "--dtype", "--max-seqlen", "--batch-variants", "--quantize",
                 "--block-size", "--force"):
        assert flag in result.output


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model.pt"], "model not found"),
    (["--model", MODEL, "--config", CONFIG, "--opset", "7"], "--opset must be between"),
    (["--model", MODEL, "--config", CONFIG, "--max-seqlen", "1"], "--max-seqlen must be at least 2"),
    (["--model", MODEL, "--config", "/nonexistent/config.json"], "config file not found"),
    (["--model", MODEL, "--config", CONFIG, "--quantize", "int3"], "--quantize must be one of int8, int4"),
    (["--model", MODEL, "--config", CONFIG, "--quantize", "int4", "--block-size", "24"], "--block-size for --quantize int4"),
    (["--model", MODEL, "--config", CONFIG, "--quantize", "int8", "--block-size", "8"], "--block-size for --quantize int8"),
    (["--model", MODEL, "--config", CONFIG, "--block-size", "32"], "--block-size only applies with --quantize"),
    (["--model", MODEL, "--config", CONFIG, "--quantize", "int4", "--dtype", "float16"], "drop --dtype float16"),
])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run(*args, "--out", str(out))
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind either


@pytest.mark.parametrize("args", [["--dtype", "bfloat16"], ["--max-seqlen", "0"]])
def test_invalid_option_values_are_usage_errors(tmp_path, args):
    result = run("--model", MODEL, "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_wrong_config_or_broken_checkpoint_is_reported(tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(config_2stage().to_dict()))
    result = run("--model", MODEL, "--config", str(wrong), "--out", str(tmp_path / "o1"))
    assert result.exit_code == 1 and "config" in result.output and "Traceback" not in result.output
    broken = tmp_path / "broken.pt"
    broken.write_bytes(open(MODEL, "rb").read()[:5000])
    result = run("--model", str(broken), "--config", CONFIG, "--out", str(tmp_path / "o2"))
    assert result.exit_code == 1 and "cannot read" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_existing_output_needs_force_and_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("--model", MODEL, "--config", CONFIG, "--out", str(out))
    assert result.exit_code == 1 and "--force" in result.output
    assert os.listdir(out) == ["keep.txt"]


def test_bfloat16_models_are_refused_before_tracing(tmp_path):
    model = HNetForCausalLM(config_2stage(), dtype=torch.bfloat16)
    with pytest.raises(HNetError, match="float32 and float16"):
        export_model(model, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()

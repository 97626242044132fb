"""What every command does with what a new user types: prompt bytes that are not UTF-8, output paths
that cannot be written, a missing --model (the bundled demo model) and a training run directory
given as --model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import hnet_torch
from conftest import TEXT, config_1stage
from hnet_core import checkpoint
from hnet_core.backends import DEMO_MODEL
from hnet_core.cli import main as hnet_main
from hnet_core.errors import HNetError
from hnet_mlx.cli import main as mlx_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RAW = b"\xff\xfe caf\xc3"  # not UTF-8: the bytes of the example
ARGV = os.fsdecode(RAW)  # how Python hands those argv bytes to click (surrogate escapes)


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def greedy_torch(prompt: bytes, n: int) -> str:
    model = hnet_torch.load_pretrained(DEMO_MODEL)
    return hnet_torch.generate(model, prompt, max_tokens=n, temperature=0)


# -- prompt bytes ------------------------------------------------------------------------------


def test_invalid_utf8_prompt_from_argv_reaches_the_model_as_its_bytes():
    expected = greedy_torch(RAW, 12)
    result = CliRunner().invoke(hnet_main, ["generate", "--prompt", ARGV, "-m", "12", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    result = CliRunner().invoke(mlx_main, ["generate", "--prompt", ARGV, "-m", "12", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"  # the demo model in float32 on MLX: the same greedy bytes


def test_invalid_utf8_prompt_from_stdin_and_batch_file_pass_through(tmp_path):
    expected = greedy_torch(RAW, 6)
    result = CliRunner().invoke(hnet_main, ["generate", "--prompt", "-", "-m", "6", "--temp", "0"], input=RAW)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    batch = tmp_path / "prompts.txt"
    batch.write_bytes(RAW + b"\n")
    result = CliRunner().invoke(mlx_main, ["generate", "--batch", str(batch), "-p", "x", "-m", "6", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert "=== [1] '\ufffd\ufffd caf\ufffd'\n" + expected + "\n" in result.stdout


def test_chunks_segments_the_argv_bytes():
    result = CliRunner().invoke(mlx_main, ["chunks", "--text", ARGV])
    assert result.exit_code == 0, result.output
    assert "stage 0:" in result.stdout


@pytest.mark.slow  # a fresh interpreter importing torch; the in-process tests above cover the same path
def test_a_real_process_with_invalid_utf8_argv_does_not_crash():
    # The exact case: bytes in argv, decoded by Python itself (not click's test runner).
    args = [sys.executable, "-m", "hnet_core.cli", "generate", "--prompt", RAW, "-m", "4", "--temp", "0",
            "--stop", RAW[:2]]
    done = subprocess.run(args, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    assert done.stdout.decode("utf-8") == greedy_torch(RAW, 4) + "\n"


# -- output paths ------------------------------------------------------------------------------


@pytest.fixture
def blocked(tmp_path):
    """A path below a regular file: impossible to create, like /etc/passwd/x."""
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "x"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("m") / "model"
    torch.manual_seed(0)
    model = hnet_torch.HNetForCausalLM(config_1stage())
    model.init_weights()
    hnet_torch.save_pretrained(model, directory)
    return str(directory)


def test_export_to_an_impossible_path_is_one_line_and_writes_nothing(blocked, small_model):
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", small_model, "--out", str(blocked)])
    one_line_error(result, f"cannot write output directory {blocked}: {blocked.parent} is a file, not a directory")
    assert os.listdir(blocked.parent.parent) == ["file"]
    if os.path.isfile("/etc/passwd"):  # the issue's own example
        result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", small_model, "--out", "/etc/passwd/x"])
        one_line_error(result, "/etc/passwd is a file, not a directory")


@pytest.mark.parametrize("command", [
    ["convert", "torch-to-mlx", "MODEL", "OUT"],
    ["convert", "mlx-to-torch", "MODEL", "OUT"],
    ["train", "--config", "CONFIG", "--data", "DATA", "--out", "OUT", "--steps", "1"],
    ["data", "prepare", "DATA", "OUT/t.bin"],
])
def test_hnet_commands_refuse_impossible_outputs_in_one_line(command, blocked, small_model, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    names = {"MODEL": small_model, "OUT": str(blocked), "DATA": str(data), "CONFIG": os.path.join(small_model, "config.json")}
    args = [names.get(a, a) for a in command]
    args = [a.replace("OUT/", str(blocked) + "/") for a in args]
    result = CliRunner().invoke(hnet_main, args)
    one_line_error(result, f"{blocked.parent} is a file, not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file", "text.txt"]


def test_mlx_commands_refuse_impossible_outputs_in_one_line(blocked, tmp_path, small_model):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    result = CliRunner().invoke(mlx_main, ["chunks", "--text", "hello", "--html", str(blocked)])
    one_line_error(result, f"cannot write --html page {blocked}: {blocked.parent} is a file")
    result = CliRunner().invoke(mlx_main, ["train", "--config", os.path.join(small_model, "config.json"), "--data",
                                           str(data), "--out", str(blocked), "--steps", "1"])
    one_line_error(result, f"cannot write run directory {blocked}")
    assert sorted(os.listdir(tmp_path)) == ["file", "text.txt"]
    result = CliRunner().invoke(mlx_main, ["chunks", "--text", "hello", "--html", str(tmp_path / "new" / "p.html")])
    assert result.exit_code == 0 and (tmp_path / "new" / "p.html").exists()  # missing directories are created


def test_plot_to_an_impossible_path_is_one_line(tmp_path, blocked):
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.METRICS_NAME).write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    result = CliRunner().invoke(hnet_main, ["plot", str(run), "--out", str(blocked)])
    one_line_error(result, f"cannot write plot {blocked}: {blocked.parent} is a file")


# -- the bundled model by default ----------------------------------------------------------------


def test_eval_defaults_to_the_bundled_model_in_both_clis(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    reports = []
    for main, args in ((hnet_main, ["eval"]), (mlx_main, ["eval"])):
        result = CliRunner().invoke(main, [*args, "--data", str(data), "--json"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["model"] == reports[1]["model"] == DEMO_MODEL
    assert reports[0]["bytes"] == reports[1]["bytes"] == len(TEXT)
    assert abs(reports[0]["bits_per_byte"] - reports[1]["bits_per_byte"]) < 1e-4
    assert reports[0]["bits_per_byte"] < 3.5  # the demo model knows English


def test_export_defaults_to_the_bundled_model(monkeypatch, tmp_path):
    import hnet_export.exporter as exporter

    seen = {}

    def fake_export(model_path, out_dir, **kw):
        seen["model"] = model_path
        raise HNetError("stopped before exporting")

    monkeypatch.setattr(exporter, "export_onnx", fake_export)
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--out", str(tmp_path / "o")])
    one_line_error(result, "stopped before exporting")
    assert seen["model"] == DEMO_MODEL


def test_onnx_eval_still_needs_an_export_directory(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    result = CliRunner().invoke(hnet_main, ["eval", "--backend", "onnx", "--data", str(tmp_path / "t.txt")])
    one_line_error(result, "--backend onnx needs --model")


# -- a training run directory as --model ----------------------------------------------------------


def _run_dir(root, small_model, final: bool):
    run = root / "run"
    for step in (5, 10):
        ckpt = checkpoint.step_dir(str(run), step)
        hnet_torch.save_pretrained(hnet_torch.load_pretrained(small_model), ckpt)
        with open(os.path.join(ckpt, checkpoint.STATE_NAME), "w") as f:
            json.dump({"step": step}, f)
    (run / checkpoint.TRAIN_CONFIG_NAME).write_text("{}")
    if final:
        hnet_torch.save_pretrained(hnet_torch.load_pretrained(small_model), run / checkpoint.FINAL_MODEL)
    return run


def test_a_run_directory_loads_its_final_model_else_its_newest_checkpoint(tmp_path, small_model, capsys):
    run = _run_dir(tmp_path, small_model, final=False)
    newest = checkpoint.step_dir(str(run), 10)
    assert checkpoint.resolve_model_path(str(run)) == newest
    assert f"using the newest checkpoint of run {run} (no final model yet): {newest}" in capsys.readouterr().err
    hnet_torch.load_pretrained(str(run))
    assert newest in capsys.readouterr().err
    hnet_torch.save_pretrained(hnet_torch.load_pretrained(small_model), run / checkpoint.FINAL_MODEL)
    assert checkpoint.resolve_model_path(str(run)) == str(run / "model")
    assert f"using the final model of run {run}: {run / 'model'}" in capsys.readouterr().err
    assert checkpoint.resolve_model_path(small_model) == small_model  # a model directory is itself
    assert capsys.readouterr().err == ""


def test_every_cli_accepts_a_run_directory_and_says_which_weights(tmp_path, small_model):
    run = _run_dir(tmp_path, small_model, final=True)
    (tmp_path / "t.txt").write_text(TEXT)
    taken = f"using the final model of run {run}"
    for main, args in (
        (hnet_main, ["generate", "--model", str(run), "-p", "Hi", "-m", "3"]),
        (mlx_main, ["generate", "--model", str(run), "-p", "Hi", "-m", "3"]),
        (hnet_main, ["eval", "--model", str(run), "--data", str(tmp_path / "t.txt"), "--json"]),
        (mlx_main, ["eval", "--model", str(run), "--data", str(tmp_path / "t.txt"), "--json"]),
        (mlx_main, ["chunks", "--model", str(run), "--text", "Hello"]),
        (hnet_main, ["convert", "torch-to-mlx", str(run), str(tmp_path / "mlx")]),
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
        assert taken in result.stderr, (args, result.stderr)


def test_a_run_without_weights_yet_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.TRAIN_CONFIG_NAME).write_text("{}")
    result = CliRunner().invoke(hnet_main, ["generate", "--model", str(run), "-p", "x", "-m", "1"])
    one_line_error(result, "is a training run directory with no final model (model/) and no complete checkpoint")


def test_hnet_core_imports_no_framework_outside_the_registry_and_clis():
    import ast

    import hnet_core

    frameworks = ("torch", "mlx", "hnet_torch", "hnet_mlx", "hnet_export", "onnxruntime")
    root = os.path.dirname(hnet_core.__file__)
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name in ("backends.py", "cli.py"):
            continue
        tree = ast.parse(open(os.path.join(root, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for module in modules:
                assert module.split(".")[0] not in frameworks, f"hnet_core/{name} imports {module}"

"""`hnet eval` / `hnet-mlx eval`: sliding windows, bits per byte, backends agree, JSON, errors; `hnet plot`."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

import hnet_torch
from conftest import TEXT, config_1stage, config_2stage
from hnet_core.errors import HNetError
from hnet_core.evaluate import eval_command, evaluate, make_forward, plan_windows
from hnet_core.tokenizer import encode


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval") / "model"
    torch.manual_seed(0)
    model = hnet_torch.HNetForCausalLM(config_2stage())
    model.init_weights()
    hnet_torch.save_pretrained(model, directory)
    return str(directory)


@pytest.mark.parametrize("n,window,stride", [(2, 4, 2), (10, 4, 1), (100, 16, 8), (101, 16, 15), (17, 16, 8)])
def test_windows_score_every_byte_once_with_enough_context(n, window, stride):
    plan = plan_windows([n], window, stride)
    scored = []
    for w in plan:
        assert w.end - w.start <= window and w.start < w.score_from <= w.end
        if w.start > 0:
            assert w.score_from - w.start >= window - stride  # context before the first scored target
        scored += range(w.score_from, w.end)
    assert scored == list(range(1, n))


def test_bad_window_settings_are_errors():
    with pytest.raises(HNetError, match="--stride"):
        plan_windows([10], 8, 8)
    with pytest.raises(HNetError, match="--window"):
        plan_windows([10], 1, 1)


def test_one_window_bits_per_byte_equal_the_plain_cross_entropy(tmp_path, model_dir):
    (tmp_path / "t.txt").write_text(TEXT)
    report = evaluate(make_forward("torch", model_dir), str(tmp_path / "t.txt"), window=1024)
    model = hnet_torch.load_pretrained(model_dir)
    ids = torch.tensor([encode(TEXT)])
    with torch.no_grad():
        out = model(ids)
    ce = float(hnet_torch.next_byte_loss(out.logits, ids))
    assert report.bytes == len(TEXT.encode()) and report.windows == 1
    assert abs(report.bits_per_byte - ce / math.log(2)) < 1e-5
    rates = [float(r.boundary_mask.float().sum()) for r in out.routing]
    assert abs(report.compression_ratios[0] - ids.shape[1] / rates[0]) < 1e-9
    assert abs(report.compression_ratios[1] - rates[0] / rates[1]) < 1e-9


def test_documents_are_scored_separately_and_max_bytes_caps(tmp_path, model_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXT[:50]}) + "\n" + json.dumps({"text": TEXT[50:120]}) + "\n")
    forward = make_forward("torch", model_dir)
    report = evaluate(forward, str(tmp_path / "d.jsonl"), window=32, stride=16)
    assert report.documents == 2 and report.bytes == 120
    capped = evaluate(forward, str(tmp_path / "d.jsonl"), window=32, stride=16, max_bytes=60)
    assert capped.documents == 2 and capped.bytes == 60


def test_torch_and_mlx_backends_agree(tmp_path, model_dir):
    pytest.importorskip("mlx.core")
    (tmp_path / "t.txt").write_text(TEXT * 2)
    a = evaluate(make_forward("torch", model_dir), str(tmp_path / "t.txt"), window=96, stride=48)
    b = evaluate(make_forward("mlx", model_dir), str(tmp_path / "t.txt"), window=96, stride=48)
    assert a.bytes == b.bytes
    assert abs(a.bits_per_byte - b.bits_per_byte) < 1e-4
    assert a.compression_ratios == b.compression_ratios  # identical boundary decisions


@pytest.mark.slow
def test_onnx_backend_agrees_with_torch(tmp_path, model_dir):
    """The same evaluation through the exported ONNX model (hnet export onnx, then OnnxHNet.prefill).
    Slow: the export alone takes about 2 minutes on this machine."""
    # Skip only when an optional dependency is not installed; any other import failure is a bug to report.
    missing = [m for m in ("onnx", "onnx_ir", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the onnx extra is not installed (missing {', '.join(missing)})")
    from hnet_export.cli import export
    onnx_dir = tmp_path / "onnx"
    result = CliRunner().invoke(export, ["onnx", "--model", model_dir, "--out", str(onnx_dir)])
    assert result.exit_code == 0, result.output
    (tmp_path / "t.txt").write_text(TEXT)
    a = evaluate(make_forward("torch", model_dir), str(tmp_path / "t.txt"), window=64, stride=32)
    b = evaluate(make_forward("onnx", str(onnx_dir), device="cpu"), str(tmp_path / "t.txt"), window=64, stride=32)
    assert a.bytes == b.bytes
    assert abs(a.bits_per_byte - b.bits_per_byte) < 1e-4
    assert a.compression_ratios == b.compression_ratios


def test_eval_json_output_has_the_documented_keys(tmp_path, model_dir):
    (tmp_path / "t.txt").write_text(TEXT)
    result = CliRunner().invoke(eval_command, ["--backend", "torch", "--model", model_dir, "--data",
                                               str(tmp_path / "t.txt"), "--max-bytes", "100", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bytes"] == 100
    assert len(report["compression_ratios"]) == 2 and report["bytes_per_second"] > 0
    assert 0 < report["bits_per_byte"] < 16


def test_mlx_eval_command(tmp_path, model_dir):
    pytest.importorskip("mlx.core")
    from hnet_mlx.evaluate import eval_command as mlx_eval

    (tmp_path / "t.txt").write_text(TEXT)
    result = CliRunner().invoke(mlx_eval, ["--model", model_dir, "--data", str(tmp_path / "t.txt"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes"] == len(TEXT.encode())


def test_eval_errors(tmp_path, model_dir):
    (tmp_path / "empty.txt").write_text("")
    runner = CliRunner()
    result = runner.invoke(eval_command, ["--model", str(tmp_path / "nope"), "--data", str(tmp_path / "empty.txt")])
    assert "model not found" in str(result.exception)
    result = runner.invoke(eval_command, ["--model", model_dir, "--data", str(tmp_path / "empty.txt")])
    assert "is empty" in str(result.exception)


# -- plot --------------------------------------------------------------------------------------


def test_plot_writes_a_png_of_a_run(tmp_path):
    from hnet_core.plot import plot_command
    from hnet_torch.train import train
    from hnet_core.train_config import TrainConfig

    config_1stage().to_json(tmp_path / "c.json")
    (tmp_path / "t.txt").write_text(TEXT * 3)
    tc = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup=1, log_every=1, eval_every=2, save_every=100,
                     val_fraction=0.2)
    train(str(tmp_path / "c.json"), None, str(tmp_path / "t.txt"), str(tmp_path / "run"), tc, show_progress=False)
    result = CliRunner().invoke(plot_command, [str(tmp_path / "run"), "--smooth", "2"])
    assert result.exit_code == 0, result.output
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    result = CliRunner().invoke(plot_command, [str(tmp_path / "missing")])
    assert "no metrics log" in str(result.exception)

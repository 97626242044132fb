"""Every file and directory our tools write gets the permissions a plain open()/mkdir would give
(0666/0777 less the umask), whichever writer made it: temporary names (mkstemp/mkdtemp, and
safetensors' own temporary file in torch's save_file) start private and must not stay so."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from conftest import FIXTURE_DIR, TEXT, config_1stage, wrong_modes

UMASK = 0o027  # not the usual 022, so "respects the umask" and "is not private" are both visible
PT = os.path.join(FIXTURE_DIR, "model.pt")
CFG = os.path.join(FIXTURE_DIR, "config.json")


@pytest.fixture
def umask():
    before = os.umask(UMASK)
    yield UMASK
    os.umask(before)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_every_writer_gives_normal_umask_respecting_permissions(tmp_path, umask, one_torch_thread):
    """One test over every writer: save_pretrained (both backends), convert (both directions), data
    prepare, both trainers (checkpoints, metrics, final model), LoRA finetune and fuse, plot, chunks
    --html. Written under a fresh directory `out`, then every path below it is checked. (The ONNX
    exporter, minutes here, is checked on the export that tests/test_onnx_fixture.py makes anyway.)"""
    import hnet_mlx
    import hnet_torch
    from hnet_core.cli import main as hnet
    from hnet_mlx.cli import main as hnet_mlx_cli

    out = tmp_path / "out"
    out.mkdir()  # by us, with the umask: checked like the rest
    text = out / "text.txt"
    text.write_text(TEXT * 3)
    config_1stage().to_json(out / "small.json")
    model = hnet_torch.load_pretrained(PT, config=CFG)
    hnet_torch.save_pretrained(model, out / "torch_saved")
    hnet_mlx.save_pretrained(hnet_mlx.load(out / "torch_saved")[0], out / "mlx_saved")
    ok(CliRunner().invoke(hnet, ["convert", "torch-to-mlx", PT, str(out / "to_mlx"), "--config", CFG]))
    ok(CliRunner().invoke(hnet, ["convert", "mlx-to-torch", str(out / "to_mlx"), str(out / "to_torch")]))
    ok(CliRunner().invoke(hnet, ["data", "prepare", str(text), str(out / "corpus.bin")]))
    steps = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--save-every", "1", "--eval-every", "1",
             "--val-fraction", "0.2", "--warmup", "1"]
    ok(CliRunner().invoke(hnet, ["train", "--config", str(out / "small.json"), "--data", str(text), "--out",
                                 str(out / "run_torch"), "--threads", "1", *steps]))
    ok(CliRunner().invoke(hnet_mlx_cli, ["train", "--config", str(out / "small.json"), "--data", str(out / "corpus.bin"),
                                         "--out", str(out / "run_mlx"), *steps]))
    ok(CliRunner().invoke(hnet_mlx_cli, ["finetune", "--model", str(out / "run_mlx" / "model"), "--data", str(text),
                                         "--out", str(out / "lora"), "--lora", "--lora-rank", "2", *steps]))
    ok(CliRunner().invoke(hnet_mlx_cli, ["fuse", "--adapters", str(out / "lora"), "--out", str(out / "fused")]))
    ok(CliRunner().invoke(hnet, ["plot", str(out / "run_torch")]))
    ok(CliRunner().invoke(hnet_mlx_cli, ["chunks", "--model", str(out / "to_mlx"), "--text", "Hello there",
                                         "--html", str(out / "chunks.html")]))
    written = sorted(os.listdir(out))
    for name in ("torch_saved", "mlx_saved", "to_mlx", "to_torch", "corpus.bin", "run_torch", "run_mlx", "lora",
                 "fused", "chunks.html"):
        assert name in written, name
    for run in ("run_torch", "run_mlx"):
        assert {"model", "checkpoints", "metrics.jsonl"} <= set(os.listdir(out / run)), run
    assert (out / "run_torch" / "curves.png").exists() and (out / "lora" / "adapters").is_dir()
    assert wrong_modes(out, UMASK) == []

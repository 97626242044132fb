"""The bundled model's cached ONNX export (export/cache.py): built once with a progress line, reused,
rebuilt when the weights change; `hnet generate --backend onnx` without --model runs from it."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from hnet_core.cli import main as hnet_main
from hnet_export import cache


@pytest.fixture
def demo_copy(tmp_path, monkeypatch):
    """A private copy of the bundled model, and an empty cache directory."""
    model = tmp_path / "demo"
    shutil.copytree(cache.DEMO_MODEL, model)
    monkeypatch.setattr(cache, "DEMO_MODEL", str(model))
    monkeypatch.setenv("HNET_CACHE", str(tmp_path / "cache"))
    return model


@pytest.fixture
def fake_exports(monkeypatch):
    """export_model replaced by one that logs like the real one and writes only export.json."""
    import hnet_export.exporter as exporter

    built = []

    def export_model(model, out_dir, log=None, **_):
        os.makedirs(out_dir)
        for name in ("prefill", "extend", "step", "step_cond"):
            log(f"exporting {name}.onnx ...")
        with open(os.path.join(out_dir, "export.json"), "w") as f:
            json.dump({}, f)
        built.append(out_dir)

    monkeypatch.setattr(exporter, "export_model", export_model)
    return built


def test_first_use_builds_with_progress_and_later_uses_reuse_it(demo_copy, fake_exports, capsys):
    first = cache.bundled_export()
    err = capsys.readouterr().err
    assert "building the bundled model's ONNX export once" in err and "4/4 done" in err and "step_cond.onnx" in err
    assert cache.bundled_export() == first and fake_exports == [first]
    assert first.startswith(os.environ["HNET_CACHE"])


def test_changed_weights_build_a_new_export_and_remove_the_stale_one(demo_copy, fake_exports):
    first = cache.bundled_export()
    weights = demo_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    second = cache.bundled_export()
    assert second != first and not os.path.exists(first) and fake_exports == [first, second]


def test_the_key_follows_the_exporter_code(demo_copy, monkeypatch):
    before = cache.export_key(str(demo_copy))
    real = cache._source_files

    def one_more_file(package):
        return real(package) + ([str(demo_copy / "config.json")] if package == "hnet_export" else [])

    monkeypatch.setattr(cache, "_source_files", one_more_file)
    assert cache.export_key(str(demo_copy)) != before


def test_generate_without_model_runs_the_cached_export(monkeypatch, official_onnx_export):
    asked = []
    monkeypatch.setattr(cache, "bundled_export", lambda: asked.append(1) or official_onnx_export)
    result = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--prompt", "Hello", "-m", "8",
                                            "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert asked == [1] and len(result.stdout) > 0

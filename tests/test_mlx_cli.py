"""`hnet-mlx generate` and `hnet-mlx chunks` with click's runner, including the error cases, and the
framework-free chunk segmentation behind `chunks`."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from hnet_core import HNetError
from hnet_core.chunks import byte_boundaries, chunk_counts, render_html, segment
from hnet_core.cli import main as hnet_main
from hnet_mlx.cli import main

from conftest import FIXTURE_DIR


@pytest.fixture(scope="module")
def mlx_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny-mlx"
    result = CliRunner().invoke(hnet_main, ["convert", "torch-to-mlx", f"{FIXTURE_DIR}/model.pt", str(out),
                                            "--config", f"{FIXTURE_DIR}/config.json"])
    assert result.exit_code == 0, result.output
    return str(out)


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_generate_streams_and_reports_stats(mlx_model):
    r = run("generate", "--model", mlx_model, "--prompt", "Hello", "-m", "12", "--seed", "0", "--verbose")
    assert r.exit_code == 0, r.output
    assert "Generation: 12 bytes" in r.stderr and "tokens per chunk" in r.stderr
    # MLX reports its allocator's peak, not the process's resident set as torch on CPU does: the line says so.
    assert re.search(r"Peak memory: \d+\.\d{3} GB \(peak memory allocated by MLX during generation\)", r.stderr)


def test_generate_greedy_matches_the_official_fixture(mlx_model):
    expected = np.load(f"{FIXTURE_DIR}/expected.npz")["gen.generated_ids"][:8]
    r = run("generate", "--model", mlx_model, "--prompt", "The old lighthouse keeper", "-m", "8", "--temp", "0")
    assert r.exit_code == 0, r.output
    assert r.stdout == bytes(expected.tolist()).decode("utf-8", errors="replace") + "\n"


def test_generate_batch_of_ragged_prompts(mlx_model, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a\nmuch longer prompt here\n")
    r = run("generate", "--model", mlx_model, "--batch", str(f), "-p", "mid", "-m", "6", "--temp", "0")
    assert r.exit_code == 0, r.output
    assert "=== [0] 'mid'" in r.stdout and "=== [2] 'much longer prompt here'" in r.stdout


def test_generate_max_tokens_zero_and_show_chunks(mlx_model):
    r = run("generate", "--model", mlx_model, "--prompt", "Hello", "--max-tokens", "0")
    assert r.exit_code == 0 and r.stdout == "\n"
    r = run("generate", "--model", mlx_model, "--prompt", "Hello", "-m", "5", "--show-chunks")
    assert r.exit_code == 0 and r.stdout.startswith("Hello")


@pytest.mark.parametrize("args, input, message", [
    (["generate", "--model", "nowhere", "--prompt", "x"], None, "not found"),
    (["generate", "--model", f"{FIXTURE_DIR}/model.pt", "--prompt", "x"], None, "convert it first"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--max-tokens", "-3"], None, "--max-tokens must be >= 0"),
    (["chunks", "--model", "MODEL"], None, "give exactly one of --text TEXT or --file PATH"),
    (["chunks", "--model", "MODEL", "--file", "missing.txt"], None, "file not found"),
    (["chunks", "--model", "MODEL", "--text", ""], None, "the text is empty"),
])
def test_errors_are_one_clear_line(mlx_model, args, input, message):
    r = run(*[mlx_model if a == "MODEL" else a for a in args], input=input)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output


def test_generate_without_model_uses_the_bundled_demo_model():
    r = run("generate", "--prompt", "It is a truth universally acknowledged", "-m", "40", "--temp", "0")
    assert r.exit_code == 0, r.output
    assert sum(c.isalpha() or c == " " for c in r.stdout) > 30  # the Austen demo writes letters and spaces


def test_a_missing_bundled_model_explains_how_to_get_one(tmp_path):
    from hnet_mlx.cli import resolve_model

    with pytest.raises(HNetError, match="bundled demo model is missing.*hnet convert torch-to-mlx"):
        resolve_model(None, bundled=str(tmp_path / "gone"))


def test_chunks_prints_stages_and_writes_html(mlx_model, tmp_path):
    page = tmp_path / "chunks.html"
    r = run("chunks", "--model", mlx_model, "--text", "The old lighthouse keeper — ünïcödé", "--html", str(page))
    assert r.exit_code == 0, r.output
    assert "stage 0:" in r.stdout and "bytes per chunk" in r.stdout
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<span") >= 3
    assert "Stage 0:" in html and "ü" in html


def test_byte_boundaries_lift_inner_stages_to_bytes():
    stage0 = np.array([1, 0, 1, 1, 0, 1], dtype=bool)  # chunks start at bytes 0, 2, 3, 5
    stage1 = np.array([1, 0, 1, 0], dtype=bool)  # over those 4 chunks: bytes 0 and 3
    b0, b1 = byte_boundaries([stage0, stage1])
    assert b0.tolist() == stage0.tolist()
    assert np.flatnonzero(b1).tolist() == [0, 3]


def test_chunk_counts_include_the_chunk_begun_at_bos():
    """The text's first bytes belong to the chunk that started at BOS unless byte 0 starts one: never 0 chunks."""
    assert chunk_counts([np.array([0, 0, 1, 0], dtype=bool), np.zeros(4, dtype=bool)]) == [2, 1]
    assert chunk_counts([np.array([1, 0, 1, 0], dtype=bool)]) == [2]
    seg = segment(b"abcd", [np.zeros(4, dtype=bool)])
    assert seg.chunks(0) == ["abcd"] and seg.compression_ratios([np.zeros(4, dtype=bool)]) == [4.0]


def test_segmentation_never_splits_a_character():
    data = "aé€b".encode()  # 1 + 2 + 3 + 1 bytes
    bounds = np.zeros(len(data), dtype=bool)
    bounds[[0, 2, 4, 6]] = True  # byte 2 is inside 'é', byte 4 inside '€'
    seg = segment(data, [bounds])
    assert seg.chars == ["a", "é", "€", "b"]
    # a boundary on any byte of a character starts the chunk at that character
    assert seg.chunks(0) == ["a", "é", "€", "b"]
    bounds[[2, 4]] = False
    merged = segment(data, [bounds])
    assert merged.chunks(0) == ["aé€", "b"]
    page = render_html(merged, merged.compression_ratios([bounds]))
    assert page.count("<span") == 2


def test_help_lists_every_command_and_each_one_has_help():
    result = CliRunner().invoke(main, ["--help"], prog_name="hnet-mlx")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    for name in ("generate", "chunks", "train", "finetune", "fuse", "eval"):
        assert re.search(rf"^  {name} ", listed, re.M), name
        sub = CliRunner().invoke(main, [name, "--help"], prog_name="hnet-mlx")
        assert sub.exit_code == 0 and sub.output.startswith(f"Usage: hnet-mlx {name} "), (name, sub.output)

"""The JavaScript runtime (export/js) against the Python one: `node export/js/cli.mjs` prints byte for
byte what `hnet generate --backend onnx` prints (greedy and seeded, multi-byte UTF-8 prompts), its
routing outputs equal OnnxHNet's, bad exports are one-line errors, and the page written by
`hnet export onnx --web` generates the same text in headless chromium.

Skips (with the reason) where node/npm, or chromium + chromedriver + selenium are missing; the locked npm
packages are installed first when export/js/node_modules lacks them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from hnet_core.cli import main as hnet_main
from hnet_core.tokenizer import encode
from hnet_export import OnnxHNet

import browser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS_DIR = os.path.join(REPO, "export", "js")
CLI = os.path.join(JS_DIR, "cli.mjs")
NODE = shutil.which("node")

# Installs export/js's locked npm packages when they are missing (conftest.js_packages); skips without node/npm.
pytestmark = pytest.mark.usefixtures("js_packages")

# ASCII, 2-, 3- and 4-byte UTF-8 characters.
PROMPTS = ["The old lighthouse keeper", "Ünïcödé ☃ 日本語 — \"quoted\" 🎉 ", "naïve café, señor: "]


def node_generate(export_dir: str, prompt: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, CLI, "--model", export_dir, "--prompt", prompt, "--threads", "1", *args],
                          capture_output=True, timeout=300)


def python_generate(export_dir: str, prompt: str, *args: str) -> bytes:
    result = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", export_dir, "--prompt", prompt,
                                            "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def test_node_greedy_output_is_byte_identical_to_hnet_generate(official_onnx_export):
    args = ("--temperature", "0", "--max-tokens", "48")
    for prompt in PROMPTS:
        ours = node_generate(official_onnx_export, prompt, *args)  # batch 1: step_cond.onnx, as Python picks
        assert ours.returncode == 0, ours.stderr.decode()
        assert ours.stdout == python_generate(official_onnx_export, prompt, *args), prompt
        assert len(ours.stdout) > 1
    where = node_generate(official_onnx_export, PROMPTS[-1], *args, "--step-variant", "where")
    assert where.stdout == ours.stdout


def test_node_seeded_sampling_is_byte_identical_to_hnet_generate(official_onnx_export):
    # Node's sampler draws numpy's PCG64 stream with numpy's arithmetic, so seeded runs match too.
    flag_sets = [
        ("--temperature", "1.0", "--seed", "0"),
        ("--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"),
        ("--temperature", "1.2", "--min-p", "0.05", "--repetition-penalty", "1.3", "--seed", "123456789012"),
        ("--temperature", "1.0", "--seed", "3", "--stop", "e"),
    ]
    for flags in flag_sets:
        args = (*flags, "--max-tokens", "64")
        ours = node_generate(official_onnx_export, PROMPTS[2], *args)
        assert ours.returncode == 0, ours.stderr.decode()
        assert ours.stdout == python_generate(official_onnx_export, PROMPTS[2], *args), flags


ROUTING_SCRIPT = """
import { loadModel, streamGenerate } from %s;
const model = await loadModel(process.argv[1], { threads: 1 });
const steps = [];
for await (const step of streamGenerate(model, process.argv[2], { maxTokens: 24, temperature: 0 })) {
  steps.push({ byte: step.bytes[0], routing: step.routing.map((r) => ({
    mask: Array.from(r.boundaryMask), valid: Array.from(r.valid),
    prob: Array.from(r.boundaryProb, (p) => (Number.isNaN(p) ? null : p)) })) });
}
process.stdout.write(JSON.stringify(steps));
"""


def test_node_routing_outputs_match_onnxhnet(official_onnx_export):
    prompt = PROMPTS[1]
    script = ROUTING_SCRIPT % json.dumps("file://" + os.path.join(JS_DIR, "node.mjs"))
    run = subprocess.run([NODE, "--input-type=module", "-e", script, official_onnx_export, prompt],
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    steps = json.loads(run.stdout)
    model = OnnxHNet(official_onnx_export, provider="cpu", threads=1)
    outs = [model.prefill(np.array([encode(prompt)]))]
    for step in steps[:-1]:
        outs.append(model.step(np.array([[step["byte"]]])))
    assert len(steps) == 24
    for n, (step, out) in enumerate(zip(steps, outs)):
        assert step["byte"] == int(out.logits[0, -1].argmax()), n
        for ours, theirs in zip(step["routing"], out.routing):
            assert ours["mask"] == theirs.boundary_mask[0].astype(int).tolist(), n
            assert ours["valid"] == theirs.valid[0].astype(int).tolist(), n
            prob = np.array([np.nan if p is None else p for p in ours["prob"]], dtype=np.float32)
            np.testing.assert_allclose(prob, theirs.boundary_prob[0], atol=1e-5, equal_nan=True)
    assert any(s["routing"][0]["mask"] == [1] for s in steps[1:])  # decode steps do open chunks


def _copy_export(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1 and run.stdout == b""
    lines = run.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr.decode()
    return lines[0]


def test_node_refuses_missing_or_foreign_exports_with_one_line(official_onnx_export, tmp_path):
    assert "not found" in _one_line_error(node_generate(str(tmp_path / "missing"), "hi"))
    newer = _copy_export(official_onnx_export, tmp_path / "newer")
    meta = json.load(open(os.path.join(newer, "export.json")))
    meta["format_version"] = 2
    json.dump(meta, open(os.path.join(newer, "export.json"), "w"))
    assert "format 2" in _one_line_error(node_generate(newer, "hi"))
    swapped = _copy_export(official_onnx_export, tmp_path / "swapped")  # a graph that is not the one io.json lists
    shutil.copyfile(os.path.join(swapped, "step.onnx"), os.path.join(swapped, "prefill.onnx"))
    assert "does not match its io.json" in _one_line_error(node_generate(swapped, "hi"))
    future = _copy_export(official_onnx_export, tmp_path / "future")  # a graph needing a newer onnxruntime
    graph = onnx.load(os.path.join(future, "prefill.onnx"))
    graph.opset_import[0].version = 99
    onnx.save(graph, os.path.join(future, "prefill.onnx"))
    assert "cannot load" in _one_line_error(node_generate(future, "hi"))


def test_web_export_needs_onnxruntime_web_and_a_float32_export(official_onnx_export, tmp_path, monkeypatch):
    import hnet_export.web as web

    monkeypatch.setattr(web, "ORT_WEB_DIST", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", official_onnx_export, "--web", str(tmp_path / "site")])
    assert result.exit_code == 1 and "npm ci" in result.output and len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "site")
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", official_onnx_export])
    assert result.exit_code == 1 and "--web" in result.output
    monkeypatch.undo()
    half = _copy_export(official_onnx_export, tmp_path / "half")  # onnxruntime-web 1.30 cannot load float16 graphs
    meta = json.load(open(os.path.join(half, "export.json")))
    json.dump({**meta, "dtype": "float16"}, open(os.path.join(half, "export.json"), "w"))
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", half, "--web", str(tmp_path / "site")])
    assert result.exit_code == 1 and "float32" in result.output and not os.path.exists(tmp_path / "site")


def test_web_page_generates_the_same_text_in_chromium(official_onnx_export, tmp_path):
    if browser.missing():
        pytest.skip(browser.missing())
    from selenium.webdriver.common.by import By

    # The page fetches the prefill graph's weights from weights.onnx.data, as for a model of 64 MiB or more.
    export = _copy_export(official_onnx_export, tmp_path / "external")
    prefill = onnx.load(os.path.join(export, "prefill.onnx"))
    onnx.save_model(prefill, os.path.join(export, "prefill.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.onnx.data", size_threshold=1024)
    meta = json.load(open(os.path.join(export, "export.json")))
    json.dump({**meta, "external_data": "weights.onnx.data"}, open(os.path.join(export, "export.json"), "w"))
    site = str(tmp_path / "site")
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", export, "--web", site])
    assert result.exit_code == 0, result.output
    assert {"index.html", "app.mjs", "hnet", "ort", "model"} <= set(os.listdir(site))
    assert os.path.exists(os.path.join(site, "model", "weights.onnx.data"))
    prompt = "Ünïcödé ☃ 日本語 — naïve "  # chromedriver types only BMP characters
    tokens = 40
    expected = python_generate(official_onnx_export, prompt, "--temperature", "0", "--max-tokens", str(tokens))
    assert node_generate(official_onnx_export, prompt, "--temperature", "0", "-m", str(tokens)).stdout == expected

    with browser.WebPage(site, tempfile.mkdtemp(dir=tmp_path), window="1100,700") as page:
        driver = page.driver
        url = f"http://127.0.0.1:{page.server.server_port}/index.html"

        def finished(state_wanted: str):
            state = page.wait((state_wanted, "error"), 240)
            assert state == state_wanted, page.element("status").text
            return page.element("status")

        # The address fills the fields and starts the generation (greedy here, to compare with Python).
        driver.get(f"{url}?{urllib.parse.urlencode({'prompt': prompt, 'bytes': tokens, 'temperature': 0})}&autorun=1")
        status = finished("done")
        assert page.element("prompt").get_attribute("value") == prompt
        assert page.element("top-p").get_attribute("value") == "0.95"  # the sampling default
        text = page.element("output").get_attribute("data-text")
        driver.save_screenshot(str(tmp_path / "web_page.png"))
        spans = [s.text for s in driver.find_elements(By.CSS_SELECTOR, "#output span")]
        assert "bytes/s" in status.text
        # A refused field replaces the previous answer with the error, in the output area itself.
        page.set_max_tokens(-5)
        page.element("generate").click()
        finished("error")
        output = page.element("output")
        assert output.text == "Error: bytes must be a whole number from 1 to 400, got -5"
        assert output.get_attribute("data-text") == "" and not driver.find_elements(By.CSS_SELECTOR, "#output span")
        driver.get(f"{url}?prompt=Hi&temperature=inf&autorun=1")
        finished("error")
        assert page.element("output").text == (
            "Error: temperature must be a finite number >= 0 (0 = greedy), got inf")
        driver.get(f"{url}?prompt=Hi&bytes=401&autorun=1")
        finished("error")
        assert "bytes must be a whole number from 1 to 400, got 401" in page.element("output").text
    assert (text + "\n").encode() == expected
    assert len(spans) > 3  # coloured by stage-0 chunks
    assert "".join(spans).endswith(text.strip())


@pytest.mark.slow
def test_node_greedy_output_is_byte_identical_on_the_bundled_model(tmp_path):
    from hnet_core.backends import DEMO_MODEL

    out = str(tmp_path / "demo_onnx")
    result = CliRunner().invoke(hnet_main, ["export", "onnx", "--model", DEMO_MODEL, "--out", out, "--max-seqlen", "512",
                                            "--batch-variants"])
    assert result.exit_code == 0, result.output
    for prompt in ["It is a truth universally acknowledged, that ", PROMPTS[1]]:
        args = ("--temperature", "0", "--max-tokens", "120")
        ours = node_generate(out, prompt, *args)
        assert ours.returncode == 0, ours.stderr.decode()
        assert ours.stdout == python_generate(out, prompt, *args), prompt

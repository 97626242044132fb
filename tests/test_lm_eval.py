"""lm-evaluation-harness on our model directories, both ways users run it: `--model hf` (through
transformers remote code) and mlx-lm's lm-eval wrapper. Local tasks (tests/fixtures/lm_eval/*.yaml,
run from the repository root) keep it offline; every log-likelihood lm-eval reports must equal our
own per-byte log-probabilities (hnet_torch) on the same bytes, and bits per byte `hnet eval`'s."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

# offline: every model, tokenizer and data file here is local (read before transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from hnet_torch import generate as hnet_generate  # noqa: E402
from hnet_torch import load_pretrained, save_pretrained  # noqa: E402

from conftest import FIXTURE_DIR  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TASKS = os.path.join("tests", "fixtures", "lm_eval")
DEMO = os.path.join("hnet_core", "demo_model")
BOS = 254


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _run_hf(model_dir: str, tasks: list[str], batch_size: int = 4) -> dict:
    """Context tasks with add_bos_token=True (every text starts with BOS, as in training and in
    mlx_lm.evaluate); rolling tasks without it (lm-eval prefixes BOS itself there, and would score a
    second one)."""
    rolling = [t for t in tasks if "rolling" in t]
    context = [t for t in tasks if t not in rolling]
    runs = [(names, bos) for names, bos in ((context, True), (rolling, False)) if names]
    merged: dict = {"results": {}, "samples": {}}
    for names, bos in runs:
        args = f"pretrained={model_dir},trust_remote_code=True,dtype=float32,add_bos_token={bos}"
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=names, batch_size=batch_size, device="cpu",
                                      task_manager=TaskManager(include_path=TASKS, include_defaults=False), log_samples=True)
        merged["results"].update(out["results"])
        merged["samples"].update(out["samples"])
    return merged


def _logprob(model, context: str, continuation: str, bos: bool = True) -> float:
    """Our summed log-probability of `continuation`'s bytes after `context`'s (float32 logits)."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([([BOS] if bos else []) + ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
    targets = ids[0, 1:]
    picked = logp.gather(1, targets[:, None])[:, 0]
    return float(picked[-len(cont):].sum())


def _check_loglikelihoods(results: dict, model) -> int:
    """Every multiple-choice and rolling log-likelihood equals ours; returns how many were checked."""
    checked = 0
    for sample in results["samples"].get("hnet_tiny_mc", []):
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert resp[0][0] == pytest.approx(_logprob(model, context, continuation), abs=2e-4, rel=1e-5)
            checked += 1
    for sample in results["samples"].get("hnet_tiny_rolling", []):
        text = sample["arguments"][0][0]
        assert sample["resps"][0][0] == pytest.approx(_logprob(model, "", text), abs=2e-4, rel=1e-5)
        checked += 1
    return checked


def _hnet_eval_bits_per_byte(model_dir: str) -> float:
    cli = os.path.join(os.path.dirname(sys.executable), "hnet")
    out = subprocess.run([cli, "eval", "--model", model_dir, "--data", os.path.join(TASKS, "docs.jsonl"),
                          "--window", "4096", "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)["bits_per_byte"]


def test_lm_eval_hf_loglikelihoods_equal_ours_and_bits_per_byte_equal_hnet_eval():
    results = _run_hf(DEMO, ["hnet_tiny_mc", "hnet_tiny_rolling"])
    assert _check_loglikelihoods(results, load_pretrained(DEMO)) == 18 + 3
    rolling = results["results"]["hnet_tiny_rolling"]
    assert rolling["bits_per_byte,none"] == pytest.approx(_hnet_eval_bits_per_byte(DEMO), rel=1e-5)
    assert rolling["byte_perplexity,none"] == pytest.approx(2 ** rolling["bits_per_byte,none"], rel=1e-9)
    # acc_norm divides by characters, acc_bytes by UTF-8 bytes (the same for ASCII choices)
    by_bytes = by_chars = 0
    for sample in results["samples"]["hnet_tiny_mc"]:
        lls = [r[0][0] for r in sample["resps"]]
        choices = sample["doc"]["choices"]
        by_bytes += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i].encode())) == sample["target"]
        by_chars += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == sample["target"]
    n = len(results["samples"]["hnet_tiny_mc"])
    assert results["results"]["hnet_tiny_mc"]["acc_bytes,none"] == pytest.approx(by_bytes / n)
    assert results["results"]["hnet_tiny_mc"]["acc_norm,none"] == pytest.approx(by_chars / n)


@pytest.mark.slow
def test_lm_eval_hf_generate_until_equals_hnet_generate_on_the_official_fixture(tmp_path):
    model_dir = str(tmp_path / "official")
    save_pretrained(load_pretrained(FIXTURE_DIR), model_dir)
    ref = load_pretrained(model_dir)
    results = _run_hf(model_dir, ["hnet_tiny_mc", "hnet_tiny_rolling", "hnet_tiny_gen"], batch_size=3)
    assert _check_loglikelihoods(results, ref) == 21
    for sample in results["samples"]["hnet_tiny_gen"]:
        context, options = sample["arguments"][0]
        want = hnet_generate(ref, context, max_tokens=options["max_gen_toks"], temperature=0).split("\n")[0]
        assert sample["resps"][0][0] == want
    rolling = results["results"]["hnet_tiny_rolling"]
    assert rolling["bits_per_byte,none"] == pytest.approx(_hnet_eval_bits_per_byte(model_dir), rel=1e-5)


@pytest.mark.slow
def test_lm_eval_cli_runs_our_directory_with_batches(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={DEMO},trust_remote_code=True,dtype=float32,add_bos_token=True",
                          "--tasks", "hnet_tiny_mc,hnet_tiny_gen", "--include_path", TASKS, "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hnet_tiny_mc" in out.stdout and "hnet_tiny_gen" in out.stdout


def test_mlx_lm_evaluate_loglikelihoods_equal_ours(tmp_path):
    pytest.importorskip("mlx.core")
    from mlx_lm.evaluate import MLXLM

    # mlx-lm runs the weights as stored (the bundled model: float16); a float32 copy compares exactly
    model_dir = str(tmp_path / "fp32")
    save_pretrained(load_pretrained(DEMO), model_dir)
    lm = MLXLM(model_dir, batch_size=4, trust_remote_code=True)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hnet_tiny_mc", "hnet_tiny_rolling"],
                                      task_manager=TaskManager(include_path=TASKS, include_defaults=False), log_samples=True)
    ref = load_pretrained(DEMO)
    for sample in results["samples"]["hnet_tiny_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert resp[0][0] == pytest.approx(_logprob(ref, context, continuation), abs=5e-4, rel=1e-5)
    for sample in results["samples"]["hnet_tiny_rolling"]:
        assert sample["resps"][0][0] == pytest.approx(_logprob(ref, "", sample["arguments"][0][0]), abs=2e-3,
                                                      rel=1e-5)
    bpb = results["results"]["hnet_tiny_rolling"]["bits_per_byte,none"]
    assert bpb == pytest.approx(_hnet_eval_bits_per_byte(DEMO), rel=1e-4)
    assert math.isfinite(results["results"]["hnet_tiny_mc"]["acc_norm,none"])

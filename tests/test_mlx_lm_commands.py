"""mlx-lm's other command-line tools on our model directories: perplexity, benchmark and chat
(each driven once, offline, on the bundled model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from hnet_core import mlx_lm_files  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "hnet_core", "demo_model")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _mlx_lm(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "mlx_lm", *args, "--trust-remote-code"], input=stdin,
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    return out.stdout


def test_mlx_lm_perplexity_scores_a_local_dataset(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Note {i}: the river runs past the old mill, and the miller sings."}) + "\n")
    out = _mlx_lm("perplexity", "--model", DEMO, "--data-path", str(tmp_path), "--sequence-length", "64",
                  "--num-samples", "8", "--batch-size", "4")
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", out).group(1))
    assert 1.0 < ppl < 256.0  # a trained byte model: far better than uniform over 256 bytes


def test_mlx_lm_benchmark_times_prefill_and_generation():
    out = _mlx_lm("benchmark", "--model", DEMO, "-p", "64", "-g", "16", "-b", "1", "-n", "1")
    assert re.search(r"Averages: prompt_tps=[0-9.]+, generation_tps=[0-9.]+", out), out


def test_mlx_lm_chat_continues_plain_text(tmp_path):
    model = str(tmp_path / "chat")
    shutil.copytree(DEMO, model)
    mlx_lm_files.add_chat_template(model)
    out = _mlx_lm("chat", "--model", model, "--max-tokens", "24", "--temp", "0", stdin="The history of\nq\n")
    import mlx_lm

    # chat renders the message as plain text (no BOS): the reply is that text's greedy continuation
    lm, tokenizer = mlx_lm.load(model, tokenizer_config={"trust_remote_code": True}, trust_remote_code=True)
    want = mlx_lm.generate(lm, tokenizer, tokenizer.encode("The history of", add_special_tokens=False),
                           max_tokens=24)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out)
    assert len(want) > 8 and want in text and "bye" in text

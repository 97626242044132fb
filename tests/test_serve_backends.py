"""`hnet serve --backend onnx` (the official fixture's shared export) and `--backend mlx` (the bundled
model): concurrent greedy requests of different prompt lengths get exactly what they get alone,
streamed and plain answers agree, and (ONNX) a request beyond the export's max_seqlen gets a 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import OFFICIAL_ONNX_MAX_SEQLEN, TEXT
from serve_helpers import ServerProcess, streamed_text

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPTS = [TEXT[:n] for n in (1, 9, 33, 70, 120, 180)]
MAX_TOKENS = 20


def check_batching(server: ServerProcess) -> None:
    def greedy(prompt: str) -> str:
        return server.complete(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"]

    alone = [greedy(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(greedy, PROMPTS))
    assert together == alone
    assert server.get("/health")[1]["max_running_seen"] > 1
    events = server.stream("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert streamed_text(events) == (alone[3], "length") or streamed_text(events)[0] == alone[3]


def test_onnx_server_batches_requests_with_their_own_answers(official_onnx_export):
    pytest.importorskip("onnxruntime")
    server = ServerProcess("--backend", "onnx", "--model", official_onnx_export, "--prefill-step-size", "16")
    try:
        check_batching(server)
        status, raw, _ = server.request("POST", "/v1/completions",
                                        {"prompt": "x" * 100, "max_tokens": OFFICIAL_ONNX_MAX_SEQLEN})
        assert status == 400 and "max_tokens" in json.loads(raw)["error"]["message"]
    finally:
        assert server.stop() == 0


def test_mlx_server_batches_requests_with_their_own_answers():
    pytest.importorskip("mlx.core")
    server = ServerProcess("--backend", "mlx", "--prefill-step-size", "32")
    try:
        check_batching(server)
    finally:
        assert server.stop() == 0

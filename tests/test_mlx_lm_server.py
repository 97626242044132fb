"""`mlx_lm.server --model DIR --trust-remote-code` serving the bundled H-Net on 127.0.0.1: plain and
streaming /v1/completions give hnet-mlx's greedy text, four clients at once all get it, a client
that disconnects mid-stream does not disturb the next request, bad requests get HTTP errors, and a
continuation request reuses the in-memory prompt cache (its prompt time is printed, not asserted).

The server is one subprocess for the module, every request has a timeout, and the server is
stopped at the end (it also exits by itself after SERVER_LIFETIME seconds)."""

from __future__ import annotations

import ctypes.util
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("mlx_lm")

import hnet_mlx  # noqa: E402
from hnet_core.backends import DEMO_MODEL  # noqa: E402

HOST = "127.0.0.1"
SERVER_LIFETIME = 600  # seconds; the server kills itself after this even if the test run dies
REQUEST_TIMEOUT = 120
PROMPT = "It is a truth universally acknowledged"
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    # `timeout` bounds the server's life whatever happens to this process.
    cmd = ["timeout", str(SERVER_LIFETIME), sys.executable, "-m", "mlx_lm", "server", "--model", DEMO_MODEL,
           "--trust-remote-code", "--host", HOST, "--port", str(port), "--log-level", "WARNING"]
    env = dict(os.environ)
    if sys.platform.startswith("linux") and ctypes.util.find_library("openblas"):
        env["LD_PRELOAD"] = "libopenblas.so.0"  # as docs/mlx-lm.md tells Linux users (mlx-lm imports mlx first)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlx_lm.server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            status, _ = request(port, "GET", "/health", None, timeout=5)
            if status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlx_lm.server did not come up within 300 s")
        time.sleep(0.5)
    yield port
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(port: int, method: str, path: str, body: dict | None, timeout: float = REQUEST_TIMEOUT):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def complete(port: int, prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    status, data = request(port, "POST", "/v1/completions",
                           {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra})
    assert status == 200, data
    return json.loads(data)


def stream(port: int, prompt: str, max_tokens: int = MAX_TOKENS):
    """(text, seconds to the first chunk) of a streaming completion."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    start = time.perf_counter()
    first = None
    text = ""
    try:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            if event.get("choices"):
                text += event["choices"][0].get("text", "")
                if first is None:
                    first = time.perf_counter() - start
    finally:
        conn.close()
    return text, first


def hang_up_mid_stream(port: int, prompt: str, max_tokens: int) -> bytes:
    """Start a streaming completion on a raw socket, read its first events, then close the socket."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}).encode()
    with socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received


@pytest.fixture(scope="module")
def expected():
    model, _ = hnet_mlx.load(DEMO_MODEL)
    return hnet_mlx.generate(model, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)


def test_plain_and_streaming_completions_equal_hnet_mlx(server, expected):
    reply = complete(server, PROMPT)
    assert reply["choices"][0]["text"] == expected
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply["usage"]["prompt_tokens"] == len(PROMPT.encode()) + 1  # BOS
    text, _ = stream(server, PROMPT)
    assert text == expected


def test_four_concurrent_clients_all_get_the_full_answer(server, expected):
    results: list = [None] * 4

    def client(i):
        results[i] = stream(server, PROMPT)[0] if i % 2 else complete(server, PROMPT)["choices"][0]["text"]

    one = time.perf_counter()
    complete(server, PROMPT)
    one = time.perf_counter() - one
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT)
    total = time.perf_counter() - start
    print(f"\none client: {one:.2f} s; four concurrent clients: {total:.2f} s in total")
    assert results == [expected] * 4


def test_a_client_hanging_up_mid_stream_does_not_disturb_the_next(server, expected):
    received = hang_up_mid_stream(server, PROMPT, max_tokens=400)
    assert b" 200 " in received.split(b"\r\n", 1)[0] and b"data: " in received
    assert complete(server, PROMPT)["choices"][0]["text"] == expected


@pytest.mark.parametrize("body, status", [
    ({"prompt": PROMPT, "max_tokens": -5}, 400),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400),
    ({"prompt": PROMPT, "temperature": -1.0}, 400),
    ({"prompt": PROMPT, "model": "no/such-model-here"}, None),  # an unknown model: an HTTP error, not a crash
])
def test_bad_requests_get_an_http_error_and_the_server_keeps_serving(server, expected, body, status):
    code, data = request(server, "POST", "/v1/completions", body)
    assert code >= 400 if status is None else code == status, data
    assert complete(server, PROMPT)["choices"][0]["text"] == expected


def test_an_unknown_field_is_ignored_as_openai_servers_do(server, expected):
    # mlx-lm's server, like OpenAI's, ignores fields it does not know; the answer is unchanged.
    assert complete(server, PROMPT, no_such_field=1)["choices"][0]["text"] == expected


def test_a_continuation_reuses_the_prompt_cache(server):
    long_prompt = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
                   "seemed to unite some of the best blessings of existence. ") * 6
    first = complete(server, long_prompt, max_tokens=16)
    completion = first["choices"][0]["text"]
    follow = long_prompt + completion + " And then"
    cold_text, cold = stream(server, "Z" + follow, max_tokens=2)  # same length, nothing cached to reuse
    warm_text, warm = stream(server, follow, max_tokens=2)
    # (+ new text: a prompt exactly equal to a cached one fails in mlx-lm 0.32's sequential path,
    # "Either input_embeddings or prompt must be provided", whatever the model)
    reply = complete(server, follow + warm_text + ", said", max_tokens=1)
    cached = reply["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    print(f"\nprompt of {len(follow.encode()) + 1} bytes: {cold:.3f} s to the first byte without a cached prefix, "
          f"{warm:.3f} s reusing the cached {len((long_prompt + completion).encode()) + 1}-byte prefix; "
          f"a further continuation reused {cached} cached bytes")
    assert cached >= len(follow.encode())  # the server found the previous request's cache

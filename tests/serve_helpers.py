"""Helpers for the `hnet serve` tests: a real server process on 127.0.0.1 and raw HTTP requests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
REQUEST_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`hnet serve ARGS` on a free port of 127.0.0.1; `stop()` sends SIGTERM and returns the exit status."""

    def __init__(self, *args: str, startup: float = 300):
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "hnet_core.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + startup
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hnet serve exited: {self.proc.stderr.read().decode()[-3000:]}")
            try:
                if self.get("/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"hnet serve did not come up within {startup} s")
            time.sleep(0.3)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes, dict]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def get(self, path: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict]:
        status, data, _ = self.request("GET", path, timeout=timeout)
        return status, json.loads(data)

    def complete(self, **body) -> dict:
        status, data, _ = self.request("POST", "/v1/completions", body)
        assert status == 200, data
        return json.loads(data)

    def stream(self, path: str, body: dict) -> list:
        """The parsed events of a streamed request ('[DONE]' as the string)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            return parse_sse(response.read())
        finally:
            conn.close()

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def parse_sse(raw: bytes) -> list:
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_text(events: list, chat: bool = False) -> tuple[str, str | None]:
    """(joined text, finish_reason) of a parsed stream."""
    text, reason = [], None
    for e in events:
        if e == "[DONE]":
            continue
        choice = e["choices"][0]
        text.append((choice["delta"].get("content") or "") if chat else choice["text"])
        reason = choice["finish_reason"] or reason
    return "".join(text), reason

"""The ONNX runtime creates and runs every session it will use when it loads, so no decode step pays
for creating one; `-v` reports load, the first decode step and the steady rate apart."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from hnet_core.backends import load_model
from hnet_core.cli import main as hnet_main
from hnet_core.engine import stream_generate
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams
from hnet_export import OnnxHNet
from hnet_export.serving import ServeBackend

GREEDY = SamplingParams(temperature=0)


def generated(adapter, prompts, **kwargs) -> list[bytes]:
    out = [bytearray() for _ in prompts]
    for step in stream_generate(adapter, prompts, max_tokens=12, sampling=GREEDY, **kwargs):
        for b, byte in enumerate(step.bytes):
            if byte is not None:
                out[b].append(byte)
    return [bytes(o) for o in out]


@pytest.fixture
def no_new_sessions(monkeypatch):
    """After this is called, creating an onnxruntime session fails the test."""
    def forbid():
        def refuse(*args, **kwargs):
            raise AssertionError("a session was created after load")
        monkeypatch.setattr(ort, "InferenceSession", refuse)
    return forbid


@pytest.mark.parametrize("batch, step_graph", [(1, "step_cond"), (2, "step")])
def test_loading_for_generation_creates_every_session_it_will_use(official_onnx_export, no_new_sessions,
                                                                    batch, step_graph):
    loaded = load_model("onnx", official_onnx_export, device="cpu", batch=batch)
    assert set(loaded.model.sessions) == {"prefill", "extend", step_graph}
    before = dict(loaded.model.sessions)
    no_new_sessions()
    prompts = [b"The old lighthouse keeper", b"Hi"][:batch]
    generated(loaded.adapter, prompts, prefill_step_size=5)  # pieces: prefill, then extend; then steps
    assert loaded.model.sessions == before


def test_warm_up_leaves_no_live_state_and_changes_no_output(official_onnx_export):
    cold = OnnxHNet(official_onnx_export, provider="cpu")
    warm = OnnxHNet(official_onnx_export, provider="cpu")
    warm.warm_up(batch=None)
    assert set(warm.sessions) == {"prefill", "extend", "step", "step_cond"}
    with pytest.raises(HNetError, match="call prefill"):
        warm.step(np.array([[65]]))
    from hnet_export.generate import Adapter

    prompts = [b"The cat sat", b"A"]
    assert generated(Adapter(warm), prompts, prefill_step_size=4) == generated(Adapter(cold), prompts, prefill_step_size=4)
    assert generated(Adapter(warm), prompts[:1]) == generated(Adapter(cold), prompts[:1])


def test_warm_up_refuses_an_unknown_role(official_onnx_export):
    with pytest.raises(HNetError, match="roles must be among prefill, extend, step"):
        OnnxHNet(official_onnx_export, provider="cpu").warm_up(roles=("decode",))


def test_the_serving_backend_creates_its_sessions_before_the_first_request(official_onnx_export, no_new_sessions):
    backend = ServeBackend(official_onnx_export, provider="cpu")
    assert set(backend.prefiller.sessions) == {"prefill", "extend"}
    assert set(backend.decoder.sessions) == {"prefill", "step", "step_cond"}
    no_new_sessions()
    one, _ = backend.prefill(None, np.frombuffer(b"Hello", dtype=np.uint8))
    one, _ = backend.prefill(one, np.frombuffer(b" you", dtype=np.uint8))
    two, _ = backend.prefill(None, np.frombuffer(b"Hi", dtype=np.uint8))
    batch = backend.merge([one, two])
    batch, logits = backend.step(batch, np.array([32, 32]))
    single = backend.filter(batch, [0])
    backend.step(single, np.array([65]))
    assert logits.shape == (2, 256)


def test_verbose_generation_reports_load_first_step_and_steady_rate_apart(official_onnx_export):
    result = CliRunner().invoke(hnet_main, ["generate", "--backend", "onnx", "--model", official_onnx_export,
                                            "--prompt", "Hello", "-m", "12", "--temp", "0", "-v"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^Load: \d+\.\d\d s$", result.stderr, re.M), result.stderr
    assert re.search(r"^Generation: 12 bytes, \d+\.\d bytes/s$", result.stderr, re.M), result.stderr
    assert re.search(r"^Decode: first step \d+\.\d ms, then \d+\.\d bytes/s$", result.stderr, re.M), result.stderr

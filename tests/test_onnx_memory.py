"""How many copies of the weights the ONNX runtime holds, by resident memory on a model whose weights
dwarf onnxruntime's own (~150 MB in float32, three layers so that it exports in seconds): prefill and
extend read the one memory-mapped copy, each step graph in use adds one pre-packed copy, and above
PREPACK_MAX_WEIGHTS no session pre-packs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import random_torch_model
from hnet_core.config import HNetConfig

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS is read from /proc (Linux)")

# One wide attention + MLP layer between two thin Mamba layers: 37.8M parameters, 151 MB in float32.
WIDE = {"arch_layout": ["m1", ["T1"], "m1"], "d_model": [64, 1536], "d_intermediate": [0, 6144],
        "ssm_cfg": {"chunk_size": 16, "d_conv": 4, "d_state": 16, "expand": 2},
        "attn_cfg": {"num_heads": [2, 12], "rotary_emb_dim": [8, 32], "window_size": [-1, -1]}}

_MEASURE = """
import json, sys
import numpy as np
import export.runtime as runtime
from export.runtime import OnnxHNet

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

runtime.PREPACK_MAX_WEIGHTS = int(sys.argv[2])
start = anon()
model = OnnxHNet(sys.argv[1], provider="cpu", threads=1)
model.warm_up(batch=1)  # what `hnet generate` loads: prefill, extend, step_cond, each run once
generate = anon() - start
model.warm_up(batch=None)  # and step.onnx too (a server's decoder)
print(json.dumps({"generate": generate, "all": anon() - start, "weights": model.shared_weights.nbytes,
                  "sessions": sorted(model.sessions)}))
"""


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory) -> str:
    from hnet_export.exporter import export_model

    out = str(tmp_path_factory.mktemp("wide_onnx"))
    export_model(random_torch_model(HNetConfig.from_dict(WIDE), seed=0), out, max_seqlen=64)
    return out


def private_memory(path: str, prepack_max_weights: int) -> dict:
    """Anonymous memory (not the mapped weights file) added by loading, in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, path, str(prepack_max_weights)], cwd=root,
                          capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_only_the_step_graphs_hold_a_pre_packed_copy_of_the_weights(wide_export):
    got = private_memory(wide_export, prepack_max_weights=10**12)
    weights = got["weights"]
    assert weights > 140e6 and got["sessions"] == ["extend", "prefill", "step", "step_cond"]
    # Three sessions for generation, one pre-packed copy (step_cond's): were extend or prefill to pack
    # too, or each session to load its own weights, this would be two copies or more.
    assert 0.8 * weights < got["generate"] < 1.5 * weights, got
    # step.onnx adds its own packed copy (onnxruntime cannot share one between sessions from Python).
    assert 1.8 * weights < got["all"] < 2.5 * weights, got


@pytest.mark.slow
def test_above_the_threshold_no_session_copies_the_weights(wide_export):
    got = private_memory(wide_export, prepack_max_weights=0)
    # Every session reads the mapped file: what remains is onnxruntime's own (graphs, buffers).
    assert got["all"] < 0.4 * got["weights"], got

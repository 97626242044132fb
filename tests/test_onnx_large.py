"""(slow) A model over 2 GB: the official 1-stage XL shape with random float16 weights (2.5 GB)
exports with its weights in one external file shared by the graphs, and reloads in onnxruntime."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import onnx
import pytest
import torch

from hnet_core.official import official_config
from hnet_export import OnnxHNet
from hnet_export.exporter import WEIGHTS_FILE, export_model
from hnet_torch import HNetForCausalLM

pytestmark = pytest.mark.slow


def test_xl_shape_over_2gb_writes_external_data_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = HNetForCausalLM(official_config("hnet_1stage_XL"), dtype=torch.float16).eval()
    model.init_weights()
    weight_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert weight_bytes > 2**31  # past protobuf's 2 GB limit for one file
    out = str(tmp_path / "xl")
    result = export_model(model, out, max_seqlen=256)  # external data is chosen automatically
    assert result.external_data
    assert os.path.getsize(os.path.join(out, WEIGHTS_FILE)) >= 0.999 * weight_bytes  # tensors under 1 KB stay inline
    for graph in ("prefill", "step"):
        path = os.path.join(out, graph + ".onnx")
        assert os.path.getsize(path) < 50e6
        onnx.checker.check_model(path, full_check=True)
    assert json.load(open(os.path.join(out, "export.json")))["external_data"] == WEIGHTS_FILE

    ids = np.array([[254, *b"The old lighthouse keeper climbed"], [254, *b"Hello, world" + b"\0" * 21]])
    mask = np.arange(ids.shape[1])[None] < np.array([[ids.shape[1]], [13]])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), mask=torch.from_numpy(mask)).logits.float().numpy()
    del model
    gc.collect()

    onnx_model = OnnxHNet(out, provider="cpu")
    logits = onnx_model.prefill(ids, mask).logits
    scale = np.abs(ref[mask]).max()
    assert np.abs(logits - ref)[mask].max() <= 2e-2 * scale  # float16 end to end
    step = onnx_model.step(np.array([[32], [33]]))
    assert step.logits.shape == (2, 1, 256) and np.isfinite(step.logits).all()

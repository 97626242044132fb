"""The onnxruntime forward behind `hnet eval --backend onnx` (numpy + onnxruntime; no torch, no MLX).

    forward = make_forward("onnx_dir", device="cpu")
    logits, routing = forward(ids, mask)   # the prefill graph over each batch of windows
"""

from __future__ import annotations

import numpy as np

from hnet_core.errors import HNetError

from .runtime import OnnxHNet


def make_forward(model_path: str, device: str | None = None, dtype: str | None = None):
    """forward(ids (B, L), mask (B, L)) -> (logits (B, L, V) float32, [(boundary_mask, valid) per stage])."""
    if dtype is not None:
        raise HNetError("--dtype does not apply to onnx (choose it at export time)")
    model = OnnxHNet(model_path, provider=device or "auto")

    def forward(ids: np.ndarray, mask: np.ndarray):
        out = model.prefill(ids, mask)
        routing = [(np.asarray(r.boundary_mask, dtype=bool), np.asarray(r.valid, dtype=bool)) for r in out.routing]
        return np.asarray(out.logits, dtype=np.float32), routing

    return forward

"""The torch forward behind `hnet eval --backend torch` (the scoring itself is hnet_core/evaluate.py).

    forward = make_forward("runs/a/model")
    logits, routing = forward(ids, mask)   # numpy (B, L) int32 / bool in; numpy out

hnet_mlx/evaluate.py is the MLX twin; hnet_core.backends.eval_forward picks one by name.
"""

from __future__ import annotations

import numpy as np
import torch

from .loading import load_pretrained
from .quantize import quantize_int8


def make_forward(model_path: str, device: str | None = None, dtype: str | None = None, quantize: str | None = None):
    """forward(ids (B, L), mask (B, L)) -> (logits (B, L, V) float32, [(boundary_mask, valid) per stage]).
    quantize="int8": quantize.quantize_int8 (torch only; no MLX twin)."""
    model = load_pretrained(model_path, dtype=dtype, device=device)
    if quantize is not None:
        model = quantize_int8(model)
    dev = model.embeddings.weight.device

    @torch.inference_mode()
    def forward(ids: np.ndarray, mask: np.ndarray):
        out = model(torch.from_numpy(ids).to(dev).long(), mask=torch.from_numpy(mask).to(dev))
        routing = [(r.boundary_mask.cpu().numpy(), (r.valid if r.valid is not None else torch.ones_like(r.boundary_mask))
                    .cpu().numpy()) for r in out.routing]
        return out.logits.float().cpu().numpy(), routing

    return forward

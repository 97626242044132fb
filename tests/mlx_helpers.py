"""Helpers shared by the MLX tests: the same weights in torch and MLX, and array comparisons."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from hnet_mlx import HNetForCausalLM
from hnet_mlx.loading import sanitize


def mlx_from_torch(torch_model) -> HNetForCausalLM:
    """An MLX model holding exactly the torch model's weights (through the one layout function)."""
    weights = {k: mx.array(v.detach().float().numpy()) for k, v in torch_model.state_dict().items()}
    model = HNetForCausalLM(torch_model.config)
    model.load_weights(list(sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def np_(x) -> np.ndarray:
    """torch tensor or mx.array -> numpy (fp32 for floats)."""
    if isinstance(x, mx.array):
        if mx.issubdtype(x.dtype, mx.floating):
            x = x.astype(mx.float32)
        return np.array(x)
    return x.detach().cpu().numpy()

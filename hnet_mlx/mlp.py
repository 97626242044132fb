"""SwiGLU MLP (official `SwiGLU`): fc1 -> [y | gate], out = fc2(y * silu(gate)).

The official split is `y, gate = fc1(x).chunk(2)`: the *second* half is the gate. The hidden size
is d_intermediate rounded up to a multiple of 128 (HNetConfig.mlp_hidden).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import blas


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # blas.linear: a decode step's few rows through OpenBLAS's small-matrix kernels (MLX on Linux only)
        y, gate = mx.split(blas.linear(self.fc1, x), 2, axis=-1)
        return blas.linear(self.fc2, y * nn.silu(gate))

"""SwiGLU MLP (official `SwiGLU`): fc1 -> [y | gate], out = fc2(y * silu(gate)).

The official split is `y, gate = fc1(x).chunk(2)`: the *second* half is the gate. The hidden size
is d_intermediate rounded up to a multiple of 128 (HNetConfig.mlp_hidden).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))

"""Pre-norm residual blocks for the layout letters m / M / t / T.

m = Mamba2, t = attention; upper case adds a SwiGLU MLP with its own norm. The residual stream
is fused into the norms and kept in fp32 (official Block with residual_in_fp32=True):
    res = h + res; h = mixer(norm1(res)); [res = h + res; h = mlp(norm2(res))]
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hnet_core.config import HNetConfig

from .attention import CausalMHA
from .mamba2 import Mamba2
from .mlp import SwiGLU
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, mlp: SwiGLU | None):
        super().__init__()
        self.norm1 = RMSNorm(d_model, eps=1e-5)
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = RMSNorm(d_model, eps=1e-5)
            self.mlp = mlp
        else:
            self.norm2 = self.mlp = None

    def __call__(self, h: mx.array, residual: mx.array | None, **mixer_kwargs):
        h, residual = self.norm1(h, residual, prenorm=True)
        h = self.mixer(h, **mixer_kwargs)
        if self.mlp is not None:
            h, residual = self.norm2(h, residual, prenorm=True)
            h = self.mlp(h)
        return h, residual

    def step(self, h: mx.array, residual: mx.array | None, **mixer_kwargs):
        h, residual = self.norm1(h, residual, prenorm=True)
        h = self.mixer.step(h, **mixer_kwargs)
        if self.mlp is not None:
            h, residual = self.norm2(h, residual, prenorm=True)
            h = self.mlp(h)
        return h, residual


def create_block(letter: str, config: HNetConfig, level: int) -> Block:
    d = config.d_model[level]
    if letter in "mM":
        mixer = Mamba2(d, **config.ssm_cfg.at(level))
    else:
        a = config.attn_cfg.at(level)
        mixer = CausalMHA(d, a["num_heads"], rotary_emb_dim=a["rotary_emb_dim"], window_size=a["window_size"])
    mlp = SwiGLU(d, config.mlp_hidden(level)) if letter in "MT" else None
    return Block(mixer, d, mlp)

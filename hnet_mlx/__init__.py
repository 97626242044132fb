"""hnet_mlx: H-Net in MLX (Apple silicon; also runs on the Linux CPU build of MLX).

Mirrors hnet_torch file by file. Load a converted model with `model, config = hnet_mlx.load(path)`
(convert official checkpoints first with `hnet convert torch-to-mlx`).
"""

from . import blas

blas.preload()  # before anything imports mlx: an optimized BLAS for MLX's CPU matmuls on Linux (see blas.py)

from hnet_core.config import HNetConfig  # noqa: E402
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams

from .generate import generate, stream_generate
from .lm import CausalLMOutput, HNetForCausalLM
from .loading import load, load_pretrained, load_weights, save_pretrained
from .loss import hnet_loss, next_byte_loss, ratio_loss
from .prompt_cache import cache_prompt, load_prompt_cache, save_prompt_cache

__all__ = [
    "HNetConfig", "HNetError", "HNetForCausalLM", "CausalLMOutput", "SamplingParams", "generate", "stream_generate",
    "load", "load_pretrained", "load_weights", "save_pretrained", "hnet_loss", "next_byte_loss", "ratio_loss",
    "cache_prompt", "load_prompt_cache", "save_prompt_cache",
]

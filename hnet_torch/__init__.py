"""hnet_torch: the reference H-Net in PyTorch (loads official checkpoints unchanged)."""

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.sampling import SamplingParams

from .generate import generate, stream_generate
from .lm import CausalLMOutput, HNetForCausalLM
from .loading import load_pretrained, load_weights, save_pretrained
from .loss import hnet_loss, next_byte_loss, ratio_loss
from .prompt_cache import cache_prompt, load_prompt_cache, save_prompt_cache

__all__ = [
    "HNetConfig", "HNetError", "HNetForCausalLM", "CausalLMOutput", "SamplingParams", "generate", "stream_generate",
    "load_pretrained", "load_weights", "save_pretrained", "hnet_loss", "next_byte_loss", "ratio_loss",
    "cache_prompt", "load_prompt_cache", "save_prompt_cache",
]

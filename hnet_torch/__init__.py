"""hnet_torch: the reference H-Net in PyTorch (loads official checkpoints unchanged)."""

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError

from .lm import CausalLMOutput, HNetForCausalLM

__all__ = ["HNetConfig", "HNetError", "HNetForCausalLM", "CausalLMOutput"]

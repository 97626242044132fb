"""H-Net's `transformers` configuration class (needs transformers, not torch).

Every model directory we write names this class in config.json's `auto_map` (through the small
`configuration_hnet.py` beside it, see mlx_lm_files.py), so

    AutoConfig.from_pretrained(DIR, trust_remote_code=True)

returns an `HNetHFConfig`: the fields of our HNetConfig (arch_layout, d_model, ...) as attributes,
plus the token ids transformers' generation reads. `hnet_config()` gives back the framework-free
HNetConfig (and validates it: a config that is not an H-Net's is one HNetError line).

`register()` adds model type "hnet" to transformers' Auto* tables in this process, so code that
has imported hnet_torch / hnet_mlx loads our directories without the unknown-model-type warning.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .config import HNetConfig
from .errors import HNetError
from .tokenizer import BOS_ID, EOS_ID

MODEL_TYPE = "hnet"
_MODEL_FIELDS = ("arch_layout", "d_model", "d_intermediate", "vocab_size", "ssm_cfg", "attn_cfg", "tie_embeddings")


class HNetHFConfig(PreTrainedConfig):
    """config.json of an H-Net model directory, as transformers sees it."""

    model_type = MODEL_TYPE

    arch_layout: list | None = None
    d_model: list | None = None
    d_intermediate: list | None = None
    vocab_size: int = 256
    ssm_cfg: dict | None = None
    attn_cfg: dict | None = None
    tie_embeddings: bool = False
    # The byte tokenizer's ids; padding uses EOS (no byte is free, and EOS ends a document anyway).
    bos_token_id: int | None = BOS_ID
    eos_token_id: int | list[int] | None = EOS_ID
    pad_token_id: int | None = EOS_ID
    tie_word_embeddings: bool = False
    # Optional limit on bytes per sequence (None: none; H-Net has no position table). lm-eval reads
    # it as the model's max_length; longer inputs are refused in one line.
    max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any) -> "HNetHFConfig":
        found = config_dict.get("model_type", MODEL_TYPE)
        if found != MODEL_TYPE:
            raise HNetError(f"config.json has model_type {found!r}: not an H-Net ({MODEL_TYPE!r}) model directory")
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.arch_layout is not None:
            self.tie_word_embeddings = bool(self.tie_embeddings)
            self.hnet_config()  # refuse a config that is not an H-Net's here, in one line
        super().__post_init__(**kwargs)

    def hnet_config(self) -> HNetConfig:
        """Our framework-free config (raises HNetError naming the problem for a bad one)."""
        data = {k: getattr(self, k) for k in _MODEL_FIELDS}
        if data["arch_layout"] is None:
            raise HNetError("this config has no arch_layout: it is not an H-Net config")
        return HNetConfig.from_dict(data)


def register() -> None:
    """Make model type "hnet" known to AutoConfig in this process (idempotent)."""
    AutoConfig.register(MODEL_TYPE, HNetHFConfig, exist_ok=True)


register()

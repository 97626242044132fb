"""Framework-free pieces shared by hnet_torch, hnet_mlx and the exporter: the config, byte
tokenizer, official checkpoint facts, file layout and the user-facing error type."""

from .config import AttnConfig, HNetConfig, SSMConfig
from .errors import HNetError
from .official import OFFICIAL_NAMES, expected_shapes, official_config
from .tokenizer import BOS_ID, EOS_ID, Utf8StreamDecoder, decode, encode

__all__ = [
    "AttnConfig", "HNetConfig", "SSMConfig", "HNetError", "OFFICIAL_NAMES", "expected_shapes",
    "official_config", "BOS_ID", "EOS_ID", "Utf8StreamDecoder", "decode", "encode",
]

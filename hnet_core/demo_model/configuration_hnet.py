"""transformers' AutoConfig entry point for this H-Net model directory (written by hnet-mlx; no code here).

Needs the hnet-mlx package with transformers: pip install "hnet-mlx[transformers]".
"""

try:
    from hnet_core.hf_config import HNetHFConfig  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[transformers]' ({e})") from None

"""mlx-lm entry point for this H-Net model directory (written by hnet-mlx; no model code here).

    mlx_lm.generate --model THIS_DIR --trust-remote-code --prompt "Hello"
    model, tokenizer = mlx_lm.load("THIS_DIR", trust_remote_code=True)

Needs the hnet-mlx package: pip install "hnet-mlx[mlx]".
"""

try:
    from hnet_mlx.mlx_lm_model import Model, ModelArgs  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[mlx]' ({e})") from None

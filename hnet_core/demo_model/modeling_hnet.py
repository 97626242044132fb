"""transformers' AutoModelForCausalLM entry point for this H-Net model directory (written by hnet-mlx;
no model code here: it runs hnet_torch).

    model = AutoModelForCausalLM.from_pretrained("THIS_DIR", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("THIS_DIR", trust_remote_code=True)

Needs the hnet-mlx package with torch and transformers: pip install "hnet-mlx[transformers]".
"""

try:
    from hnet_core.hf_config import HNetHFConfig  # noqa: F401
    from hnet_torch.hf_model import HNetHFForCausalLM  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[transformers]' ({e})") from None

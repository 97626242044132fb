"""int8 Linear weights for decoding on the CPU: torch's dynamic quantization.

    model = quantize_int8(load_pretrained("hnet_1stage_L.pt"))      # or `hnet generate --quantize int8`

Each quantized Linear holds its weight as int8 with one float scale per output row and, at every
call, quantizes its input row by row to int8 as well (torch.ao's x86 kernels, fbgemm/onednn).
Measured on this project's 2-core x86 CPU (docs/torch.md): a (1, 2048) x (2048, 8192) product over
24 such layers runs 5.3x faster than float32 (it reads a quarter of the bytes; float32 is already
at the memory bandwidth) and 5x faster than bfloat16. torch's weight-only int8 kernel
(`_weight_int8pack_mm`, float activations) was 4x *slower* than float32 there, so it is not used.

The layers that stay float are those the ONNX export keeps float (export/weights.py KEEP_FLOAT):
the routing q/k projections, whose cosine similarity decides every boundary, and the LM head;
plus residual_proj, which the official model computes in float32. Quantized layers run on the
CPU only, in float32.

torch-only by design: MLX quantizes when converting (`hnet convert torch-to-mlx -q`, MLX's own
nn.quantize in hnet_mlx/loading.py), so hnet_mlx has no quantize.py twin.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hnet_core.errors import HNetError

from .lm import HNetForCausalLM

KEEP_FLOAT = ("routing_module.q_proj_layer", "routing_module.k_proj_layer", "lm_head", "residual_proj")


def quantized_layers(model: HNetForCausalLM) -> set[str]:
    """Names of the Linear layers quantize_int8 quantizes."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(keep in name for keep in KEEP_FLOAT)}


def quantize_int8(model: HNetForCausalLM) -> HNetForCausalLM:
    """The model with int8 Linear weights (in place; see the module docstring), in eval mode."""
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise HNetError("--quantize int8 runs float32 models on the CPU (torch's int8 kernels are CPU-only); "
                        "drop --device/--dtype")
    with warnings.catch_warnings():  # torch.ao's notice that it will move to torchao one day
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, quantized_layers(model), dtype=torch.qint8, inplace=True)
    return model.eval()

"""hnet_export: run H-Net exported to ONNX with numpy + onnxruntime only.

    from hnet_export import OnnxHNet, stream_generate
    model = OnnxHNet("onnx_dir", provider="auto")

Importing this package never imports torch or MLX. The exporter (`hnet export onnx`, module
hnet_export.exporter) is the only part that needs torch, and is imported only when used.
"""

from .generate import stream_generate
from .runtime import OnnxHNet

__all__ = ["OnnxHNet", "stream_generate"]

"""hnet_metal_kernels: custom Metal kernels for the recurrent parts of H-Net in MLX.

Kernels (one Metal body per `.metal` file here, built with `mx.fast.metal_kernel`):
  * ssm_step      Mamba2 decode state update, all heads in one launch
  * conv_step     causal conv1d decode step fused with its state shift and SiLU
  * ssd_scan      chunked SSD scan (prefill/training) with its backward (mx.custom_function)
  * ema_dechunk   dechunk EMA fused with the gather to byte positions, with its backward
Each function has exactly the signature of its pure-MLX twin in the model package that uses it,
which is the reference the checks hold it to; the model package passes its twins in (reference.py:
`PurePaths`), so this package imports nothing of the model. `emulated()` runs the same kernels on the CPU
emulator in `hnet_metal_kernels.emulator` (Linux has no Metal); `self_test()` (or
`python -m hnet_metal_kernels.selftest`) checks every kernel on this machine in a few seconds;
`dispatch` decides, per call shape, whether "auto" runs a kernel (checked, then timed against the
pure path once per machine); `python -m hnet_metal_kernels.verify` is the full report for a Mac.
"""

from . import dispatch
from .ema import ema_dechunk
from .factory import EmulatorFactory, KernelFactory, MetalFactory, current_factory, emulated, is_available, use_factory
from .reference import PurePaths
from .ssd import ssd_scan
from .step import conv_step, ssm_step


def self_test(pure: PurePaths, factory: KernelFactory | None = None, dtype=None) -> dict[str, str | None]:
    """Run every kernel once against the pure paths `pure`, in the variants a model with `dtype`
    activations uses (default fp32; see selftest.py); {check: problem or None}."""
    import mlx.core as mx

    from .selftest import self_test as run

    return run(pure, factory, mx.float32 if dtype is None else dtype)


__all__ = [
    "EmulatorFactory",
    "KernelFactory",
    "MetalFactory",
    "PurePaths",
    "conv_step",
    "current_factory",
    "dispatch",
    "ema_dechunk",
    "emulated",
    "is_available",
    "self_test",
    "ssd_scan",
    "ssm_step",
    "use_factory",
]

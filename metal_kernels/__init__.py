"""hnet_metal_kernels: custom Metal kernels for hnet_mlx's recurrent parts.

Kernels (one Metal body per `.metal` file here, built with `mx.fast.metal_kernel`):
  * ssm_step      Mamba2 decode state update, all heads in one launch
  * conv_step     causal conv1d decode step fused with its state shift and SiLU
  * ssd_scan      chunked SSD scan (prefill/training) with its backward (mx.custom_function)
  * ema_dechunk   dechunk EMA fused with the gather to byte positions, with its backward
Each function has exactly the signature of its pure-MLX twin in hnet_mlx (kernels.py, ssd.py),
which is the reference the tests hold it to. `emulated()` runs the same kernels on the CPU
emulator in `hnet_metal_kernels.emulator` (Linux has no Metal); `self_test()` (or
`python -m hnet_metal_kernels.selftest`) checks every kernel on this machine in a few seconds;
`dispatch` decides, per call shape, whether "auto" runs a kernel (checked, then timed against the
pure path once per machine); `python -m hnet_metal_kernels.verify` is the full report for a Mac.
"""

from . import dispatch
from .ema import ema_dechunk
from .factory import EmulatorFactory, KernelFactory, MetalFactory, current_factory, emulated, is_available, use_factory
from .ssd import ssd_scan
from .step import conv_step, ssm_step


def self_test(factory: KernelFactory | None = None, dtype=None) -> dict[str, str | None]:
    """Run every kernel once against hnet_mlx's pure paths, in the variants a model with `dtype`
    activations uses (default fp32; see selftest.py); {check: problem or None}."""
    import mlx.core as mx

    from .selftest import self_test as run

    return run(factory, mx.float32 if dtype is None else dtype)


__all__ = [
    "EmulatorFactory",
    "KernelFactory",
    "MetalFactory",
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

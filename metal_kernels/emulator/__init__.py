"""A CPU emulator for the Metal kernel bodies of hnet_metal_kernels (Linux has no Metal).

`metal_kernel(...)` takes exactly what `mx.fast.metal_kernel` takes and returns a callable with
the same call signature; the kernel then runs on the CPU under a checking scheduler (see
launch.py and runtime.cpp) and problems raise `EmulatorError`. `check_address_spaces` runs the
clang++ address-space check on the generated source.
"""

from .build import EmulatorCompileError, cache_dir, check_address_spaces, clang, compiler_available
from .launch import EmulatedKernel, EmulatorError, LaunchRecord, metal_kernel
from .signature import Signature, build_signature

__all__ = [
    "EmulatedKernel",
    "EmulatorCompileError",
    "EmulatorError",
    "LaunchRecord",
    "Signature",
    "build_signature",
    "cache_dir",
    "check_address_spaces",
    "clang",
    "compiler_available",
    "metal_kernel",
]

"""Where kernels come from: real Metal (`mx.fast.metal_kernel`) or the CPU emulator.

Every kernel wrapper builds its kernels through a `KernelFactory`. The one in use is
`current_factory()`: the factory passed explicitly to a wrapper (`factory=`) wins; otherwise the
innermost `use_factory(...)` / `emulated()` block on this thread or task (a context variable, so
it is scoped and never leaks out of the `with`); otherwise real Metal.

    with hnet_metal_kernels.emulated():          # tests on Linux
        y, state = hnet_metal_kernels.ssd_scan(...)
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import mlx.core as mx


class KernelFactory(Protocol):
    """Makes kernels: the signature of `mx.fast.metal_kernel`."""

    name: str

    def metal_kernel(self, name: str, input_names: list[str], output_names: list[str], source: str,
                     header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False) -> Callable: ...

    def available(self) -> bool: ...


class _Cached:
    """Kernel objects cached per (name, source, ...) so repeated calls reuse them."""

    def __init__(self) -> None:
        self._kernels: dict[tuple, Callable] = {}

    def metal_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                     atomic_outputs=False):
        key = (name, tuple(input_names), tuple(output_names), source, header, ensure_row_contiguous, atomic_outputs)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._make(name, list(input_names), list(output_names), source, header, ensure_row_contiguous,
                                atomic_outputs)
            self._kernels[key] = kernel
        return kernel

    def _make(self, *args) -> Callable:
        raise NotImplementedError

    def kernel_names(self) -> set[str]:
        """Names of the kernels this factory has built (each wrapper builds right before launching)."""
        return {key[0] for key in self._kernels}


class MetalFactory(_Cached):
    """The real thing: `mx.fast.metal_kernel` on Apple silicon."""

    name = "metal"

    def _make(self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs):
        return mx.fast.metal_kernel(name=name, input_names=input_names, output_names=output_names, source=source,
                                    header=header, ensure_row_contiguous=ensure_row_contiguous,
                                    atomic_outputs=atomic_outputs)

    def available(self) -> bool:
        return bool(mx.metal.is_available())


class EmulatorFactory(_Cached):
    """The CPU emulator (metal_kernels/emulator): same kernels, run and checked on the CPU.

    `orders`: how many thread orders each launch runs in (1-3); `check_address_spaces`: run the
    clang++ check (default: when clang++ is installed)."""

    name = "emulator"

    def __init__(self, orders: int = 3, check_address_spaces: bool | None = None, seed: int = 0) -> None:
        super().__init__()
        self.options = {"orders": orders, "check_address_spaces": check_address_spaces, "seed": seed}

    def _make(self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs):
        from .emulator import metal_kernel

        return metal_kernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                            **self.options)

    def available(self) -> bool:
        return True


_METAL = MetalFactory()
_CURRENT: contextvars.ContextVar[KernelFactory | None] = contextvars.ContextVar("hnet_metal_kernel_factory", default=None)


def current_factory(factory: KernelFactory | None = None) -> KernelFactory:
    """The factory a kernel call uses: `factory` if given, else the active `use_factory` block, else Metal."""
    if factory is not None:
        return factory
    active = _CURRENT.get()
    return active if active is not None else _METAL


@contextmanager
def use_factory(factory: KernelFactory) -> Iterator[KernelFactory]:
    """Route every kernel call inside the block (this thread/task) through `factory`."""
    token = _CURRENT.set(factory)
    try:
        yield factory
    finally:
        _CURRENT.reset(token)


def emulated(orders: int = 3, check_address_spaces: bool | None = None, seed: int = 0):
    """`use_factory(EmulatorFactory(...))`: run the kernels on the CPU emulator inside the block."""
    return use_factory(EmulatorFactory(orders=orders, check_address_spaces=check_address_spaces, seed=seed))


def is_available(factory: KernelFactory | None = None) -> bool:
    """Whether kernel calls can run now: Metal present, or an emulator block active."""
    return current_factory(factory).available()

"""Rebuild the Metal source that `mx.fast.metal_kernel` generates around a kernel body.

This follows MLX's `write_signature` (mlx/backend/metal/custom_kernel.cpp / fast.cpp): the header,
an optional `template <...>` line, `[[kernel]] void custom_kernel_<name>...(` with every input
(`const device T*`, or `const constant T*` below 8 elements, `&` for 0-d), its `_shape`,
`_strides` and `_ndim` buffers when the body mentions them, the outputs (`device T*`), and the
thread-position attributes the body mentions (by plain substring search, in MLX's fixed order);
then the body and, with template arguments, an explicit instantiation. The test
tests/test_metal_emulator.py compares this text with the one MLX itself prints (`verbose=True`
inside `mx.export_function`, which records a metal kernel without running it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs with fewer elements in the constant address space

# MLX's get_type_string
TYPE_STRINGS = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
    mx.float64: "double",
}

# (attribute, type) in the order MLX writes them into the signature
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def type_string(dtype: mx.Dtype) -> str:
    try:
        return TYPE_STRINGS[dtype]
    except KeyError:
        raise ValueError(f"the Metal emulator does not support dtype {dtype}") from None


@dataclass(frozen=True)
class InputSpec:
    """How one input is passed: its dtype, rank, size and which shape buffers the body uses."""

    name: str
    dtype: mx.Dtype
    ndim: int
    size: int
    shape: bool
    strides: bool
    ndim_used: bool

    @property
    def space(self) -> str:
        return "constant" if self.size < MAX_CONSTANT_ARRAY_SIZE else "device"


@dataclass(frozen=True)
class Signature:
    """Everything the generated source and the launch need to agree on."""

    kernel_name: str
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    output_dtypes: tuple[mx.Dtype, ...]
    template: tuple[tuple[str, object], ...]
    attributes: tuple[str, ...]
    source: str  # the full generated Metal source

    @property
    def template_def(self) -> str:
        return template_definition(self.template)


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def used_attributes(source: str) -> tuple[str, ...]:
    return tuple(attr for attr, _ in METAL_ATTRIBUTES if attr in source)


def _template_value(value) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python; MLX prints it as 1/0
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, mx.Dtype):
        return type_string(value)
    raise ValueError(f"template argument {value!r} must be an int, a bool or an mx.Dtype")


def _template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def template_definition(template) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def kernel_name(name: str, inputs, output_dtypes, template) -> str:
    """MLX's host name: custom_kernel_<name>[_<template hash>]_<input types>_<output types>."""
    out = "custom_kernel_" + name
    if template:
        tdef = template_definition(template)
        hashed = re.sub(r"<|>|(, )", "_", tdef)[:-1]  # MLX drops the last character (the trailing '_')
        out += "_" + hashed
    for spec in inputs:
        out += "_" + type_string(spec.dtype)
        if spec.ndim == 0:
            out += "s"
        elif spec.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dtype in output_dtypes:
        out += "_" + type_string(dtype)
    return out


def build_signature(
    name: str,
    input_names,
    output_names,
    source: str,
    header: str,
    inputs_meta,  # [(dtype, ndim, size)] per input
    output_dtypes,
    template=(),
    atomic_outputs: bool = False,
) -> Signature:
    """The exact text MLX compiles for this call, plus the facts the emulator's launch needs."""
    template = tuple((str(k), v) for k, v in template)
    infos = shape_infos(source, input_names)
    specs = tuple(
        InputSpec(n, dt, nd, size, *info) for n, (dt, nd, size), info in zip(input_names, inputs_meta, infos)
    )
    attrs = used_attributes(source)
    kname = kernel_name(name, specs, output_dtypes, template)

    text = header
    if template:
        text += "template <" + ", ".join(f"{_template_kind(v)} {k}" for k, v in template) + ">\n"
    text += f"[[kernel]] void {kname}(\n"
    index = 0
    for spec in specs:
        ref = "&" if spec.ndim == 0 else "*"
        text += f"  const {spec.space} {type_string(spec.dtype)}{ref} {spec.name} [[buffer({index})]],\n"
        index += 1
        if spec.ndim > 0:
            if spec.shape:
                text += f"  const constant int* {spec.name}_shape [[buffer({index})]],\n"
                index += 1
            if spec.strides:
                text += f"  const constant int64_t* {spec.name}_strides [[buffer({index})]],\n"
                index += 1
            if spec.ndim_used:
                text += f"  const constant int& {spec.name}_ndim [[buffer({index})]],\n"
                index += 1
    n_in = len(specs)
    for i, (oname, odt) in enumerate(zip(output_names, output_dtypes)):
        tstr = type_string(odt)
        if atomic_outputs:
            tstr = f"atomic<{tstr}>"
        text += f"  device {tstr}* {oname} [[buffer({index})]]"
        # MLX compares the running buffer index (not the output count) with inputs + outputs - 1
        if index < n_in + len(output_names) - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
        index += 1
    types = dict(METAL_ATTRIBUTES)
    for i, attr in enumerate(attrs):
        text += f"  {types[attr]} {attr} [[{attr}]]"
        text += ",\n" if i < len(attrs) - 1 else ") {\n"
    text += source
    text += "\n}\n"
    if template:
        tdef = kname + template_definition(template)
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return Signature(kname, specs, tuple(output_names), tuple(output_dtypes), template, attrs, text)


def mlx_generated_source(name: str, input_names, output_names, source: str, inputs, output_shapes, output_dtypes,
                         template=None, header: str = "") -> str:
    """The source MLX itself generates for this call, captured on a machine without Metal.

    Inside `mx.export_function` tracing MLX records a metal kernel without running it, and with
    `verbose=True` prints the generated source to the process's stdout (C++ side), which is
    captured here through the file descriptor. Used to check `build_signature` against MLX."""
    import os
    import sys
    import tempfile

    kernel = mx.fast.metal_kernel(name=name, input_names=list(input_names), output_names=list(output_names),
                                  source=source, header=header)

    def traced(*args):
        kwargs = {"template": template} if template else {}
        return kernel(inputs=list(args), grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=list(output_shapes),
                      output_dtypes=list(output_dtypes), verbose=True, **kwargs)

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured, tempfile.TemporaryDirectory() as tmp:
        os.dup2(captured.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "kernel.mlxfn"), traced, *inputs)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode()
    start = text.index("```\n") + 4
    return text[start : text.rindex("\n```")]

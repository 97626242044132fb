"""Writing an H-Net checkpoint as ONNX graphs plus everything the runtime needs.

    export_onnx("hnet_1stage_L.pt", "onnx_dir/")

writes into `onnx_dir/` (atomically: a temporary directory renamed at the end):
    prefill.onnx        input_ids + mask -> logits, routing, every recurrent state
    extend.onnx         a piece (input_ids + mask) + states -> logits, routing, new states (prompts in pieces)
    step.onnx           one byte per sample + states -> logits, routing, new states
    step_cond.onnx      (batch_variants, the default) the same step, inner levels under an ONNX If
    weights.onnx.data   (large models, or external_data=True) the weights, shared by all graphs
    config.json         the model config (official JSON format)
    export.json         opset, dtype, max_seqlen, quantization, the weights file's table of
                        tensors, versions of the exporter's packages
    io.json             every graph input and output: name, dtype, shape, meaning

The graphs come from one torch.export trace each of graph.PrefillGraph, ExtendGraph and
StepGraph("cond"); step.onnx is derived from step_cond.onnx without tracing (step_where.py). They are
translated by torch.onnx's dynamo exporter (capture.py; the TorchScript exporter bakes the
data-dependent chunk counts into constants). This module imports
torch; the runtime never imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch

from hnet_core import io
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_torch.lm import HNetForCausalLM
from hnet_torch.loading import load_pretrained

from . import subgraphs, tracing
from .layout import graph_io
from .step_where import DERIVED, where_step_from_cond
from .weights import LinearWeights, Quantization, check_quantization

FORMAT_VERSION = 1  # additions since (quantization, weights) are optional keys older runtimes ignore
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's function library starts at opset 18
DEFAULT_MAX_SEQLEN = 8192  # H-Net's training context (bytes)
DTYPES = ("float32", "float16")
WEIGHTS_FILE = "weights.onnx.data"
EXTERNAL_DATA_AUTO_BYTES = 64 << 20  # above 64 MiB the graphs share one weights file (not one copy each)
_ALIGN = 4096  # every tensor in the weights file starts on a page, so readers can map it directly

@dataclass
class ExportResult:
    directory: str
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    seconds: float = 0.0
    external_data: bool = False


class _SharedWeights:
    """One external-data file holding each weight once, referenced by every graph."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, WEIGHTS_FILE)
        self.entries: dict[str, tuple[int, int, ir.DataType, tuple]] = {}
        self.file = open(self.path, "wb")

    def externalize(self, model: ir.Model, names: set[str]) -> None:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if value.name not in names or tensor is None:
                continue
            key = (tensor.dtype, tuple(tensor.shape.numpy()))
            if value.name not in self.entries:
                data = tensor.tobytes()
                offset = -(-self.file.tell() // _ALIGN) * _ALIGN
                self.file.seek(offset)
                self.file.write(data)
                self.entries[value.name] = (offset, len(data), *key)
            offset, length, dtype, shape = self.entries[value.name]
            if (dtype, shape) != key:
                raise AssertionError(f"weight {value.name} differs between graphs")
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, dtype, shape=ir.Shape(shape),
                                                  name=value.name, base_dir=self.directory)

    def table(self) -> dict:
        """export.json's `weights`: where each tensor lies in the file, so a runtime can map the file
        once and hand every session the same arrays (runtime.SharedWeights)."""
        tensors = {name: {"offset": offset, "length": length, "dtype": dtype.numpy().name, "shape": list(shape)}
                   for name, (offset, length, dtype, shape) in self.entries.items()}
        return {"file": WEIGHTS_FILE, "tensors": tensors}

    def close(self) -> None:
        self.file.close()


def _save(model: ir.Model | onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Write `model` to `path` and check it; returns the protobuf as written."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    subgraphs.push_down(proto.graph)  # If-branch weights where the CPU provider pre-packs them
    onnx.save_model(proto, path)  # weights kept as references into an external file stay so
    # full_check adds strict shape inference; given a path it also reads external data and > 2 GB.
    onnx.checker.check_model(path, full_check=True)
    return proto


def _versions() -> dict[str, str]:
    import onnxscript

    import hnet_core

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                "onnx_ir": ir.__version__, "numpy": np.__version__}
    try:
        from importlib.metadata import version

        versions["hnet-mlx"] = version("hnet-mlx")
    except Exception:
        versions["hnet-mlx"] = getattr(hnet_core, "__version__", "unknown")
    return versions


def check_options(opset: int, dtype: str, max_seqlen: int) -> None:
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise HNetError(f"--opset must be between {MIN_OPSET} and {latest} (the installed onnx), got {opset}")
    if dtype not in DTYPES:
        raise HNetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_seqlen < 2:
        raise HNetError(f"--max-seqlen must be at least 2, got {max_seqlen}")


def export_model(model: HNetForCausalLM, out_dir: str, opset: int = DEFAULT_OPSET, max_seqlen: int = DEFAULT_MAX_SEQLEN,
                 batch_variants: bool = True, force: bool = False, external_data: bool | None = None,
                 quantization: Quantization | None = None, log: Callable[[str], None] | None = None,
                 jobs: int | None = None) -> ExportResult:
    """Export a loaded hnet_torch model (its dtype is the export dtype) to `out_dir`.
    batch_variants also writes step_cond.onnx (the fastest step at batch 1 on CPU); quantization
    makes the Linear weights int8/int4 (weights.Quantization); jobs: processes tracing the graphs
    (None: one per core for a small model, tracing.default_jobs)."""
    log = log or (lambda _msg: None)
    dtype = {torch.float32: "float32", torch.float16: "float16"}.get(model.embeddings.weight.dtype)
    if dtype is None:
        raise HNetError(f"ONNX export supports float32 and float16 weights, got {model.embeddings.weight.dtype}")
    check_options(opset, dtype, max_seqlen)
    if quantization is not None:
        check_quantization(quantization.kind, quantization.block_size, dtype)
    config: HNetConfig = model.config
    model = model.eval()
    weight_names = {k for k, v in model.state_dict().items() if v.numel() * v.element_size() >= 1024}
    weight_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    if external_data is None:
        external_data = weight_bytes >= EXTERNAL_DATA_AUTO_BYTES
    graphs = ["prefill", "extend", "step"] + (["step_cond"] if batch_variants else [])
    traced_graphs = ["prefill", "extend", "step_cond"]  # step.onnx is derived from step_cond (step_where.py)
    if jobs is None:
        jobs = tracing.default_jobs(weight_bytes, len(traced_graphs))

    start = time.perf_counter()
    result = ExportResult(os.path.abspath(out_dir), external_data=external_data)
    io_table: dict = {}
    captured: dict[str, str | None] = {}
    linear = LinearWeights(quantization)
    with io.atomic_directory(out_dir, force=force) as tmp:
        shared = _SharedWeights(tmp) if external_data else None
        try:
            log(f"tracing {', '.join(traced_graphs)} ({jobs} process{'es' if jobs > 1 else ''}) ...")
            work = os.path.join(tmp, ".trace")
            with contextlib.closing(tracing.trace_graphs(model, traced_graphs, max_seqlen, dtype, opset, jobs,
                                                         work)) as traced:
                for name, onnx_model, captured[name] in traced:
                    log(f"exporting {name}.onnx ...")  # one line per graph (cache.py's progress bar counts them)
                    linear.rewrite(onnx_model)
                    if shared is not None:
                        shared.externalize(onnx_model, {"model." + n for n in weight_names} | linear.names)
                        linear.release()
                    onnx_model.producer_name = "hnet-mlx"
                    written = _save(onnx_model, os.path.join(tmp, name + ".onnx"))
                    if name == "step_cond":
                        cond = written
        finally:
            if shared is not None:
                shared.close()
        log("exporting step.onnx (step_cond.onnx with every If taking its then-branch) ...")
        _save(where_step_from_cond(cond), os.path.join(tmp, "step.onnx"))
        captured["step"] = DERIVED
        if not batch_variants:
            os.remove(os.path.join(tmp, "step_cond.onnx"))
        for name in graphs:
            inputs, outputs = graph_io(config, max_seqlen, dtype, tracing.GRAPH_KINDS[name])
            io_table[name] = {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]}
        config.to_json(os.path.join(tmp, io.CONFIG_NAME))
        meta = {
            "format_version": FORMAT_VERSION,
            "opset": opset,
            "dtype": dtype,
            "max_seqlen": max_seqlen,
            "graphs": {name: name + ".onnx" for name in graphs},
            "step_variants": {"step": "where", **({"step_cond": "cond"} if batch_variants else {})},
            "external_data": WEIGHTS_FILE if external_data else None,
            # Linear weights: W.T (in, out) float32 MatMul weights, or MatMulNBits blocks (weights.py).
            "quantization": None if quantization is None else {**quantization.to_dict(), **linear.report()},
            "weights": shared.table() if shared is not None else None,
            "num_stages": config.num_stages,
            "parameters": sum(p.numel() for p in model.parameters()),
            "exporter": {**_versions(), "capture": {name: captured[name] for name in graphs}},
        }
        io.atomic_write_text(os.path.join(tmp, "export.json"), json.dumps(meta, indent=2) + "\n")
        io.atomic_write_text(os.path.join(tmp, "io.json"), json.dumps(io_table, indent=1) + "\n")
        result.files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    result.seconds = time.perf_counter() - start
    return result


def quantize_export(src_dir: str, out_dir: str, quantization: Quantization, force: bool = False,
                    log: Callable[[str], None] | None = None) -> ExportResult:
    """Write a quantized copy of a float32 export (no tracing: the graphs are read, their Linear
    MatMuls rewritten, and saved with the same io.json). `hnet export onnx --model <export dir>
    --quantize int4` runs this; it gives the same graphs as exporting the checkpoint with --quantize."""
    log = log or (lambda _msg: None)
    meta = json.load(open(os.path.join(src_dir, "export.json"), encoding="utf-8"))
    if meta.get("quantization") or meta.get("dtype") != "float32":
        raise HNetError(f"{src_dir} is not a float32 export (dtype {meta.get('dtype')}, quantization "
                        f"{(meta.get('quantization') or {}).get('kind')}); quantize a float32 export or the checkpoint")
    check_quantization(quantization.kind, quantization.block_size, meta["dtype"])
    start = time.perf_counter()
    external_data = bool(meta.get("external_data"))
    result = ExportResult(os.path.abspath(out_dir), external_data=external_data)
    linear = LinearWeights(quantization)
    with io.atomic_directory(out_dir, force=force) as tmp:
        shared = _SharedWeights(tmp) if external_data else None
        try:
            for file in meta["graphs"].values():
                log(f"quantizing {file} ...")
                model = ir.load(os.path.join(src_dir, file))
                subgraphs.hoist(model)  # every weight in the main graph, where rewrite and externalize look
                external = {v.name for v in model.graph.initializers.values()
                            if isinstance(v.const_value, ir.ExternalTensor)}
                linear.rewrite(model)
                if shared is not None:
                    shared.externalize(model, external | linear.names)
                    linear.release()
                _save(model, os.path.join(tmp, file))
        finally:
            if shared is not None:
                shared.close()
        for file in (io.CONFIG_NAME, "io.json"):
            with open(os.path.join(src_dir, file), encoding="utf-8") as f:
                io.atomic_write_text(os.path.join(tmp, file), f.read())
        meta.update(quantization={**quantization.to_dict(), **linear.report()},
                    weights=shared.table() if shared is not None else None, exporter=_versions())
        io.atomic_write_text(os.path.join(tmp, "export.json"), json.dumps(meta, indent=2) + "\n")
        result.files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    result.seconds = time.perf_counter() - start
    return result


def export_onnx(model_path: str, out_dir: str, config: str | None = None, opset: int = DEFAULT_OPSET,
                dtype: str = "float32", max_seqlen: int = DEFAULT_MAX_SEQLEN, batch_variants: bool = True,
                force: bool = False, external_data: bool | None = None, quantize: str | None = None,
                block_size: int | None = None, log: Callable[[str], None] | None = None,
                jobs: int | None = None) -> ExportResult:
    """Load a checkpoint (official .pt or model directory) and export it; see the module docstring.
    model_path may also be a float32 export directory, with quantize: see quantize_export."""
    check_options(opset, dtype, max_seqlen)
    quantization = check_quantization(quantize, block_size, dtype)
    io.check_output_path(out_dir, "output directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HNetError(f"output path {out_dir} exists and is not a directory; choose another path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        # Checked before the slow part too (atomic_directory checks again before writing).
        raise HNetError(f"output directory {out_dir} already exists and is not empty; pass --force to overwrite it")
    if os.path.exists(os.path.join(model_path, "export.json")):
        if quantization is None:
            raise HNetError(f"{model_path} is already an ONNX export; pass --quantize int8|int4 to quantize it, "
                            "or give a checkpoint")
        return quantize_export(model_path, out_dir, quantization, force=force, log=log)
    model = load_pretrained(model_path, config=config, dtype=dtype)
    return export_model(model, out_dir, opset=opset, max_seqlen=max_seqlen, batch_variants=batch_variants, force=force,
                        external_data=external_data, quantization=quantization, log=log, jobs=jobs)

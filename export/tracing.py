"""Tracing the graph modules of graph.py into ONNX models, in worker processes when that pays.

Each graph (prefill, extend, step, step_cond) is one torch.export trace (capture.py), which is
single-threaded Python for tens of seconds even for a small model; the four are independent, so a
small model's graphs are traced in parallel worker processes, one per core (`jobs`). A worker
(`python -m hnet_export.tracing`) gets the model as a safetensors directory the parent writes, and
hands back an ONNX file with the weights inline; the parent then rewrites and saves the graphs in their fixed order, so the export
is the same file for file whatever the number of workers. Large models are traced in this process
(a worker per graph would hold a copy of the weights each).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from typing import Iterator

import onnx_ir as ir
import torch

from hnet_core import io
from hnet_torch.lm import HNetForCausalLM
from hnet_torch.loading import load_pretrained, save_pretrained

from . import capture
from .graph import ExtendGraph, PrefillGraph, StepGraph
from .layout import BATCH, KV_SLOTS, LENGTH, TensorSpec, graph_io

PARALLEL_MAX_BYTES = 256 << 20  # weights above this are traced in this process, one graph at a time
GRAPH_KINDS = {"prefill": "prefill", "extend": "extend", "step": "step", "step_cond": "step"}
_FIXED_ARGS = {"prefill": None, "extend": 2, "step": 1}  # forward(input_ids, [mask,] *states)

# Example sizes used for tracing. They only need to differ from 0 and 1 (torch.export specialises
# those) and from each other; the graphs are traced symbolically and work for any size.
_EXAMPLE_BATCH = 2
_EXAMPLE_LENGTH = 37
_EXAMPLE_SLOTS = 23




def _dims(spec: TensorSpec) -> dict[int, str]:
    return {i: a for i, a in enumerate(spec.shape) if isinstance(a, str)}


def _example(spec: TensorSpec) -> torch.Tensor:
    sizes = {BATCH: _EXAMPLE_BATCH, LENGTH: _EXAMPLE_LENGTH, KV_SLOTS: _EXAMPLE_SLOTS}
    shape = [sizes[a] if isinstance(a, str) else a for a in spec.shape]
    if spec.dtype == "int64":
        return torch.full(shape, 3, dtype=torch.int64)
    if spec.dtype == "bool":
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=getattr(torch, spec.dtype))


class _ExporterNoise(logging.Filter):
    """torch.onnx warns once per torchvision op (nms, roi_align, ...) that torchvision is missing while it
    builds its op table, and once per shape computation that it has no module path to record for it
    (nodes the trace adds for symbolic sizes); neither says anything to our users."""

    NOISE = ("torchvision is not installed", "nn_module_stack not found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


_EXPORTER_LOGS = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core")


def trace(module: torch.nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec], opset: int,
          fixed_args: int | None) -> ir.Model:
    """The ONNX model of one graph module, its inputs and outputs named and shaped as in io.json."""
    args = tuple(_example(s) for s in inputs)
    dims = tuple(_dims(s) for s in inputs)
    if fixed_args is not None:  # forward(input_ids, [mask,] *states): dynamic shapes follow the signature
        dims = (*dims[:fixed_args], dims[fixed_args:])
    quiet = _ExporterNoise()
    for name in _EXPORTER_LOGS:
        logging.getLogger(name).addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = capture.to_onnx(module, args, [s.name for s in inputs], [s.name for s in outputs], opset, dims)
    finally:
        for name in _EXPORTER_LOGS:
            logging.getLogger(name).removeFilter(quiet)
    _name_axes(model, inputs, outputs)
    _strip_metadata(model)
    return model


def _strip_metadata(model: ir.Model) -> None:
    """Drop the exporter's per-node provenance (FX node, stack trace with local paths): it is most of
    a graph file's size and means nothing to a reader of the ONNX model."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()


def _name_axes(model: ir.Model, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Give every dynamic axis of the graph's inputs and outputs its io.json name (the exporter
    names data-dependent ones u0, u1, ...)."""
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for value, spec in zip(values, inputs + outputs):
        if value.name != spec.name:
            raise AssertionError(f"graph value {value.name} is not {spec.name}")
        dims = [ir.SymbolicDim(a) if isinstance(a, str) else a for a in spec.shape]
        value.shape = ir.Shape(dims)


def graph_module(model: HNetForCausalLM, name: str, max_seqlen: int) -> torch.nn.Module:
    """The graph.py module of graph `name`; it holds the model as `.model`, so weights are `model.<param>`."""
    if name == "prefill":
        return PrefillGraph(model, max_seqlen)
    if name == "extend":
        return ExtendGraph(model, max_seqlen)
    return StepGraph(model, max_seqlen, "cond" if name == "step_cond" else "where")


def _trace_graph(model: HNetForCausalLM, name: str, max_seqlen: int, dtype: str, opset: int) -> ir.Model:
    inputs, outputs = graph_io(model.config, max_seqlen, dtype, GRAPH_KINDS[name])
    with torch.no_grad():
        return trace(graph_module(model, name, max_seqlen), inputs, outputs, opset, _FIXED_ARGS[GRAPH_KINDS[name]])


def default_jobs(weight_bytes: int, graphs: int) -> int:
    """One tracing process per available core (up to one per graph; this process is one of them) for a
    small model, else this process alone (1)."""
    if weight_bytes > PARALLEL_MAX_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, graphs))


class _Worker:
    """`python -m hnet_export.tracing TASKS`: a fresh interpreter tracing its share of the graphs, one
    after another (the imports, a few seconds, are paid once per worker). For each graph it saves
    `<path>` and then `<path>.json` (how it was captured), so the parent can take the graphs as they
    come. Not multiprocessing: its spawned children re-run the caller's main script (a script
    without a __main__ guard would start workers of its own), and a Pool whose worker dies waits
    forever; here a worker that exits without a graph's marker is an error."""

    def __init__(self, tasks: list[dict]):
        self.tasks = tasks
        self.process = subprocess.Popen([sys.executable, "-m", "hnet_export.tracing", json.dumps(tasks)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, task: dict) -> tuple[ir.Model, str | None]:
        marker = task["path"] + ".json"
        while not os.path.exists(marker) and self.process.poll() is None:
            time.sleep(0.05)
        if not os.path.exists(marker):
            out, err = self.process.communicate()
            if self.process.returncode == _OS_ERROR:  # e.g. a full disk: the parent reports it as its own
                e = json.loads(out)
                raise OSError(e["errno"], e["strerror"], e["filename"])
            last = (err.strip().splitlines() or [f"exit status {self.process.returncode}"])[-1]
            raise RuntimeError(f"tracing {task['name']}.onnx failed in a worker process: {last}")
        with open(marker, encoding="utf-8") as f:
            how = json.load(f)["capture"]
        return ir.load(task["path"]), how

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def trace_graphs(model: HNetForCausalLM, names: list[str], max_seqlen: int, dtype: str, opset: int, jobs: int,
                 workdir: str) -> Iterator[tuple[str, ir.Model, str | None]]:
    """(name, ONNX model, capture path) for each graph in `names`, in that order. With jobs > 1 the
    graphs are dealt round-robin to this process and jobs - 1 worker processes (through files under
    `workdir`): this process traces its own share first, then takes the workers' graphs."""
    if jobs <= 1:
        for name in names:
            yield name, _trace_graph(model, name, max_seqlen, dtype, opset), capture.last_path()
        return
    model_dir = os.path.join(workdir, "model")
    workers: list[_Worker] = []
    try:
        # names come longest first (prefill, extend, then the steps), so round-robin balances the lanes;
        # lane 0 is this process, which starts at once (a worker first spends seconds on its imports).
        lanes = [names[i::jobs] for i in range(min(jobs, len(names)))]
        tasks = {name: {"model": model_dir, "name": name, "max_seqlen": max_seqlen, "dtype": dtype, "opset": opset,
                        "path": os.path.join(workdir, name + ".onnx")} for name in names}
        if len(lanes) > 1:
            save_pretrained(model, model_dir)
        workers = [_Worker([tasks[name] for name in lane]) for lane in lanes[1:]]
        owner = {name: workers[i - 1] for i, lane in enumerate(lanes) if i for name in lane}
        here = {}
        for name in lanes[0]:
            here[name] = (_trace_graph(model, name, max_seqlen, dtype, opset), capture.last_path())
        for name in names:
            model_ir, how = here.pop(name) if name in here else owner[name].result(tasks[name])
            yield name, model_ir, how
    finally:
        # An error, Ctrl-C, SIGTERM or the caller closing this generator: no worker outlives it, so none
        # writes into the directory after it is removed.
        for worker in workers:
            worker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


_OS_ERROR = 3  # a worker's exit status for an OSError, whose details it prints as JSON


def _main(tasks: list[dict]) -> int:
    torch.set_num_threads(1)  # tracing is Python; the other workers have the other cores
    try:
        model = load_pretrained(tasks[0]["model"], dtype=tasks[0]["dtype"]).eval()
        for task in tasks:
            ir.save(_trace_graph(model, task["name"], task["max_seqlen"], task["dtype"], task["opset"]), task["path"])
            io.atomic_write_text(task["path"] + ".json", json.dumps({"capture": capture.last_path()}))
    except OSError as e:
        print(json.dumps({"errno": e.errno, "strerror": e.strerror, "filename": e.filename}))
        return _OS_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(_main(json.loads(sys.argv[1])))

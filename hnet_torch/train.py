"""`hnet train`: pretraining and full fine-tuning in PyTorch, on one device or many processes.

    hnet train --config hnet_core/configs/hnet_1stage_L.json --data corpus.txt --out runs/a --steps 2000
    hnet train --model runs/a/model --data other.jsonl --out runs/b --lr 1e-4     # fine-tune
    torchrun --nproc-per-node 2 -m hnet_torch.train --config ... --data ... --out ...   # DDP
    hnet train ... --resume                                                          # continue runs/a

CUDA when available (FlexAttention, the compiled SSD scan and torch.compile'd blocks, or the
mamba_ssm / causal_conv1d / flash_attn kernels where installed: `--kernels`, `--compile`; bf16
autocast with --dtype bfloat16), CPU otherwise. Under torchrun every process trains on its share of each global batch
(DDP, gloo on CPU, NCCL on GPUs; `--fsdp` shards parameters, gradients and optimizer state with
FSDP2 for models that do not fit one GPU). Training runs the model's packed mode, as the official
code does. The loop itself (schedule, logs, checkpoints, resume, Ctrl-C, NaN) is
hnet_core/train_loop.py; this file is the PyTorch half.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys

import click
import numpy as np
import torch
import torch.distributed as dist

from hnet_core import checkpoint as ckpt
from hnet_core import train_loop
from hnet_core.config import HNetConfig
from hnet_core.data import Batch
from hnet_core.backends import check_device
from hnet_core.errors import HNetError
from hnet_core.train_cli import config_from_options, train_options
from hnet_core.train_config import TrainConfig

from . import kernels as kernel_paths
from .block import Block
from .isotropic import Isotropic
from .lm import HNetForCausalLM
from .loading import load_weights, save_pretrained
from .objective import local_sums, objective
from .optim import build_optimizer, load_optimizer, save_optimizer, set_lr
from .routing import RoutingModule

DEFAULTS = {"steps": 1000, "batch_size": 8, "seq_len": 512, "lr": 1e-3, "warmup": 100}


# -- processes -----------------------------------------------------------------------------


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif world == 1:  # under torchrun each process takes its own GPU (below), whatever the index given
        check_device("torch", device)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HNetError("--device cuda given but no CUDA GPU is visible; use --device cpu")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "python": [py_state[0], list(py_state[1]), py_state[2]],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict) -> None:
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "python" in state:
        p = state["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- torch.compile ---------------------------------------------------------------------------
#
# Regional compilation: every Isotropic stack and routing module becomes one compiled region. The
# hot path of a training step is the stacks of Mamba2 / attention / MLP blocks at each level; each
# compiles to one graph (no graph breaks inside: tests/test_torch_compile.py checks it) with
# dynamic shapes, because the inner levels' lengths change every step (dynamic chunking). What
# lies between the regions is data-dependent by nature (which bytes are boundaries, how many
# chunks each sequence has) and small: boundary selection, chunk gathering and the dechunk layer
# stay eager, so no region guards on a data-dependent size. Recompiles are bounded by the number
# of distinct stacks (widths, layer counts) and the few shape specialisations Dynamo makes (sizes
# 0/1, chunk-size multiples); they stop after the first steps (counted by the tests and by
# bench/bench_cuda_train.py). Inside a region the kernel plan still applies: the "compiled" scan
# and FlexAttention are inlined into the region's graph.


def compiled_regions(model: HNetForCausalLM) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Isotropic, RoutingModule))]


def compile_model(model: HNetForCausalLM, backend: str = "inductor", mode: str | None = None) -> HNetForCausalLM:
    """Compile the model's regions in place (forward and backward; `step` stays eager) and return it."""
    kernel_paths.probe_all()  # the traced dispatch then only reads caches
    regions = compiled_regions(model)
    # All stacks share one code object (Isotropic.forward) and Dynamo's cache limit counts entries
    # per code object: give every distinct stack room for its specialisations.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(regions))
    for m in regions:
        m.compile(dynamic=True, backend=backend, mode=mode)
    return model


def use_compile(setting: str, device: torch.device) -> bool:
    """--compile auto|on|off: "auto" compiles on CUDA (where Triton builds the kernels), not on CPU
    (there the first steps would spend minutes in the C++ compiler)."""
    if setting not in ("auto", "on", "off"):
        raise HNetError(f"--compile must be auto, on or off, got {setting!r}")
    missing = kernel_paths.compiler_missing(device.type) if device.type in ("cpu", "cuda") else "unsupported device"
    if setting == "on" and missing is not None:
        raise HNetError(f"--compile on cannot run: {missing}")
    if setting == "on" and device.type == "cpu":
        # tests/test_torch_compile.py: the compiled training step aborts the process natively
        # ("double free or corruption") in its backward on CPU with torch 2.13's Inductor.
        raise HNetError(f"--compile on is refused on CPU: torch {torch.__version__}'s C++ code for this model's "
                        "backward corrupts memory (tests/test_torch_compile.py); train on CPU with --compile off")
    return setting == "on" or (setting == "auto" and device.type == "cuda" and missing is None)


def compile_counters() -> dict[str, int]:
    """Dynamo's counts since the last `torch._dynamo.reset()`: graphs and frames compiled, graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# -- the PyTorch half of the loop ----------------------------------------------------------


class TorchBackend:
    name = "torch"

    def __init__(self, model: HNetForCausalLM, config: TrainConfig, device: torch.device, rank: int = 0,
                 world: int = 1, fsdp: bool = False, kernels: str = "auto", compile: str = "auto"):
        self.config, self.device, self.rank, self.world, self.fsdp = config, device, rank, world, fsdp
        self.model = model.to(device).train()
        if device.type == "cuda":
            # cuDNN's SDPA builds an execution plan for every new shape, and the inner levels'
            # lengths change every step (dynamic chunking): on an H100 that planning made bf16
            # steps 5x slower than fp32 (bench/gpu_train_check.py). The other SDPA kernels don't plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model.set_kernels(kernels)
        self.autocast = config.dtype == "bfloat16"
        activations = torch.bfloat16 if self.autocast else next(self.model.parameters()).dtype
        self.kernel_choice = kernel_paths.resolve(kernels, device, activations)  # fails early, says what runs
        self.compiled = use_compile(compile, device)
        if self.compiled:
            compile_model(self.model)
        self.num_stages = model.config.num_stages
        self.ratios = config.ratios_for(self.num_stages)
        config.multipliers_for(model.config.num_levels)  # validate early
        self.module = self.model
        if world > 1 and fsdp:
            import warnings

            from torch.distributed.fsdp import fully_shard

            # Blocks return views of their fp32 residual stream; nothing here modifies a block
            # output in place (every residual add is out of place), which is what FSDP2 warns about.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

            for m in self.model.modules():
                if isinstance(m, Block):
                    fully_shard(m)
            fully_shard(self.model)
        elif world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.model, config, fused=device.type == "cuda" and not fsdp)
        self.collective_forward = world > 1 and fsdp  # every FSDP forward needs all processes

    # helpers -------------------------------------------------------------------------------

    def _tensors(self, batch: Batch):
        ids = torch.from_numpy(np.ascontiguousarray(batch.input_ids)).to(self.device, torch.long)
        mask = torch.from_numpy(batch.mask).to(self.device) if batch.mask is not None else None
        cu = torch.from_numpy(batch.cu_seqlens).to(self.device, torch.long) if batch.cu_seqlens is not None else None
        return ids, mask, cu

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.module.no_sync()

    def _all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    # TrainerBackend --------------------------------------------------------------------------

    def train_step(self, batches: list[Batch], lr: float) -> train_loop.StepStats:
        set_lr(self.optimizer, lr)
        self.model.train()
        k = len(batches)
        sums = {"loss": 0.0, "ce": 0.0, "ratio_losses": np.zeros(self.num_stages), "boundary_rates": np.zeros(self.num_stages)}
        all_sum = self._all_sum_tensor if self.world > 1 else None
        for i, batch in enumerate(batches):
            ids, mask, cu = self._tensors(batch)
            with self._sync(i == k - 1):
                with self._autocast():
                    out = self.module(ids, mask=mask, cu_seqlens=cu)
                loss, m = objective(out, ids, self.ratios, self.config.alpha, mask=mask, cu_seqlens=cu,
                                    all_sum=all_sum, world=self.world)
                (loss / k).backward()
            sums["loss"] += m["loss"] / k
            sums["ce"] += m["ce"] / k
            sums["ratio_losses"] += np.asarray(m["ratio_losses"]) / k
            sums["boundary_rates"] += np.asarray(m["boundary_rates"]) / k
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        applied = math.isfinite(grad_norm) and math.isfinite(sums["loss"])
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        num_bytes = sum(b.num_bytes for b in batches) * self.world
        return train_loop.StepStats(sums["loss"], sums["ce"], sums["ratio_losses"].tolist(),
                                    sums["boundary_rates"].tolist(), grad_norm, num_bytes, applied)

    @torch.no_grad()
    def eval_sums(self, batch: Batch) -> np.ndarray:
        self.model.eval()
        ids, mask, cu = self._tensors(batch)
        with self._autocast():
            out = self.model(ids, mask=mask, cu_seqlens=cu)
        s = local_sums(out.logits, ids, out.routing, mask=mask, cu_seqlens=cu).counts.cpu().numpy()
        self.model.train()
        return train_loop.eval_vector(s, self.num_stages)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        t = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _write_model(self, state: dict[str, torch.Tensor], directory: str) -> None:
        if not self.fsdp:
            save_pretrained(self.model, directory, force=True)
            return
        with torch.device("meta"):
            copy = HNetForCausalLM(self.model.config)
        copy = copy.to_empty(device="cpu")
        copy.load_state_dict(state)
        save_pretrained(copy, directory, force=True)

    def save(self, directory: str | None) -> dict:
        state = self._full_state() if self.fsdp else None
        if directory is not None:  # the model first: save_pretrained replaces the directory it writes
            self._write_model(state, directory)
        save_optimizer(self.model, self.optimizer, None if directory is None else os.path.join(directory, ckpt.OPTIMIZER_NAME))
        return {"rng": _rng_state(), "framework": f"torch {torch.__version__}"}

    def load(self, directory: str, state: dict) -> None:
        if state.get("backend", "torch") != "torch":
            raise HNetError(f"{directory} was written by the {state.get('backend')} trainer; resume it with that trainer")
        weights, _ = load_weights(directory)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))
        load_optimizer(self.model, self.optimizer, os.path.join(directory, ckpt.OPTIMIZER_NAME))
        _set_rng_state(state.get("rng", {}))

    def save_model(self, directory: str | None) -> None:
        state = self._full_state() if self.fsdp else None
        if directory is not None:
            self._write_model(state, directory)


# -- building the model --------------------------------------------------------------------


def build_model(config_path: str | None, model_path: str | None, resume_dir: str | None, seed: int) -> HNetForCausalLM:
    """A fresh model (official init, seeded), pretrained weights for fine-tuning, or the shape to resume into."""
    if resume_dir is not None:
        cfg = HNetConfig.from_json(os.path.join(resume_dir, "config.json"))
        return HNetForCausalLM(cfg)  # weights come from the checkpoint
    if model_path is not None:
        if config_path is not None:
            raise HNetError("give --config (train from scratch) or --model (fine-tune), not both")
        weights, cfg = load_weights(model_path)
        model = HNetForCausalLM(cfg)
        model.load_state_dict(weights)
        return model
    if config_path is None:
        raise HNetError("give --config CONFIG.json to train from scratch or --model DIR to fine-tune")
    cfg = HNetConfig.from_json(config_path)
    torch.manual_seed(seed)
    model = HNetForCausalLM(cfg)
    model.init_weights()
    return model


def train(config_path: str | None, model_path: str | None, data: str, out: str, train_config: TrainConfig,
          resume: str | None = None, explicit: dict | None = None, device: str | None = None, fsdp: bool = False,
          kernels: str = "auto", show_progress: bool = True, stop_at: int | None = None,
          time_limit: float | None = None, compile: str = "auto", restart_data: bool = False) -> str:
    """Run (or resume) a training run; returns the final model directory (or the checkpoint on Ctrl-C)."""
    if resume is None and (config_path is None) == (model_path is None):
        raise HNetError("give --config CONFIG.json to train from scratch or --model DIR to fine-tune (one of them)")
    rank, world, dev = init_distributed(device)
    try:
        plan = train_loop.plan_run(out, train_config, resume, explicit or {}, restart_data)
        sampler, val = train_loop.load_data(data, plan.config)
        model = build_model(config_path, model_path, plan.resume_from, plan.config.seed)
        backend = TorchBackend(model, plan.config, dev, rank, world, fsdp=fsdp, kernels=kernels, compile=compile)
        return train_loop.run(backend, plan, sampler, val, show_progress=show_progress, stop_at=stop_at,
                              time_limit=time_limit)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@click.command("train")
@click.option("--config", "config_path", default=None, help="Model config JSON (official format) to train from scratch.")
@click.option("--model", "model_path", default=None, help="Model directory or .pt to fine-tune (all weights).")
@train_options(DEFAULTS)
@click.option("--device", default=None, help="cpu, cuda or mps (default: cuda when available).")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard parameters/gradients/optimizer state (FSDP2).")
@click.option("--kernels", default="auto", show_default=True,
              help="Implementation of each path: auto, off (pure PyTorch + masked SDPA), on (mamba_ssm, "
                   "causal_conv1d, flash_attn), or e.g. scan=compiled,conv=pure,attention=flex (docs/gpu.md).")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile the model's blocks (auto: on CUDA only; refused on CPU, see docs/gpu.md).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.pass_context
def train_command(ctx, config_path, model_path, data, out, resume, restart_data, stop_at, time_limit, device, fsdp,
                  kernels, compile_, threads, **options):
    """Train an H-Net from scratch (--config) or fine-tune one (--model) in PyTorch."""
    from .kernels import parse_plan

    parse_plan(kernels)  # a bad --kernels fails before any data is read
    if int(os.environ.get("RANK", "0")) == 0:
        # Say once which implementation each path uses (kernels.choose logs its "auto" picks).
        kernel_log = logging.getLogger("hnet_torch.kernels")
        if not kernel_log.handlers:
            kernel_log.addHandler(logging.StreamHandler())
            kernel_log.setLevel(logging.INFO)
    cfg, explicit = config_from_options(ctx, options, DEFAULTS)
    if threads is not None:
        torch.set_num_threads(threads)
    train(config_path, model_path, data, out, cfg, resume=resume, explicit=explicit, device=device, fsdp=fsdp,
          kernels=kernels, stop_at=stop_at, time_limit=time_limit, compile=compile_, restart_data=restart_data)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `torchrun -m hnet_torch.train ...` (user mistakes print one line)."""
    try:
        train_command.main(args=argv, prog_name="hnet train", standalone_mode=False)
    except HNetError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()

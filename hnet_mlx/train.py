"""`hnet-mlx train` / `hnet-mlx finetune`: training on-device with MLX (MLX-specific commands).

    hnet-mlx train --config hnet_core/configs/hnet_1stage_L.json --data corpus.txt --out runs/a --steps 2000
    hnet-mlx finetune --model runs/a/model --data chats.jsonl --out runs/b               # all weights
    hnet-mlx finetune --model runs/a/model --data chats.jsonl --out runs/c --lora --lora-rank 8
    hnet-mlx fuse --adapters runs/c --out runs/c-fused                                   # merge LoRA
    mlx.launch -n 2 --backend ring $(which hnet-mlx) train ...     # data parallel over processes

The PyTorch trainer's twin: the same flags, TrainConfig, data order, objective, optimizer
arithmetic and checkpoint layout (hnet_core/train_loop.py runs the loop). Under `mlx.launch`
every process takes its share of each global batch and the gradients are averaged with
`mx.distributed.all_sum`; the objective's counts are summed first so the result equals one
process with the whole batch (see objective.py).

Checkpoints hold the weights in torch layout (hnet_torch.load_pretrained and hnet_mlx.load read
them), or, for LoRA, only the adapters (merge them with `hnet-mlx fuse`).
"""

from __future__ import annotations

import os
import random

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from hnet_core import checkpoint as ckpt
from hnet_core import train_loop
from hnet_core.config import HNetConfig
from hnet_core.data import Batch
from hnet_core.errors import HNetError
from hnet_core.train_cli import config_from_options, train_options
from hnet_core.train_config import TrainConfig

from . import lora as lora_lib
from .lm import HNetForCausalLM
from .loading import cast_weights, load_pretrained
from .objective import local_sums, objective
from .optim import AdamW, clip_by_global_norm, flat_params

TRAIN_DEFAULTS = {"steps": 1000, "batch_size": 8, "seq_len": 512, "lr": 1e-3, "warmup": 100}
FINETUNE_DEFAULTS = {"steps": 200, "batch_size": 4, "seq_len": 512, "lr": 1e-4, "warmup": 20, "weight_decay": 0.0}


def init_distributed():
    """The mx.distributed group when launched by mlx.launch (size 1 otherwise)."""
    return mx.distributed.init()


class MLXBackend:
    name = "mlx"

    def __init__(self, model: HNetForCausalLM, config: TrainConfig, group=None, lora: dict | None = None):
        self.model, self.config, self.lora = model, config, lora
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.num_stages = model.config.num_stages
        self.ratios = config.ratios_for(self.num_stages)
        mult = model.lr_multipliers(config.multipliers_for(model.config.num_levels))
        if config.dtype == "bfloat16":  # bf16 compute; fp32 masters live in the optimizer
            params = dict(tree_flatten(model.parameters()))
            model.update(tree_unflatten(list(cast_weights(params, mx.bfloat16).items())))
        model.train()
        self.optimizer = AdamW(flat_params(model), config, mult)
        self._loss_and_grad = nn.value_and_grad(model, self._loss)
        mx.eval(model.parameters())

    # helpers -------------------------------------------------------------------------------

    def _arrays(self, batch: Batch):
        ids = mx.array(np.ascontiguousarray(batch.input_ids, dtype=np.int32))
        mask = mx.array(batch.mask) if batch.mask is not None else None
        cu = mx.array(batch.cu_seqlens.astype(np.int32)) if batch.cu_seqlens is not None else None
        return ids, mask, cu

    def _all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def _loss(self, ids, mask, cu):
        out = self.model(ids, mask=mask, cu_seqlens=cu)
        return objective(out, ids, self.ratios, self.config.alpha, mask=mask, cu_seqlens=cu,
                         all_sum=self._all_sum if self.world > 1 else None, world=self.world)

    def _average(self, grads: dict[str, mx.array]) -> dict[str, mx.array]:
        """Mean over processes, as one all_sum of all gradients flattened together."""
        names = sorted(grads)
        flat = mx.concatenate([grads[n].astype(mx.float32).reshape(-1) for n in names])
        flat = mx.distributed.all_sum(flat, group=self.group) / self.world
        out, offset = {}, 0
        for n in names:
            size = grads[n].size
            out[n] = flat[offset:offset + size].reshape(grads[n].shape).astype(grads[n].dtype)
            offset += size
        return out

    # TrainerBackend --------------------------------------------------------------------------

    def train_step(self, batches: list[Batch], lr: float) -> train_loop.StepStats:
        k = len(batches)
        acc: dict[str, mx.array] | None = None
        metrics = {"loss": 0.0, "ce": 0.0, "ratio_losses": np.zeros(self.num_stages),
                   "boundary_rates": np.zeros(self.num_stages)}
        for batch in batches:
            ids, mask, cu = self._arrays(batch)
            (_, totals), grads = self._loss_and_grad(ids, mask, cu)
            grads = dict(tree_flatten(grads))
            acc = grads if acc is None else {n: acc[n] + grads[n] for n in acc}
            mx.eval(acc, totals)  # one micro-batch's graph at a time
            m = train_loop.totals_metrics(np.array(totals), self.ratios, self.config.alpha)
            metrics["loss"] += m["loss"] / k
            metrics["ce"] += m["ce"] / k
            metrics["ratio_losses"] += np.asarray(m["ratio_losses"]) / k
            metrics["boundary_rates"] += np.asarray(m["boundary_rates"]) / k
        if k > 1:
            acc = {n: g / k for n, g in acc.items()}
        if self.world > 1:
            acc = self._average(acc)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        acc, norm = clip_by_global_norm(acc, clip)
        grad_norm = float(norm.item())
        applied = bool(np.isfinite(grad_norm) and np.isfinite(metrics["loss"]))
        if applied:
            params = flat_params(self.model)
            new = self.optimizer.update(params, acc, lr)
            self.model.update(tree_unflatten(list(new.items())))
            mx.eval(self.model.parameters(), self.optimizer.arrays())
        num_bytes = sum(b.num_bytes for b in batches) * self.world
        return train_loop.StepStats(metrics["loss"], metrics["ce"], metrics["ratio_losses"].tolist(),
                                    metrics["boundary_rates"].tolist(), grad_norm, num_bytes, applied)

    def eval_sums(self, batch: Batch) -> np.ndarray:
        ids, mask, cu = self._arrays(batch)
        out = self.model(ids, mask=mask, cu_seqlens=cu)
        counts = local_sums(out.logits, ids, out.routing, mask=mask, cu_seqlens=cu).counts
        return train_loop.eval_vector(np.array(counts, dtype=np.float64), self.num_stages)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        summed = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)), group=self.group)
        return np.array(summed, dtype=np.float64)

    def _write_weights(self, directory: str) -> None:
        if self.lora is not None:
            lora_lib.save_adapters(self.model, directory, self.lora)
        else:
            lora_lib.write_torch_layout_model(self.model, directory, force=True)

    def save(self, directory: str | None) -> dict:
        if directory is not None:  # weights first: writing a model directory replaces the directory
            self._write_weights(directory)
            self.optimizer.save(os.path.join(directory, ckpt.OPTIMIZER_NAME))
        np_state = np.random.get_state()
        py_state = random.getstate()
        # mlx 0.32 does not expose its global RNG key; training draws no random numbers after
        # initialisation, so resuming is exact without it.
        rng = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
               "python": [py_state[0], list(py_state[1]), py_state[2]]}
        return {"rng": rng, "framework": f"mlx {mx.__version__}", "optimizer_step": self.optimizer.step_count,
                **({"lora": self.lora} if self.lora is not None else {})}

    def load(self, directory: str, state: dict) -> None:
        if state.get("backend", "mlx") != "mlx":
            raise HNetError(f"{directory} was written by the {state.get('backend')} trainer; resume it with that trainer")
        if self.lora is not None:
            lora_lib.load_adapters(self.model, directory)
        else:
            weights = dict(tree_flatten(load_pretrained(directory).parameters()))
            current = dict(tree_flatten(self.model.parameters()))
            weights = {k: v.astype(current[k].dtype) for k, v in weights.items()}
            self.model.update(tree_unflatten(list(weights.items())))
        self.optimizer.load(os.path.join(directory, ckpt.OPTIMIZER_NAME), int(state.get("optimizer_step", state["step"])))
        rng = state.get("rng", {})
        if "numpy" in rng:
            n = rng["numpy"]
            np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        if "python" in rng:
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
        mx.eval(self.model.parameters(), self.optimizer.arrays())

    def save_model(self, directory: str | None) -> str | None:
        if directory is None:
            return None
        if self.lora is None:
            lora_lib.write_torch_layout_model(self.model, directory, force=True)
            return None
        out = os.path.dirname(directory)
        final = adapters_dir(out)
        from hnet_core import io

        with io.atomic_directory(final, force=True) as tmp:
            lora_lib.save_adapters(self.model, tmp, self.lora)
        # A LoRA run writes no model directory: say where the adapters are and how to make a model of them.
        return (f"LoRA adapters in {final} (no merged model is written); merge them into a model with: "
                f"hnet-mlx fuse --adapters {out} --out {os.path.join(out, 'fused')}")


def adapters_dir(out: str) -> str:
    """Where a LoRA run's final adapters go (beside the checkpoints, instead of OUT/model)."""
    return os.path.join(out, "adapters")


# -- building the model --------------------------------------------------------------------


def new_model(config_path: str, seed: int) -> HNetForCausalLM:
    cfg = HNetConfig.from_json(config_path)
    mx.random.seed(seed)
    model = HNetForCausalLM(cfg)
    model.init_weights()
    mx.eval(model.parameters())
    return model


def run(model_fn, data: str, out: str, train_config: TrainConfig, resume: str | None, explicit: dict,
        lora: dict | None = None, show_progress: bool = True, stop_at: int | None = None,
        time_limit: float | None = None, kernels: str | None = None, restart_data: bool = False) -> str:
    """Plan, load data, build the model (model_fn(resume_dir) -> model), train."""
    group = init_distributed()
    plan = train_loop.plan_run(out, train_config, resume, explicit, restart_data)
    if plan.resume_from is not None and lora is None and "lora" in plan.resume_state:
        lora = plan.resume_state["lora"]
    sampler, val = train_loop.load_data(data, plan.config)
    model = model_fn(plan.resume_from)
    if kernels is not None:  # else the model's default: $HNET_METAL_KERNELS, or "auto"
        model.set_kernels(kernels)
    if lora is not None:
        mx.random.seed(plan.config.seed)
        lora["adapted"] = lora_lib.apply_lora(model, lora["rank"], tuple(lora["layers"]), lora["scale"])
    backend = MLXBackend(model, plan.config, group, lora=lora)
    result = train_loop.run(backend, plan, sampler, val, show_progress=show_progress, stop_at=stop_at,
                            time_limit=time_limit)
    if lora is not None and result == os.path.join(out, ckpt.FINAL_MODEL):
        return adapters_dir(out)  # what a finished LoRA run wrote
    return result


def train(config_path: str | None, data: str, out: str, train_config: TrainConfig, resume: str | None = None,
          explicit: dict | None = None, **kw) -> str:
    """Pretraining from scratch (the model config at `config_path`), or its resumption."""
    if config_path is None and resume is None:
        raise HNetError("give --config CONFIG.json (the model to train from scratch)")

    def model_fn(resume_dir):
        if resume_dir is not None:
            return HNetForCausalLM(HNetConfig.from_json(os.path.join(resume_dir, "config.json")))
        if config_path is None:
            raise HNetError("give --config CONFIG.json (the model to train from scratch)")
        return new_model(config_path, train_config.seed)

    return run(model_fn, data, out, train_config, resume, explicit or {}, **kw)


def finetune(model_path: str | None, data: str, out: str, train_config: TrainConfig, resume: str | None = None,
             explicit: dict | None = None, lora_rank: int | None = None, lora_layers: str | None = None,
             lora_scale: float = 2.0, **kw) -> str:
    """Full fine-tuning of `model_path`, or LoRA when lora_rank is given."""
    if model_path is None and resume is None:
        raise HNetError("give --model DIR (the model to fine-tune)")
    lora = None
    if lora_rank is not None:
        lora = {"rank": int(lora_rank), "layers": list(lora_lib.parse_layers(lora_layers)), "scale": float(lora_scale),
                "base_model": os.path.abspath(model_path) if model_path else None}

    def model_fn(resume_dir):
        base = model_path
        if resume_dir is not None:
            state = ckpt.read_state(resume_dir)
            if "lora" not in state:  # full fine-tune: the checkpoint is the model
                return HNetForCausalLM(HNetConfig.from_json(os.path.join(resume_dir, "config.json")))
            base = base or state["lora"].get("base_model")
        if base is None:
            raise HNetError("give --model DIR (the model to fine-tune)")
        model = load_pretrained(base)
        if model.config.quantization is not None and lora is None:
            raise HNetError("full fine-tuning needs a float model; convert without -q or use --lora")
        return model.train()

    return run(model_fn, data, out, train_config, resume, explicit or {}, lora=lora, **kw)


_common = [
    click.option("--kernels", type=click.Choice(["auto", "on", "off"]), default=None,
                 help="Metal kernels (Apple silicon) or pure MLX  [default: $HNET_METAL_KERNELS, else auto]"),
]


def _with_common(f):
    for option in reversed(_common):
        f = option(f)
    return f


@click.command("train")
@click.option("--config", "config_path", default=None, help="Model config JSON (official format) to train from scratch.")
@train_options(TRAIN_DEFAULTS)
@_with_common
@click.pass_context
def train_command(ctx, config_path, data, out, resume, restart_data, stop_at, time_limit, kernels, **options):
    """Train an H-Net from scratch with MLX."""
    cfg, explicit = config_from_options(ctx, options, TRAIN_DEFAULTS)
    train(config_path, data, out, cfg, resume=resume, explicit=explicit, stop_at=stop_at, time_limit=time_limit,
          kernels=kernels, restart_data=restart_data)


@click.command("finetune")
@click.option("--model", "model_path", default=None, help="Model directory to fine-tune.")
@train_options(FINETUNE_DEFAULTS)
@click.option("--lora", is_flag=True, help="Train LoRA adapters instead of all weights; the run ends with OUT/adapters (no OUT/model): merge them with hnet-mlx fuse.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-layers", default=None,
              help=f"Comma-separated Linear layer names to adapt (default {','.join(lora_lib.DEFAULT_LAYERS)}; or all).")
@click.option("--lora-scale", type=float, default=2.0, show_default=True, help="LoRA scale (alpha / rank).")
@_with_common
@click.pass_context
def finetune_command(ctx, model_path, data, out, resume, restart_data, stop_at, time_limit, lora, lora_rank,
                     lora_layers, lora_scale, kernels, **options):
    """Fine-tune a model with MLX: all weights, or LoRA adapters (--lora)."""
    cfg, explicit = config_from_options(ctx, options, FINETUNE_DEFAULTS)
    finetune(model_path, data, out, cfg, resume=resume, explicit=explicit, lora_rank=lora_rank if lora else None,
             lora_layers=lora_layers, lora_scale=lora_scale, stop_at=stop_at, time_limit=time_limit, kernels=kernels,
             restart_data=restart_data)

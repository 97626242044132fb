"""AdamW with weight-decay groups and per-level learning-rate multipliers; optimizer state by name.

Groups: one per (level, decay?) pair. No weight decay for biases, norm weights, Mamba2's A_log,
D and dt_bias, and pad_dimension (every parameter with fewer than 2 dimensions, plus those names);
everything else decays. Each group's learning rate is the scheduled rate times the multiplier of
its level (`HNetForCausalLM.lr_multipliers`, official semantics: embeddings and lm_head take level
0's). The optimizer state is saved keyed by parameter name, so it survives DDP/FSDP wrapping.
"""

from __future__ import annotations

import os

import torch

from hnet_core.train_config import TrainConfig

NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "pad_dimension")


def decays(name: str, param: torch.Tensor) -> bool:
    # Norm weights and biases are 1-D, so the ndim test covers them.
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model, config: TrainConfig) -> list[dict]:
    """AdamW groups: {"params", "names", "weight_decay", "lr_multiplier"}, in a fixed order."""
    mult = model.lr_multipliers(config.multipliers_for(model.config.num_levels))
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (mult[name], decays(name, p))
        g = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0],
                                    "weight_decay": config.weight_decay if key[1] else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def build_optimizer(model, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_multiplier": g["lr_multiplier"],
               "lr": config.lr * g["lr_multiplier"]} for g in param_groups(model, config)]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_multiplier", 1.0)


def save_optimizer(model, optimizer, path: str | None) -> None:
    """Collective under FSDP. Rank 0 (path not None) writes the moments as `<param>.exp_avg` etc."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if path is None:
        return
    tensors = {}
    for name, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().float().contiguous().cpu()
    save_file(tensors, path, metadata={"format": "hnet-adamw"})


def load_optimizer(model, optimizer, path: str) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not os.path.exists(path):
        from hnet_core.errors import HNetError

        raise HNetError(f"optimizer state not found: {path}; the checkpoint is incomplete")
    flat = load_file(path)
    state: dict = {}
    for key, value in flat.items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = value
    # Every process reads the file, so each builds the full (name-keyed) state dict itself; under
    # FSDP set_optimizer_state_dict keeps only its own shard.
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))

"""AdamW with weight-decay groups and per-level learning-rate multipliers (mirror of hnet_torch/optim.py).

Same groups and the same arithmetic as `torch.optim.AdamW` (decoupled weight decay, bias
correction), so a run behaves the same in both frameworks: no weight decay for biases, norm
weights, A_log, D, dt_bias and pad_dimension; the scheduled learning rate times the multiplier of
the parameter's level. State is a flat dict keyed by parameter name (`<name>.exp_avg`,
`<name>.exp_avg_sq`) plus the step count, which is also the checkpoint format.

Mixed precision: parameters stored in a lower precision than float32 get an fp32 master copy
here; the update runs on the master and the model receives it cast back.
The whole update is one `mx.compile`d function of (params, grads, state, lr).
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
from mlx.utils import tree_flatten

from hnet_core.errors import HNetError
from hnet_core.train_config import TrainConfig

NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "pad_dimension")


def decays(name: str, param: mx.array) -> bool:
    # Norm weights and biases are 1-D, so the ndim test covers them.
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def clip_by_global_norm(grads: dict[str, mx.array], max_norm: float) -> tuple[dict[str, mx.array], mx.array]:
    """torch.nn.utils.clip_grad_norm_ semantics: scale by max_norm / (norm + 1e-6) when that is < 1."""
    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in grads.values()))
    if max_norm <= 0 or math.isinf(max_norm):
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return {k: (g.astype(mx.float32) * scale).astype(g.dtype) for k, g in grads.items()}, norm


class AdamW:
    def __init__(self, params: dict[str, mx.array], config: TrainConfig, lr_multipliers: dict[str, float]):
        self.names = sorted(params)
        self.beta1, self.beta2, self.eps = config.beta1, config.beta2, config.eps
        self.mult = {n: float(lr_multipliers.get(n, 1.0)) for n in self.names}
        self.wd = {n: config.weight_decay if decays(n, params[n]) else 0.0 for n in self.names}
        self.step_count = 0
        self.master = {n: params[n].astype(mx.float32) for n in self.names if params[n].dtype != mx.float32}
        self.m = {n: mx.zeros(params[n].shape, dtype=mx.float32) for n in self.names}
        self.v = {n: mx.zeros(params[n].shape, dtype=mx.float32) for n in self.names}
        self._update = mx.compile(self._update_impl)

    def _update_impl(self, params, grads, m, v, master, lr, bc1, bc2):
        new_p, new_m, new_v, new_master = {}, {}, {}, {}
        for n in self.names:
            g = grads[n].astype(mx.float32)
            p = master[n] if n in master else params[n]
            p = p * (1 - lr * self.mult[n] * self.wd[n])
            mn = self.beta1 * m[n] + (1 - self.beta1) * g
            vn = self.beta2 * v[n] + (1 - self.beta2) * mx.square(g)
            denom = mx.sqrt(vn) / mx.sqrt(bc2) + self.eps
            p = p - (lr * self.mult[n] / bc1) * mn / denom
            new_m[n], new_v[n] = mn, vn
            if n in master:
                new_master[n] = p
                new_p[n] = p.astype(params[n].dtype)
            else:
                new_p[n] = p
        return new_p, new_m, new_v, new_master

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array], lr: float) -> dict[str, mx.array]:
        """New parameter values (flat dict) after one step; the moments advance in place."""
        missing = [n for n in self.names if n not in grads]
        if missing:
            raise HNetError(f"internal: no gradient for {missing[0]}")
        self.step_count += 1
        t = self.step_count
        bc1 = mx.array(1 - self.beta1 ** t, dtype=mx.float32)
        bc2 = mx.array(1 - self.beta2 ** t, dtype=mx.float32)
        new_p, self.m, self.v, master = self._update(
            {n: params[n] for n in self.names}, {n: grads[n] for n in self.names}, self.m, self.v, self.master,
            mx.array(lr, dtype=mx.float32), bc1, bc2)
        self.master.update(master)
        return new_p

    def arrays(self) -> list[mx.array]:
        return [*self.m.values(), *self.v.values(), *self.master.values()]

    # checkpoint ------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Moments by parameter name (MLX layout), as `<name>.exp_avg` / `.exp_avg_sq` / `.master`."""
        tensors = {}
        for n in self.names:
            key = n
            tensors[f"{key}.exp_avg"] = self.m[n]
            tensors[f"{key}.exp_avg_sq"] = self.v[n]
            if n in self.master:
                tensors[f"{key}.master"] = self.master[n]
        mx.save_safetensors(path, tensors, metadata={"format": "hnet-adamw", "step": str(self.step_count)})

    def load(self, path: str, step: int) -> None:
        if not os.path.exists(path):
            raise HNetError(f"optimizer state not found: {path}; the checkpoint is incomplete")
        flat = mx.load(path)
        for n in self.names:
            key = n
            for field, store in (("exp_avg", self.m), ("exp_avg_sq", self.v)):
                value = flat.get(f"{key}.{field}")
                if value is None or tuple(value.shape) != tuple(store[n].shape):
                    raise HNetError(f"{path} does not match this model ({key}.{field}); resume with the same model")
                store[n] = value.astype(mx.float32)
            if n in self.master and f"{key}.master" in flat:
                self.master[n] = flat[f"{key}.master"]
        self.step_count = int(step)


def flat_params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))

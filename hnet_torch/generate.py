"""hnet_core.engine's Adapter for torch: generation, prompt caches and statistics run in the engine.

    from hnet_torch import load_pretrained, generate
    model = load_pretrained("model_dir/")
    print(generate(model, "Hello", max_tokens=64, temperature=0.8, seed=0))

`generate` / `stream_generate` take hnet_core.engine's arguments (prefill_step_size, prompt_cache,
stop, sampling, ...). Every call runs under inference_mode, so a serving loop may drive the adapter.
"""

from __future__ import annotations

import numpy as np
import torch

from hnet_core import engine
from hnet_core.engine import StepResult, rss_peak

from .cache import InferenceCache
from .lm import HNetForCausalLM
from .prompt_cache import export_cache, import_cache


def _result(logits: torch.Tensor, routing) -> StepResult:
    """logits (B, V) and the per-sample routing counts (S, B), on the host."""
    B = logits.shape[0]
    valid = torch.stack([(r.valid if r.valid is not None else torch.ones_like(r.boundary_mask)).reshape(B, -1).sum(1)
                         for r in routing])
    bounds = torch.stack([r.boundary_mask.reshape(B, -1).sum(1) for r in routing])
    return StepResult(logits.float().cpu().numpy(), valid.cpu().numpy(), bounds.cpu().numpy())


class Adapter:
    def __init__(self, model: HNetForCausalLM):
        self.model, self.config, self.device = model, model.config_dict, model.embeddings.weight.device

    @torch.inference_mode()
    def new_cache(self, batch_size: int, max_bytes: int) -> InferenceCache:
        return self.model.allocate_inference_cache(batch_size=batch_size)  # grows as bytes come

    @torch.inference_mode()
    def extend(self, cache: InferenceCache, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        ids_t, mask_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        out = self.model(ids_t, mask=mask_t, cache=cache)
        return _result(out.logits[torch.arange(ids.shape[0], device=self.device), torch.from_numpy(last).to(self.device)],
                       out.routing)

    @torch.inference_mode()
    def step(self, cache: InferenceCache, next_bytes: np.ndarray) -> StepResult:
        out = self.model.step(torch.from_numpy(next_bytes).to(self.device), cache)
        return _result(out.logits[:, -1], out.routing)

    def export_cache(self, cache: InferenceCache) -> tuple[dict, dict[str, np.ndarray]]:
        return export_cache(cache)

    def import_cache(self, tree: dict, arrays: dict[str, np.ndarray]) -> InferenceCache:
        return import_cache(tree, arrays, self.model.config_dict, self.device)

    def reset_peak_memory(self) -> None:
        pass  # neither the resident-set peak nor (as before) the CUDA peak is reset per generation

    def peak_memory(self) -> tuple[int, str] | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated()), "peak memory allocated by torch on the GPU"
        return rss_peak()


def stream_generate(model: HNetForCausalLM, prompts, **kwargs):
    """hnet_core.engine.stream_generate on `model` (same arguments after the prompts)."""
    return engine.stream_generate(Adapter(model), prompts, **kwargs)


def generate(model: HNetForCausalLM, prompt, **kwargs) -> str | list[str]:
    """hnet_core.engine.generate on `model`: the continuation (one string per prompt for a list)."""
    return engine.generate(Adapter(model), prompt, **kwargs)

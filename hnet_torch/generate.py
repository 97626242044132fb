"""torch's hnet_core.engine.Adapter; the engine generates (`generate(model, "Hello", temperature=0.8)`),
reads prompts in pieces, samples, streams and counts. Calls run under inference_mode."""

from __future__ import annotations

import numpy as np
import torch

from hnet_core import engine
from hnet_core.engine import StepResult, rss_peak

from .cache import InferenceCache
from .lm import HNetForCausalLM
from .prompt_cache import export_cache, import_cache


def _result(logits: torch.Tensor, routing) -> StepResult:  # on the host: logits (B, V), each stage's masks
    host = lambda t: None if t is None else t.cpu().numpy()  # noqa: E731
    return StepResult.from_masks(logits.float().cpu().numpy(), [(host(r.boundary_mask), host(r.valid)) for r in routing])


class Adapter(engine.Adapter):
    def __init__(self, model: HNetForCausalLM):
        self.model, self.config, self.device = model, model.config_dict, model.embeddings.weight.device

    @torch.inference_mode()
    def new_cache(self, batch_size: int, max_bytes: int) -> InferenceCache:
        return self.model.allocate_inference_cache(batch_size=batch_size)  # grows as bytes come

    @torch.inference_mode()
    def extend(self, cache: InferenceCache, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        ids_t, mask_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        out = self.model(ids_t, mask=mask_t, cache=cache)
        return _result(out.logits[torch.arange(len(last)), torch.from_numpy(last)], out.routing)

    @torch.inference_mode()
    def step(self, cache: InferenceCache, next_bytes: np.ndarray) -> StepResult:
        out = self.model.step(torch.from_numpy(next_bytes).to(self.device), cache)
        return _result(out.logits[:, -1], out.routing)

    export_cache = staticmethod(export_cache)

    def import_cache(self, tree: dict, arrays: dict[str, np.ndarray]) -> InferenceCache:
        return import_cache(tree, arrays, self.config, self.device)

    def peak_memory(self) -> tuple[int, str] | None:
        if self.device.type != "cuda":
            return rss_peak()
        return int(torch.cuda.max_memory_allocated()), "peak memory allocated by torch on the GPU"


def stream_generate(model: HNetForCausalLM, prompts, **kwargs):  # engine.stream_generate's arguments
    return engine.stream_generate(Adapter(model), prompts, **kwargs)


def generate(model: HNetForCausalLM, prompt, **kwargs) -> str | list[str]:  # engine.generate's arguments
    return engine.generate(Adapter(model), prompt, **kwargs)

"""MLX's hnet_core.engine.Adapter; the engine generates (`generate(model, "Hello", temperature=0.8)`),
reads prompts in pieces, samples (numpy: torch and MLX draw the same bytes), streams and counts."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from hnet_core import engine
from hnet_core.engine import StepResult, rss_peak

from .cache import InferenceCache, state_arrays
from .lm import HNetForCausalLM
from .prompt_cache import export_cache, import_cache


def _result(logits: mx.array, routing) -> StepResult:  # on the host (one sync): logits (B, V), each stage's masks
    # numpy sums the counts after the one evaluation: as MLX ops outside the compiled step they were
    # a dozen more dispatches every byte (65 µs of a ~2 ms step for the bundled model).
    logits = logits.astype(mx.float32)
    mx.eval(logits, [r.boundary_mask for r in routing], [r.valid for r in routing if r.valid is not None])
    host = lambda a: None if a is None else np.array(a)  # noqa: E731
    return StepResult.from_masks(np.array(logits), [(host(r.boundary_mask), host(r.valid)) for r in routing])


class Adapter(engine.Adapter):
    def __init__(self, model: HNetForCausalLM):
        self.model, self.config = model, model.config_dict

    def new_cache(self, batch_size: int, max_bytes: int) -> InferenceCache:
        return self.model.allocate_inference_cache(batch_size=batch_size)  # grows as bytes come

    def extend(self, cache: InferenceCache, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        out = self.model(mx.array(ids.astype(np.int32)), mask=mx.array(mask), cache=cache)
        rows = mx.take_along_axis(out.logits, mx.array(last.astype(np.int32))[:, None, None], axis=1)[:, 0]  # (B, V)
        # Evaluate the cache now: left lazy, each piece's graph (and activations) would stay alive.
        mx.eval(rows, cache.lengths, state_arrays(cache.backbone))
        return _result(rows, out.routing)

    def step(self, cache: InferenceCache, next_bytes: np.ndarray) -> StepResult:
        # numpy in: `step` range-checks it on the host; an mx.array would be checked on the device (one more sync).
        out = self.model.step(next_bytes, cache)
        return _result(out.logits[:, -1], out.routing)

    export_cache = staticmethod(export_cache)

    def import_cache(self, tree: dict, arrays: dict[str, np.ndarray]) -> InferenceCache:
        return import_cache(tree, arrays, self.config)

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> tuple[int, str] | None:
        allocated = int(mx.get_peak_memory())
        return (allocated, "peak memory allocated by MLX during generation") if allocated else rss_peak()


def stream_generate(model: HNetForCausalLM, prompts, **kwargs):  # engine.stream_generate's arguments
    return engine.stream_generate(Adapter(model), prompts, **kwargs)


def generate(model: HNetForCausalLM, prompt, **kwargs) -> str | list[str]:  # engine.generate's arguments
    return engine.generate(Adapter(model), prompt, **kwargs)

"""hnet_core.engine's Adapter for an exported model (numpy + onnxruntime): the engine cuts prompts
into pieces (OnnxHNet.prefill, then extend), samples, streams and counts; this file only translates.

    for step in stream_generate(OnnxHNet("onnx_dir"), ["Hello"], max_tokens=64, prefill_step_size=512):
        print(step.texts[0], end="")

An OnnxHNet keeps one live state inside itself, so its adapter's cache is a handle on that state:
only the newest cache of a model can be extended. Prompt + generation must fit the export's max_seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnet_core import engine
from hnet_core.engine import StepResult, rss_peak
from hnet_core.errors import HNetError

from .runtime import OnnxHNet


NO_PROMPT_CACHES = "prompt caches work with the torch and mlx backends, not onnx"


@dataclass
class LiveState:
    batch_size: int
    capacity: int  # decode slots to reserve in the global attention caches
    started: bool = False  # prefill has run: later pieces extend


def _result(out, at: np.ndarray | None = None) -> StepResult:
    logits = out.logits[:, -1] if at is None else out.logits[np.arange(out.logits.shape[0]), at]
    return StepResult(logits, np.stack([r.valid.sum(-1) for r in out.routing]).astype(np.int64),
                      np.stack([r.boundary_mask.sum(-1) for r in out.routing]).astype(np.int64))


class Adapter:
    def __init__(self, model: OnnxHNet):
        self.model, self.config, self.live = model, model.config.to_dict(), None

    def new_cache(self, batch_size: int, max_bytes: int) -> LiveState:
        if max_bytes > self.model.max_seqlen:
            raise HNetError(f"prompt + max_tokens ({max_bytes + 1} bytes) exceeds this export's max_seqlen "
                            f"{self.model.max_seqlen}; generate fewer bytes or re-export with a larger --max-seqlen")
        self.live = LiveState(batch_size, max_bytes + 1)
        return self.live

    def _check(self, cache: LiveState) -> None:
        if cache is not self.live:
            raise HNetError("this OnnxHNet has moved on to a newer cache; an ONNX model holds one live state")

    def extend(self, cache: LiveState, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        self._check(cache)
        run = self.model.extend if cache.started else self.model.prefill
        cache.started = True
        return _result(run(ids, mask, capacity=cache.capacity), last)

    def step(self, cache: LiveState, next_bytes: np.ndarray) -> StepResult:
        self._check(cache)
        return _result(self.model.step(next_bytes))

    def export_cache(self, cache: LiveState):
        raise HNetError(NO_PROMPT_CACHES)

    def import_cache(self, tree: dict, arrays: dict):
        raise HNetError(NO_PROMPT_CACHES)

    def reset_peak_memory(self) -> None:
        pass  # the resident-set peak cannot be reset

    def peak_memory(self) -> tuple[int, str] | None:
        return rss_peak()


def stream_generate(model: OnnxHNet, prompts, **kwargs):
    """hnet_core.engine.stream_generate on `model` (same arguments after the prompts)."""
    return engine.stream_generate(Adapter(model), prompts, **kwargs)

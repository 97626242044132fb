"""The ONNX runtime's hnet_core.engine.Adapter; the engine reads prompts in pieces (OnnxHNet.prefill, then
extend), samples, streams and counts: `stream_generate(OnnxHNet(dir), ["Hello"], prefill_step_size=512)`.
An OnnxHNet keeps one live state inside itself, so the cache is a handle on it: only a model's newest
cache can be extended. Prompt + generation must fit the export's max_seqlen; no prompt caches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnet_core import engine
from hnet_core.engine import StepResult
from hnet_core.errors import HNetError

from .runtime import OnnxHNet


@dataclass
class LiveState:
    capacity: int  # decode slots to reserve in the global attention caches
    started: bool = False  # prefill has run: later pieces extend


def _result(out, at: np.ndarray | None = None) -> StepResult:  # logits at `at` (default: the last), each stage's masks
    logits = out.logits[:, -1] if at is None else out.logits[np.arange(len(at)), at]
    return StepResult.from_masks(logits, [(r.boundary_mask, r.valid) for r in out.routing])


class Adapter(engine.Adapter):
    def __init__(self, model: OnnxHNet):
        self.model, self.config, self.live = model, model.config.to_dict(), None

    def new_cache(self, batch_size: int, max_bytes: int) -> LiveState:
        if max_bytes > self.model.max_seqlen:
            raise HNetError(f"prompt + max_tokens ({max_bytes + 1} bytes) exceeds this export's max_seqlen "
                            f"{self.model.max_seqlen}; generate fewer bytes or re-export with a larger --max-seqlen")
        self.live = LiveState(max_bytes + 1)  # the live state is replaced by the first extend
        return self.live

    def extend(self, cache: LiveState, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> StepResult:
        model = self._check(cache)
        run, cache.started = (model.extend if cache.started else model.prefill), True
        return _result(run(ids, mask, capacity=cache.capacity), last)

    def step(self, cache: LiveState, next_bytes: np.ndarray) -> StepResult:
        return _result(self._check(cache).step(next_bytes))

    def _check(self, cache: LiveState) -> OnnxHNet:
        if cache is not self.live:
            raise HNetError("this OnnxHNet has moved on to a newer cache; an ONNX model holds one live state")
        return self.model

    def export_cache(self, cache: LiveState):
        raise HNetError("prompt caches work with the torch and mlx backends, not onnx")

    # import_cache, reset_peak_memory and peak_memory (the process's resident set): engine.Adapter's.


def stream_generate(model: OnnxHNet, prompts, **kwargs):  # engine.stream_generate's arguments
    return engine.stream_generate(Adapter(model), prompts, **kwargs)

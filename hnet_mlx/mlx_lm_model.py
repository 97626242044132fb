"""mlx-lm's model protocol on top of HNetForCausalLM (a thin adapter, no model code of its own;
MLX-specific: mlx-lm is MLX's, and torch's counterpart for transformers is hnet_torch/hf_model.py).

Every model directory we write names this module in config.json (through the small `model_file`
module beside it, see hnet_core/mlx_lm_files.py), so mlx-lm runs H-Net:

    mlx_lm.generate --model DIR --trust-remote-code --prompt "Hello" --temp 0
    mlx_lm.server --model DIR --trust-remote-code
    model, tokenizer = mlx_lm.load(DIR, trust_remote_code=True)

What mlx-lm asks of a model, and how H-Net answers:
- `Model(ModelArgs)`, `ModelArgs.from_dict(config.json)`: our HNetConfig; the weight names stay
  ours (Model *is* an HNetForCausalLM), so anything mlx-lm writes back (mlx_lm.convert -q,
  mlx_lm.fuse) is one of our model directories again.
- `model(inputs, cache=None)` -> logits (B, L, 256) float32 for any L, on a fresh or a live cache:
  mlx-lm prefills long prompts in `prefill_step_size` pieces on one cache, then feeds one token at a
  time. One token is `HNetForCausalLM.step` (the compiled decode step).
- `make_cache()` -> [HNetPromptCache]: one object wrapping our InferenceCache. It offers `state`
  (for mx.eval), `nbytes`, `empty`, deep copies (the server's in-memory prompt cache copies a cache
  before reusing it), and `is_trimmable() == False`: H-Net's state (SSM states, chunk boundaries,
  the EMA) cannot be rolled back, so the server reuses a cached prompt only when the new prompt
  extends it.
- Batching (`mlx_lm.server`'s BatchGenerator, taken when every cache entry has `merge`): the
  classmethod `merge` stacks single-request caches into one batch cache (an empty one becomes a
  fresh row), `extend` appends a batch to a running one, `filter` keeps rows, `extract` gives one
  row back (for the prompt cache). Prompts of a batch come right-padded after
  `prepare(lengths=..., right_padding=...)`: every call until `finalize()` masks each row beyond its
  remaining length, so padding never reaches a row's state. Rows are per sample throughout
  (hnet_mlx/batch_cache.py), so each request gets what it gets alone.
- Why not hnet_core.engine's Adapter (hnet_mlx/generate.py): mlx-lm samples from lazy MLX logits
  and overlaps that with the next step (mx.async_eval); the adapter returns numpy logits of one
  position, a host sync per byte. Both run the same model calls (`__call__` on a cache, `step`).
- `layers`: every block (Mamba2 / attention + MLP) of every stack, outermost encoder first, so
  mlx-lm's LoRA utilities find the Linear layers; `sanitize`: official/torch conv layout -> MLX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from hnet_core.config import HNetConfig

from . import batch_cache, loading
from .cache import InferenceCache, state_arrays, with_arrays
from .lm import HNetForCausalLM

@dataclass
class ModelArgs:
    """config.json as mlx-lm hands it over: our model config, without the mlx-lm keys."""

    config: HNetConfig
    model_type: str = "hnet"

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        return cls(config=HNetConfig.from_dict(params), model_type=params.get("model_type", "hnet"))


class HNetPromptCache:
    """The one cache object `Model.make_cache` returns (mlx-lm keeps a list of them per model)."""

    def __init__(self, model: HNetForCausalLM | None = None, batch_size: int = 1) -> None:
        self.model = model  # to give an empty cache its rows when it is merged or extended
        self.cache: InferenceCache | None = None
        self.batch_size = batch_size  # rows of an empty cache (a live one knows its own)
        self.offset = 0  # bytes consumed (the longest row's)
        self.remaining: list[int] | None = None  # real bytes per row still to come, between prepare and finalize

    # -- what mlx-lm reads ------------------------------------------------------------------

    @property
    def state(self) -> list[mx.array]:
        if self.cache is None:
            return []
        return [self.cache.lengths, *state_arrays(self.cache.backbone)]

    @state.setter
    def state(self, value) -> None:
        raise ValueError("H-Net caches cannot be rebuilt from mlx-lm's prompt-cache files; "
                         "use hnet-mlx's own prompt-cache files")

    @property
    def meta_state(self) -> str:
        return ""

    def is_trimmable(self) -> bool:
        return False

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.cache is None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def __deepcopy__(self, memo) -> "HNetPromptCache":
        # Arrays are immutable and every update replaces them, so a copy shares them; the dataclass
        # tree around them is rebuilt (the split decode step assigns into it in place).
        new = HNetPromptCache(self.model, self.batch_size)
        new.offset = self.offset
        new.remaining = None if self.remaining is None else list(self.remaining)
        if self.cache is not None:
            new.cache = copy.copy(self.cache)
            new.cache.backbone = with_arrays(self.cache.backbone, state_arrays(self.cache.backbone))
            new.cache.extra = dict(self.cache.extra)
        return new

    # -- batching (mlx_lm.generate.BatchGenerator) --------------------------------------------

    def _live(self) -> InferenceCache:
        """This cache's InferenceCache, allocating fresh rows for an empty one."""
        if self.cache is None:
            self.cache = self.model.allocate_inference_cache(batch_size=self.batch_size)
        return self.cache

    @classmethod
    def merge(cls, caches: list["HNetPromptCache"]) -> "HNetPromptCache":
        """One batch cache holding the rows of `caches` in order (mlx-lm calls it on single-request caches)."""
        model = next(c.model for c in caches if c.model is not None)
        out = cls(model, sum(c.batch_size if c.cache is None else c.cache.batch_size for c in caches))
        if any(c.cache is not None for c in caches):
            for c in caches:
                c.model = c.model or model
            out.cache = batch_cache.merge_caches([c._live() for c in caches])
            mx.eval(out.state)
        out.offset = max(c.offset for c in caches)
        return out

    def extend(self, other: "HNetPromptCache") -> None:
        """Append the rows of `other` (in place)."""
        merged = HNetPromptCache.merge([self, other])
        self.model, self.cache = merged.model, merged.cache
        self.batch_size, self.offset = merged.batch_size, merged.offset

    def filter(self, keep) -> None:
        """Keep only the rows `keep` (in place)."""
        keep = [int(k) for k in (keep.tolist() if isinstance(keep, mx.array) else keep)]
        if self.cache is None:
            self.batch_size = len(keep)
        else:
            self.cache = batch_cache.filter_cache(self.cache, keep)
            mx.eval(self.state)
        if self.remaining is not None:
            self.remaining = [self.remaining[k] for k in keep]

    def extract(self, idx: int) -> "HNetPromptCache":
        """Row `idx` as a cache of its own (what the server keeps for prompt-cache reuse)."""
        out = HNetPromptCache(self.model)
        if self.cache is not None:
            out.cache = batch_cache.extract_cache(self.cache, idx)
            out.offset = int(out.cache.lengths[0].item())
        return out

    def prepare(self, lengths=None, right_padding=None, left_padding=None, **_) -> None:
        """The next calls bring right-padded prompts with `lengths` real tokens per row."""
        if left_padding is not None and any(int(p) for p in left_padding):
            raise ValueError("H-Net caches take right-padded prompts only (every row starts at its own position)")
        self.remaining = None if lengths is None else [int(n) for n in lengths]

    def finalize(self) -> None:
        self.remaining = None

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, model: HNetForCausalLM, inputs: mx.array) -> mx.array:
        """Consume inputs (B, L) on this cache, continuing where it ended; logits (B, L, 256).
        The cache grows as bytes come; one byte on a live cache takes the compiled decode step.
        Between prepare and finalize, each row's bytes beyond its remaining length are padding."""
        B, L = inputs.shape
        self.model = self.model or model
        if self.cache is None:
            self.batch_size = B
        cache = self._live()
        mask = None
        if self.remaining is not None:
            real = mx.array(self.remaining)
            if min(self.remaining) < L:
                mask = mx.arange(L)[None] < real[:, None]
            self.remaining = [max(n - L, 0) for n in self.remaining]
        if L == 1 and cache.prefilled and mask is None:
            logits = model.step(inputs, cache).logits
        else:
            logits = HNetForCausalLM.__call__(model, inputs, mask=mask, cache=cache).logits
        self.offset += L
        return logits


class Model(HNetForCausalLM):
    """HNetForCausalLM answering mlx-lm's calls (see the module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.config)
        self.args = args
        self.model_type = args.model_type

    def __call__(self, inputs, cache: list[Any] | None = None, **kwargs) -> mx.array:
        inputs = self._check_ids(inputs)  # (B, L) ints
        if cache is None:
            logits = HNetForCausalLM.__call__(self, inputs).logits
        else:
            entry = cache[0] if isinstance(cache, (list, tuple)) else cache
            logits = entry.feed(self, inputs)
        # float32: mlx-lm takes log-softmax of these, and argmax over fp16 log-probs could tie
        # where the logits did not (hnet-mlx's sampler also works on float32 logits).
        return logits.astype(mx.float32)

    def make_cache(self) -> list[HNetPromptCache]:
        return [HNetPromptCache(self)]

    @property
    def layers(self) -> list:
        """Every block of every Isotropic stack: outer encoder, inner levels, outer decoder."""
        blocks, level = [], self.backbone
        decoders = []
        while not level.is_innermost:
            blocks += level.encoder.layers
            decoders.append(level.decoder.layers)
            level = level.main_network
        blocks += level.main_network.layers
        for stack in reversed(decoders):
            blocks += stack
        return blocks

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = loading.cast_weights(loading.sanitize(weights), None)  # residual_proj in float32, as hnet_mlx loads it
        if self.config.tie_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def _register_model_type() -> None:
    """mlx-lm loads the tokenizer through transformers' AutoTokenizer, which reads config.json and, not
    knowing model type "hnet", warns "You are using a model of type `hnet` to instantiate a model of
    type ``" on every command. Registering our config class silences exactly that warning, in the
    processes that import this adapter."""
    try:
        from hnet_core.hf_config import register
    except ImportError:  # mlx-lm without transformers cannot load a tokenizer anyway
        return
    register()


_register_model_type()

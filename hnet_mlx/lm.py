"""The byte-level language model around the H-Net backbone (official `HNetForCausalLM`).

    model = HNetForCausalLM(config)
    out = model(input_ids, mask=mask)                 # masked: (B, L) right-padded
    out = model(input_ids, cu_seqlens=cu)             # packed: (1, T) with (N+1,) offsets
    cache = model.allocate_inference_cache(batch_size=B, max_seqlen=N)
    out = model(prompt_ids, mask=mask, cache=cache)   # prefill
    out = model.step(next_ids, cache)                 # (B, 1) -> logits (B, 1, 256)

`step` is one `mx.compile`d function per (batch size, max_seqlen): the byte embedding, every
level's step and the LM head, with the cache passed in and out as a flat list of arrays (see
cache.py). MLX pays a few µs per op per eval at batch-1 decode and ~0.2 µs inside a compiled
function, so this is where compiling pays most (numbers in bench/mlx_compile.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError

from .cache import InferenceCache, state_arrays, with_arrays
from .hnet import HNet
from .routing import RoutingOutput

INT_DTYPES = (mx.int64, mx.int32, mx.int16, mx.int8, mx.uint8, mx.uint16, mx.uint32, mx.uint64)


@dataclass
class CausalLMOutput:
    logits: mx.array  # (B, L, vocab)
    routing: list[RoutingOutput]  # one per routing stage, outermost first
    cache: InferenceCache | None = None


class HNetForCausalLM(nn.Module):
    def __init__(self, config: HNetConfig):
        super().__init__()
        self.config = config
        d0 = config.d_model[0]
        self.embeddings = nn.Embedding(config.vocab_size, d0)
        self.backbone = HNet(config, 0)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(d0, config.vocab_size, bias=False)
        # Compile the decode step (set False to measure the uncompiled path).
        self.compile_step = True
        object.__setattr__(self, "_step_fns", {})  # (batch, max_seqlen) -> compiled step; not a parameter

    # -- construction helpers ----------------------------------------------------------------

    def init_weights(self, initializer_range: float = 0.02) -> None:
        """Official init: embeddings N(0, 1), lm_head N(0, 0.02), encoder/decoder/main Linear weights
        N(0, 0.02) with out_proj/fc2 scaled by 1/sqrt(residual branches of this and outer levels).
        Routing q/k (identity), residual_proj (zero) and all other parameters keep their init."""
        if not self.config.tie_embeddings:
            self.lm_head.weight = initializer_range * mx.random.normal(self.lm_head.weight.shape)
        self.embeddings.weight = mx.random.normal(self.embeddings.weight.shape)
        level, parent_residuals = self.backbone, 0
        while True:
            stacks = [level.main_network] if level.is_innermost else [level.encoder, level.decoder]
            n = parent_residuals + sum(s.height for s in stacks)
            for stack in stacks:
                for name, module in stack.named_modules():
                    if isinstance(module, nn.Linear):
                        scaled = "out_proj" in name or "fc2" in name
                        std = initializer_range / (math.sqrt(n) if scaled else 1.0)
                        module.weight = std * mx.random.normal(module.weight.shape)
            if level.is_innermost:
                break
            level, parent_residuals = level.main_network, n

    def lr_multipliers(self, multipliers: list[float]) -> dict[str, float]:
        """Parameter name -> learning-rate multiplier of the level it belongs to (official
        `apply_lr_multiplier`: embeddings and lm_head take level 0's)."""
        if len(multipliers) != self.config.num_levels:
            raise HNetError(f"need one learning-rate multiplier per level ({self.config.num_levels}), got {multipliers}")
        out = {}
        for name, _ in tree_flatten(self.parameters()):
            level = 0
            if name.startswith("backbone."):
                level = name.count("main_network.")
                # The innermost stack is itself called main_network: it belongs to the level above it.
                level = min(level, self.config.num_levels - 1)
            out[name] = float(multipliers[level])
        return out

    def set_kernels(self, mode: str) -> None:
        """'auto' | 'on' | 'off': Metal kernels for every Mamba2 and dechunk layer (see kernels.py)."""
        from .kernels import KERNEL_MODES

        if mode not in KERNEL_MODES:
            raise HNetError(f"use_kernels must be one of {KERNEL_MODES}, got {mode!r}")
        for _, m in self.named_modules():
            if "use_kernels" in m.__dict__:
                m.use_kernels = mode
        self._step_fns.clear()  # compiled steps traced the old kernel choice

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype: the dtype of the RMSNorm weights (never quantized)."""
        level = self.backbone
        stack = level.main_network if level.is_innermost else level.encoder
        return stack.rmsnorm.weight.dtype

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> InferenceCache:
        if batch_size <= 0 or max_seqlen <= 0:
            raise HNetError(f"batch_size and max_seqlen must be positive, got {batch_size} and {max_seqlen}")
        return InferenceCache(self.backbone.allocate_state(batch_size, max_seqlen, dtype or self.dtype),
                              max_seqlen, batch_size)

    # -- running -----------------------------------------------------------------------------

    def _check_ids(self, input_ids) -> mx.array:
        """Validate ids (mx.array, numpy or nested lists) and return them as an int32 mx.array."""
        V = self.config.vocab_size
        if isinstance(input_ids, mx.array):
            if input_ids.ndim != 2:
                raise HNetError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
            if input_ids.dtype not in INT_DTYPES:
                raise HNetError(f"input_ids must be an integer array, got {input_ids.dtype}")
            if input_ids.size and bool(((input_ids < 0) | (input_ids >= V)).any().item()):
                raise HNetError(f"input_ids must be byte values in [0, {V})")
            return input_ids.astype(mx.int32)
        arr = np.asarray(input_ids)
        if arr.ndim != 2:
            raise HNetError(f"input_ids must have shape (batch, length), got {tuple(arr.shape)}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise HNetError(f"input_ids must be an integer array, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= V):
            raise HNetError(f"input_ids must be byte values in [0, {V})")
        return mx.array(arr.astype(np.int32))

    def _logits(self, h: mx.array) -> mx.array:
        if self.config.tie_embeddings:
            return self.embeddings.as_linear(h)
        return self.lm_head(h)

    def __call__(self, input_ids, mask=None, cu_seqlens=None, cache: InferenceCache | None = None) -> CausalLMOutput:
        input_ids = self._check_ids(input_ids)
        B, L = input_ids.shape
        if L == 0:
            raise HNetError("input_ids is empty; give at least one byte (the BOS byte 254 at least)")
        if cu_seqlens is not None:
            cu_seqlens = self._check_cu_seqlens(cu_seqlens, input_ids)
            if mask is not None or cache is not None:
                raise HNetError("packed mode (cu_seqlens) takes no mask and no cache")
        else:
            if mask is None:
                mask = mx.ones((B, L), dtype=mx.bool_)
            else:
                mask = mx.array(mask) if not isinstance(mask, mx.array) else mask
                if tuple(mask.shape) != (B, L):
                    raise HNetError(f"mask shape {tuple(mask.shape)} must equal input_ids shape {(B, L)}")
                mask = mask.astype(mx.bool_)
                if L > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any().item()):
                    raise HNetError("mask must be right-padded: True on a prefix of each row, then False")
        if cache is not None:
            if cache.prefilled:
                raise HNetError("this cache was already prefilled; allocate a new one (continue with model.step)")
            if cache.batch_size != B:
                raise HNetError(f"cache was allocated for batch size {cache.batch_size}, input has {B}")
            lengths = np.array(mask.sum(-1))
            if int(lengths.max()) > cache.max_seqlen:
                raise HNetError(f"prompt of {int(lengths.max())} bytes exceeds the cache's max_seqlen {cache.max_seqlen}")
            if int(lengths.min()) == 0:
                raise HNetError("every prompt in the batch needs at least one byte")
        h = self.embeddings(input_ids)
        h, routing = self.backbone(h, mask=mask, cu_seqlens=cu_seqlens, state=None if cache is None else cache.backbone)
        logits = self._logits(h)
        if cache is not None:
            cache.prefilled = True
            cache.lengths = mask.sum(-1).astype(mx.int32)
            cache.max_length = int(lengths.max())
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    def step(self, input_ids, cache: InferenceCache) -> CausalLMOutput:
        """Consume one byte per sample; input_ids (B, 1) -> logits (B, 1, vocab)."""
        input_ids = self._check_ids(input_ids)
        if not cache.prefilled:
            raise HNetError("prefill the cache first: model(prompt_ids, mask=mask, cache=cache)")
        if tuple(input_ids.shape) != (cache.batch_size, 1):
            raise HNetError(f"step takes input_ids of shape ({cache.batch_size}, 1), got {tuple(input_ids.shape)}")
        if cache.max_length >= cache.max_seqlen:
            raise HNetError(f"generation reached the cache's max_seqlen {cache.max_seqlen}; allocate a larger cache")
        fn = self._step_function(cache)
        logits, flat_routing, arrays = fn(input_ids, [cache.lengths, *state_arrays(cache.backbone)])
        cache.lengths = arrays[0]
        cache.backbone = with_arrays(cache.backbone, arrays[1:])
        cache.max_length += 1
        routing = []
        for s in range(self.config.num_stages):
            p, b, sel, valid = flat_routing[4 * s : 4 * s + 4]
            routing.append(RoutingOutput(p, b, sel, valid=None if s == 0 else valid))
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    def _step_function(self, cache: InferenceCache):
        """The (compiled) decode step for caches shaped like `cache`."""
        key = (cache.batch_size, cache.max_seqlen, self.compile_step)
        fn = self._step_fns.get(key)
        if fn is None:
            template = cache.backbone  # only its structure (ring flags) is read; shapes are per call

            def step_arrays(input_ids: mx.array, arrays: list[mx.array]):
                state = with_arrays(template, arrays[1:])
                h = self.embeddings(input_ids)  # (B, 1, D)
                h, routing = self.backbone.step(h, state)
                flat = []
                for r in routing:  # step outputs are (B,): give them the (B, 1) shape of a length-1 forward
                    valid = mx.ones(r.boundary_mask.shape, dtype=mx.bool_) if r.valid is None else r.valid
                    # A stage that did not run for a sample reports NaN probabilities (official step skips it).
                    flat += [mx.where(valid, r.boundary_prob, math.nan)[:, None], r.boundary_mask[:, None],
                             mx.where(valid, r.selected_probs, math.nan)[:, None], valid[:, None]]
                return self._logits(h), flat, [arrays[0] + 1, *state_arrays(state)]

            # The parameters are implicit inputs, so updated weights are seen without recompiling.
            fn = mx.compile(step_arrays, inputs=self.state) if self.compile_step else step_arrays
            self._step_fns[key] = fn
        return fn

    @staticmethod
    def _check_cu_seqlens(cu_seqlens, input_ids: mx.array) -> mx.array:
        if input_ids.shape[0] != 1:
            raise HNetError(f"packed mode takes input_ids of shape (1, total), got {tuple(input_ids.shape)}")
        cu = np.asarray(cu_seqlens).astype(np.int64)
        if cu.ndim != 1 or cu.size < 2 or int(cu[0]) != 0 or int(cu[-1]) != input_ids.shape[1]:
            raise HNetError(f"cu_seqlens must run from 0 to the total length {input_ids.shape[1]}, got {cu.tolist()}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise HNetError("cu_seqlens must be strictly increasing (no empty sequences)")
        return mx.array(cu.astype(np.int32))

"""The byte-level language model around the H-Net backbone (official `HNetForCausalLM`).

    model = HNetForCausalLM(config)
    out = model(input_ids, mask=mask)                 # masked: (B, L) right-padded
    out = model(input_ids, cu_seqlens=cu)             # packed: (1, T) with (N+1,) offsets
    cache = model.allocate_inference_cache(batch_size=B)   # grows; max_seqlen=N sets a limit
    out = model(prompt_ids, mask=mask, cache=cache)   # prefill
    out = model(more_ids, mask=mask2, cache=cache)    # extend: each sample continues where it ended
    out = model.step(next_ids, cache)                 # (B, 1) -> logits (B, 1, 256)

Extending a cache piece by piece gives the logits and boundaries of one pass over the whole text
(tests/test_extend_cache.py); generate.py reads long prompts that way, in flat memory.

`step` is one `mx.compile`d function per batch size (retraced when a growing cache changes
shape): the byte embedding, every
level's step and the LM head, with the cache passed in and out as a flat list of arrays (see
cache.py). MLX pays a few µs per op per eval at batch-1 decode and ~0.2 µs inside a compiled
function, so this is where compiling pays most (numbers in bench/bench_mlx_compile.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.prompt_cache import check_config
from hnet_core.step_threads import steps_in_parallel

from . import blas
from .cache import HNetState, InferenceCache, IsotropicState, isotropic_states, reserve, skeleton, state_arrays, with_arrays
from .hnet import HNet
from .routing import RoutingOutput

STEP_MODES = ("auto", "fused", "split")
MAX_COMPILED_STEPS = 32  # compiled step functions kept per model (fused: 1 per cache shape; split: 2 per level)
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
        # Decode step: "fused" = one compiled function per byte (inner levels always computed, kept
        # only on boundaries); "split" = one compiled piece per level half, and the inner level runs
        # only when some sample is on a boundary (one sync per stage reached); "auto" picks (see
        # `resolve_step_mode`). compile_step=False runs the same code uncompiled (for measuring).
        self.step_mode = "auto"
        self.compile_step = True
        object.__setattr__(self, "_step_fns", {})  # key -> compiled step function; not a parameter
        object.__setattr__(self, "_inner_share", None)
        object.__setattr__(self, "_step_blas_threads", False)  # BLAS threads per step: 1 or None (all)

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

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None, dtype=None) -> InferenceCache:
        """An empty cache. Without max_seqlen it grows as bytes come; with it, attention caches are
        allocated for max_seqlen positions at once and no sample may go beyond max_seqlen bytes."""
        if batch_size <= 0 or (max_seqlen is not None and max_seqlen <= 0):
            raise HNetError(f"batch_size and max_seqlen must be positive, got {batch_size} and {max_seqlen}")
        return InferenceCache(self.backbone.allocate_state(batch_size, max_seqlen, dtype or self.dtype),
                              max_seqlen, batch_size, lengths=mx.zeros((batch_size,), dtype=mx.int32),
                              config=self.config_dict)

    @property
    def config_dict(self) -> dict:
        """The config as a dict, computed once (caches carry it to refuse another model's cache)."""
        if "_config_dict" not in self.__dict__:
            object.__setattr__(self, "_config_dict", self.config.to_dict())
        return self.__dict__["_config_dict"]

    def _check_cache(self, cache: InferenceCache, batch_size: int) -> None:
        check_config(cache.config, self.config_dict)
        cache.config = self.config_dict  # checked once: later steps take check_config's identity fast path
        if cache.batch_size != batch_size:
            raise HNetError(f"cache was allocated for batch size {cache.batch_size}, input has {batch_size}")

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
        blas.set_threads(None)  # many rows per matrix: every BLAS thread (a decode step may have set one)
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
            self._check_cache(cache, B)
            lengths = cache.lengths + mask.sum(-1).astype(mx.int32)
            longest = int(lengths.max().item())
            if cache.max_seqlen is not None and longest > cache.max_seqlen:
                raise HNetError(f"{longest} bytes exceed the cache's max_seqlen {cache.max_seqlen}; "
                                "allocate it with a larger max_seqlen, or none to let it grow")
        h = self.embeddings(input_ids)
        h, routing = self.backbone(h, mask=mask, cu_seqlens=cu_seqlens, state=None if cache is None else cache.backbone)
        logits = self._logits(h)
        if cache is not None:
            cache.prefilled = True
            cache.lengths = lengths
            cache.max_length = longest
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    def step(self, input_ids, cache: InferenceCache) -> CausalLMOutput:
        """Consume one byte per sample; input_ids (B, 1) -> logits (B, 1, vocab)."""
        input_ids = self._check_ids(input_ids)
        if not cache.prefilled:
            raise HNetError("prefill the cache first: model(prompt_ids, mask=mask, cache=cache)")
        if tuple(input_ids.shape) != (cache.batch_size, 1):
            raise HNetError(f"step takes input_ids of shape ({cache.batch_size}, 1), got {tuple(input_ids.shape)}")
        self._check_cache(cache, cache.batch_size)
        if cache.max_seqlen is not None and cache.max_length >= cache.max_seqlen:
            raise HNetError(f"generation reached the cache's max_seqlen {cache.max_seqlen}; allocate a larger cache, "
                            "or one without max_seqlen (it grows)")
        # Small matrices multiply on one BLAS thread (hnet_core/step_threads.py).
        if self._step_blas_threads is False:  # decided once, from the shapes
            object.__setattr__(self, "_step_blas_threads", None if steps_in_parallel(self.config) else 1)
        blas.set_threads(self._step_blas_threads)
        # Growing happens outside the compiled step (a new cache shape retraces it).
        if self.resolve_step_mode(cache) == "fused":
            for stack in isotropic_states(cache.backbone):  # a bound: inner stacks move only on boundaries
                _grow(stack)
            fn = self._step_function(cache)
            logits, flat_routing, arrays = fn(input_ids, [cache.lengths, *state_arrays(cache.backbone)])
            cache.lengths = arrays[0]
            cache.backbone = with_arrays(cache.backbone, arrays[1:])
        else:
            logits, flat_routing = self._split_step(input_ids, cache)
            cache.lengths = cache.lengths + 1
        cache.max_length += 1
        routing = []
        for s in range(self.config.num_stages):
            p, b, sel, valid = flat_routing[4 * s : 4 * s + 4]
            routing.append(RoutingOutput(p, b, sel, valid=None if s == 0 else valid))
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    def resolve_step_mode(self, cache: InferenceCache) -> str:
        """"fused" or "split" for this cache. "auto" splits when the inner levels hold most of the
        weights (skipping them on non-boundary bytes saves more than the per-stage sync costs) and
        the model is big enough for that to matter (>= 50M parameters); small models fuse on a GPU.
        On the CPU every model splits: there the fused step (inner levels every byte, each state
        kept or not with a broadcast `where`) measured 2-4x slower than split for the bundled 5M
        model at batch 1 and 4 (bench/bench_decode.py, issue 24)."""
        if self.step_mode not in STEP_MODES:
            raise HNetError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        if self.step_mode != "auto":
            return self.step_mode
        if self.config.num_stages == 0:
            return "fused"
        if mx.default_device() == mx.cpu:
            return "split"
        if self._inner_share is None:
            sizes = {k: v.size for k, v in tree_flatten(self.parameters())}
            total = sum(sizes.values())
            inner = sum(n for k, n in sizes.items() if k.startswith("backbone.main_network."))
            object.__setattr__(self, "_inner_share", (total, inner / max(total, 1)))
        total, share = self._inner_share
        return "split" if total >= 50_000_000 and share >= 0.5 else "fused"

    def _step_function(self, cache: InferenceCache):
        """The (compiled) decode step for caches shaped like `cache`."""
        key = (cache.batch_size, self.compile_step)
        fn = self._step_fns.get(key)
        if fn is None:
            template = skeleton(cache.backbone)  # only its structure (ring flags) is read; shapes are per call

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
            self._remember(key, fn)
        return fn

    def _remember(self, key: tuple, fn) -> None:
        """Keep the most recent compiled steps only (each cache shape traces its own)."""
        if len(self._step_fns) >= MAX_COMPILED_STEPS:
            self._step_fns.pop(next(iter(self._step_fns)))
        self._step_fns[key] = fn

    # -- the "split" decode step ---------------------------------------------------------------

    def _piece(self, key: tuple, body, states: list):
        """A (compiled) function of (tensors, state arrays) -> (outputs, new state arrays) running
        `body(tensors, states)` on a copy of `states` (a list of state dataclasses) holding the arrays."""
        key = ("split", *key, self.compile_step)
        fn = self._step_fns.get(key)
        if fn is None:
            template = skeleton(states)

            def run(tensors: list, arrays: list):
                states = with_arrays(template, arrays)
                outputs = body(tensors, states)
                return outputs, state_arrays(states)

            fn = mx.compile(run, inputs=self.state) if self.compile_step else run
            self._remember(key, fn)
        return fn

    def _split_step(self, input_ids: mx.array, cache: InferenceCache):
        """Run level by level; descend into an inner level only if some sample is on a boundary."""
        shape = (cache.batch_size,)
        node, state, active, level = self.backbone, cache.backbone, None, 0
        h = input_ids
        pending = []  # outer levels waiting for their inner result: (node, state, level, active, residual, routing)
        flat_routing: list[mx.array] = []
        while True:
            first = level == 0
            if node.is_innermost:
                def main_body(t, st, node=node, first=first):
                    x = self.embeddings(t[0]) if first else t[0]
                    out = node.step_main(x, st[0], None if first else t[1])
                    return [self._logits(out) if first else out]

                _grow(state.main)
                fn = self._piece((level, "main", *shape), main_body, [state])
                (h,), arrays = fn([h] if first else [h, active], state_arrays([state]))
                cache_state = with_arrays([state], arrays)[0]
                _assign(state, cache_state)
                break

            def in_body(t, st, node=node, first=first):
                x = self.embeddings(t[0]) if first else t[0]
                level_state = HNetState(encoder=st[0], routing=st[1])
                active = None if first else t[1]
                h_enc, residual, r = node.step_in(x, level_state, active)
                p, b, sel = r.boundary_prob, r.boundary_mask, r.selected_probs
                # The step's routing outputs (B, 1) and "any sample on a boundary" are made here, inside
                # the compiled piece: on the CPU each op outside it is a separate dispatch every byte.
                valid = mx.ones(b.shape, dtype=mx.bool_) if active is None else active
                return [h_enc, residual, p, b, sel, b.any(), mx.where(valid, p, math.nan)[:, None], b[:, None],
                        mx.where(valid, sel, math.nan)[:, None], valid[:, None]]

            _grow(state.encoder)
            fn = self._piece((level, "in", *shape), in_body, [state.encoder, state.routing])
            (h_enc, residual, p, b, sel, any_b, *routing), arrays = fn([h] if first else [h, active],
                                                                        state_arrays([state.encoder, state.routing]))
            state.encoder, state.routing = with_arrays([state.encoder, state.routing], arrays)
            flat_routing += routing
            pending.append((node, state, level, active, residual, (p, b, sel)))
            if not any_b.item():  # no sample reached the inner level: skip it (a sync)
                h = _zeros(h_enc.shape, h_enc.dtype)
                flat_routing += _not_run(cache.batch_size, self.config.num_stages - level - 1)
                break
            node, state, active, h, level = node.main_network, state.main, b, h_enc, level + 1

        for node, state, level, active, residual, (p, b, sel) in reversed(pending):
            first = level == 0

            def out_body(t, st, node=node, first=first):
                routing = RoutingOutput(t[2], t[3], t[4])
                level_state = HNetState(dechunk=st[0], decoder=st[1])
                d_parent = self.config.d_model[node.level - 1] if node.level > 0 else node.d_model
                out = node.step_out(t[0], t[1], routing, level_state, None if first else t[5], d_parent)
                return [self._logits(out) if first else out]

            _grow(state.decoder)
            fn = self._piece((level, "out", *shape), out_body, [state.dechunk, state.decoder])
            tensors = [h, residual, p, b, sel] + ([] if first else [active])
            (h,), arrays = fn(tensors, state_arrays([state.dechunk, state.decoder]))
            state.dechunk, state.decoder = with_arrays([state.dechunk, state.decoder], arrays)
        return h, flat_routing

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


def _grow(stack: IsotropicState) -> None:
    """Before a step runs `stack`: room for one more position per sample (max_length stays a bound).
    The split step grows a stack only when it runs, so an inner stack's bound follows its chunks, not
    every byte: its attention caches (copied whole by each step's slot write) stay as small as they can."""
    reserve(stack, stack.max_length + 1)
    stack.max_length += 1


def _assign(target, source) -> None:
    """Copy the fields of dataclass `source` onto `target` (same type): the cache objects stay the same."""
    for name in target.__dataclass_fields__:
        setattr(target, name, getattr(source, name))


def _not_run(batch: int, stages: int) -> list[mx.array]:
    """Routing outputs of inner stages that no sample reached this step (NaN, like the official step)."""
    return list(_not_run_arrays(batch, stages))


@functools.lru_cache(maxsize=64)
def _not_run_arrays(batch: int, stages: int) -> tuple[mx.array, ...]:
    # Made once per shape (arrays are immutable): new ones every byte would be evaluated every byte.
    nan = mx.full((batch, 1), math.nan)
    no = mx.zeros((batch, 1), dtype=mx.bool_)
    return (nan, no, nan, no) * stages


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple, dtype: mx.Dtype) -> mx.array:
    """The skipped inner level's output (the outer step reads it only on boundaries), made once per shape."""
    return mx.zeros(shape, dtype=dtype)

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.prompt_cache import check_config

from .cache import InferenceCache, isotropic_states, reserve
from .hnet import HNet
from .routing import RoutingOutput
from .threads import step_threads


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, L, vocab)
    routing: list[RoutingOutput]  # one per routing stage, outermost first
    cache: InferenceCache | None = None


class HNetForCausalLM(nn.Module):
    def __init__(self, config: HNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        d0 = config.d_model[0]
        self.embeddings = nn.Embedding(config.vocab_size, d0, device=device, dtype=dtype)
        self.backbone = HNet(config, 0, device=device, dtype=dtype)
        self.lm_head = nn.Linear(d0, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    # -- construction helpers ----------------------------------------------------------------

    def init_weights(self, initializer_range: float = 0.02) -> None:
        """Official init: embeddings N(0, 1), lm_head N(0, 0.02), encoder/decoder/main Linear weights
        N(0, 0.02) with out_proj/fc2 scaled by 1/sqrt(residual branches of this and outer levels).
        Routing q/k (identity), residual_proj (zero) and all other parameters keep their init."""
        with torch.no_grad():
            nn.init.normal_(self.lm_head.weight, std=initializer_range)
            nn.init.normal_(self.embeddings.weight, std=1.0)
            level, parent_residuals = self.backbone, 0
            while True:
                stacks = [level.main_network] if level.is_innermost else [level.encoder, level.decoder]
                n = parent_residuals + sum(s.height for s in stacks)
                for stack in stacks:
                    for name, module in stack.named_modules():
                        if isinstance(module, nn.Linear):
                            scaled = "out_proj" in name or "fc2" in name
                            nn.init.normal_(module.weight, std=initializer_range / (n**0.5 if scaled else 1.0))
                if level.is_innermost:
                    break
                level, parent_residuals = level.main_network, n

    def lr_multipliers(self, multipliers: list[float]) -> dict[str, float]:
        """Parameter name -> learning-rate multiplier of the level it belongs to (official
        `apply_lr_multiplier`: embeddings and lm_head take level 0's)."""
        if len(multipliers) != self.config.num_levels:
            raise HNetError(f"need one learning-rate multiplier per level ({self.config.num_levels}), got {multipliers}")
        out = {}
        for name, _ in self.named_parameters():
            level = 0
            if name.startswith("backbone."):
                level = name.count("main_network.")
                # The innermost stack is itself called main_network: it belongs to the level above it.
                level = min(level, self.config.num_levels - 1)
            out[name] = float(multipliers[level])
        return out

    def set_kernels(self, mode: str = "auto", **paths: str) -> None:
        """Pick the implementation of each path for every Mamba2, attention and dechunk layer:
        'auto' | 'off' | 'on' | 'scan=...,conv=...,attention=...', or keywords
        (`set_kernels(scan="compiled", attention="flex")`). See kernels.py for the names; a named
        implementation that cannot run raises HNetError when the layer runs."""
        from .kernels import parse_plan

        plan = parse_plan(mode, **paths)
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = plan

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None, dtype=None) -> InferenceCache:
        """An empty cache. Without max_seqlen it grows as bytes come; with it, attention caches are
        allocated for max_seqlen positions at once and no sample may go beyond max_seqlen bytes."""
        if batch_size <= 0 or (max_seqlen is not None and max_seqlen <= 0):
            raise HNetError(f"batch_size and max_seqlen must be positive, got {batch_size} and {max_seqlen}")
        device = self.embeddings.weight.device
        return InferenceCache(self.backbone.allocate_state(batch_size, max_seqlen, dtype), max_seqlen, batch_size,
                              lengths=torch.zeros(batch_size, dtype=torch.long, device=device), config=self.config_dict)

    @property
    def config_dict(self) -> dict:
        """The config as a dict, computed once (caches carry it to refuse another model's cache)."""
        if "_config_dict" not in self.__dict__:
            self.__dict__["_config_dict"] = self.config.to_dict()
        return self.__dict__["_config_dict"]

    def _check_cache(self, cache: InferenceCache, batch_size: int) -> None:
        check_config(cache.config, self.config_dict)
        cache.config = self.config_dict  # checked once: later steps take check_config's identity fast path
        if cache.batch_size != batch_size:
            raise HNetError(f"cache was allocated for batch size {cache.batch_size}, input has {batch_size}")

    # -- running -----------------------------------------------------------------------------

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise HNetError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise HNetError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise HNetError(f"input_ids must be byte values in [0, {self.config.vocab_size})")

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: InferenceCache | None = None) -> CausalLMOutput:
        self._check_ids(input_ids)
        B, L = input_ids.shape
        if L == 0:
            raise HNetError("input_ids is empty; give at least one byte (the BOS byte 254 at least)")
        if cu_seqlens is not None:
            cu_seqlens = self._check_cu_seqlens(cu_seqlens, input_ids)
            if mask is not None or cache is not None:
                raise HNetError("packed mode (cu_seqlens) takes no mask and no cache")
        else:
            if mask is None:
                mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
            elif tuple(mask.shape) != (B, L):
                raise HNetError(f"mask shape {tuple(mask.shape)} must equal input_ids shape {(B, L)}")
            mask = mask.bool()
            if L > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise HNetError("mask must be right-padded: True on a prefix of each row, then False")
        if cache is not None:
            self._check_cache(cache, B)
            lengths = cache.lengths + mask.sum(-1)
            longest = int(lengths.max())
            if cache.max_seqlen is not None and longest > cache.max_seqlen:
                raise HNetError(f"{longest} bytes exceed the cache's max_seqlen {cache.max_seqlen}; "
                                "allocate it with a larger max_seqlen, or none to let it grow")
        h = self.embeddings(input_ids.long())
        h, routing = self.backbone(h, mask=mask, cu_seqlens=cu_seqlens, state=None if cache is None else cache.backbone)
        logits = self.lm_head(h)
        if cache is not None:
            cache.prefilled = True
            cache.lengths = lengths
            cache.max_length = longest
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> CausalLMOutput:
        """Consume one byte per sample; input_ids (B, 1) -> logits (B, 1, vocab)."""
        self._check_ids(input_ids)
        if not cache.prefilled:
            raise HNetError("prefill the cache first: model(prompt_ids, mask=mask, cache=cache)")
        if tuple(input_ids.shape) != (cache.batch_size, 1):
            raise HNetError(f"step takes input_ids of shape ({cache.batch_size}, 1), got {tuple(input_ids.shape)}")
        self._check_cache(cache, cache.batch_size)
        if cache.max_seqlen is not None and cache.max_length >= cache.max_seqlen:
            raise HNetError(f"generation reached the cache's max_seqlen {cache.max_seqlen}; allocate a larger cache, "
                            "or one without max_seqlen (it grows)")
        stacks = isotropic_states(cache.backbone)
        for stack in stacks:  # every stack may take one more position (a bound: inner ones only on boundaries)
            reserve(stack, stack.max_length + 1)
            stack.max_length += 1
        with step_threads(self):  # one thread for small matrices: see threads.py
            h = self.embeddings(input_ids.long())
            h, routing = self.backbone.step(h, cache.backbone)
            logits = self.lm_head(h)
        for r in routing:  # step outputs are (B,): give them the (B, 1) shape of a length-1 forward
            r.boundary_prob, r.boundary_mask, r.selected_probs = (
                r.boundary_prob[:, None], r.boundary_mask[:, None], r.selected_probs[:, None])
            if r.valid is not None:
                r.valid = r.valid[:, None]
        cache.lengths = cache.lengths + 1
        cache.max_length += 1
        return CausalLMOutput(logits=logits, routing=routing, cache=cache)

    @staticmethod
    def _check_cu_seqlens(cu_seqlens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != 1:
            raise HNetError(f"packed mode takes input_ids of shape (1, total), got {tuple(input_ids.shape)}")
        cu = torch.as_tensor(cu_seqlens, device=input_ids.device).long()
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != input_ids.shape[1]:
            raise HNetError(f"cu_seqlens must run from 0 to the total length {input_ids.shape[1]}, got {cu.tolist()}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise HNetError("cu_seqlens must be strictly increasing (no empty sequences)")
        return cu

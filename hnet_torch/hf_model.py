"""H-Net as a `transformers` causal LM: a thin adapter over HNetForCausalLM (no model code here).

torch-only by design: transformers' PreTrainedModel and GenerationMixin are PyTorch classes, so
hnet_mlx has no twin; MLX users reach the same directories through mlx-lm (hnet_mlx/mlx_lm_model.py).

Every model directory we write names this class in config.json's `auto_map` (through the small
`modeling_hnet.py` beside it, see hnet_core/mlx_lm_files.py), so

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # dtype=torch.bfloat16 works
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=32, do_sample=False)

How H-Net answers what transformers asks:
- Weights: the adapter owns our `embeddings`, `backbone` and `lm_head` modules under the same
  names as our model directories, so `save_pretrained` writes one of our directories again.
  `_core` is an HNetForCausalLM sharing those modules; every computation goes through it.
- `forward(input_ids, attention_mask, labels)`: our model wants right padding, transformers pads
  either side, so each row's valid bytes are moved to the front before the call and the logits
  are put back in place afterwards (left-padded rows then see exactly what they see alone).
  `labels` gives the usual shifted cross-entropy (`-100` ignored), so `Trainer` fine-tunes it.
- `generate`: the cache is our live InferenceCache (HNetGenerationCache wraps it). The first
  call prefills it with the whole prompt; every later call is one `step` on one byte per row.
  transformers never builds a DynamicCache for us (`_supports_default_dynamic_cache` is False);
  it slices the inputs to the newest byte itself once a cache is live.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from hnet_core import io, mlx_lm_files
from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.hf_config import HNetHFConfig
from hnet_core.official import check_shapes

from .cache import InferenceCache
from .lm import HNetForCausalLM

IGNORE_INDEX = -100


class HNetGenerationCache:
    """The cache object `generate` carries between calls: our InferenceCache plus what
    transformers reads of a cache. H-Net's state (SSM states, chunk boundaries, the EMA) cannot be
    rolled back, so it is not croppable (no assisted decoding) and not compileable."""

    is_croppable = False
    is_compileable = False

    def __init__(self, cache: InferenceCache):
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.cache.max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise HNetError("beam search is not supported for H-Net (its cache cannot be reordered); "
                        "use greedy decoding or sampling")


@dataclass
class HNetCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, L, 256) float32
    cache: HNetGenerationCache | None = None


def _to_front(mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row permutation moving the valid positions to the front in order; None when the mask
    is already right-padded (the common case: nothing to move)."""
    if mask.shape[1] < 2 or not bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        return None
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


class HNetHFForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' view of an H-Net model directory (see the module docstring)."""

    config_class = HNetHFConfig
    config: HNetHFConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["HNet"]
    # official: the residual projection stays fp32 whatever the model dtype (as in load_pretrained)
    _keep_in_fp32_modules_strict = ["residual_proj"]
    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}
    supports_gradient_checkpointing = False

    def __init__(self, config: HNetHFConfig):
        super().__init__(config)
        hnet = config.hnet_config()
        # transformers sets the default dtype to the requested one while it builds the model; pass it
        # on so parameters our constructors otherwise keep in fp32 (A_log, dt_bias) follow it too.
        core = HNetForCausalLM(hnet, dtype=torch.get_default_dtype())
        if core.embeddings.weight.device.type != "meta":
            core.init_weights()  # a fresh model (from_config); from_pretrained overwrites every weight
        self.embeddings, self.backbone, self.lm_head = core.embeddings, core.backbone, core.lm_head
        self.__dict__["_core"] = core  # shares the modules above; not a registered submodule
        self.post_init()

    @property
    def hnet(self) -> HNetForCausalLM:
        """The HNetForCausalLM this adapter runs (same parameters): for hnet_torch's own functions."""
        return self._core

    def _init_weights(self, module) -> None:
        # Our constructors initialise every parameter (official init); nothing to add.
        pass

    def get_input_embeddings(self):
        return self.embeddings

    def get_output_embeddings(self):
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            check_model_directory(path)  # one clear line instead of a loader's traceback
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            # float32 unless asked, as hnet_torch.load_pretrained (transformers' "auto" would take the
            # dtype the weights were stored in, fp16 for the bundled model)
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, then what makes the directory ours too (mlx-lm / hnet files, the
        tokenizer, and the auto_map modules transformers only copies when the model came from them)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        path = os.path.join(os.fspath(save_directory), io.CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        mlx_lm_files.write_config(os.fspath(save_directory), {**written, **self._core.config.to_dict()})
        mlx_lm_files.write_tokenizer_and_module(os.fspath(save_directory))

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: HNetGenerationCache | None = None,
                                      **kwargs: Any) -> dict:
        """Prefill: transformers' own preparation (the whole prompt and its mask). On a live cache
        only the newest byte goes in; the generic path would also inspect our signature on every
        step, which costs about a tenth of a small model's step."""
        if cache is not None and cache.cache.prefilled:
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        return super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)

    # -- running -----------------------------------------------------------------------------

    def _check_length(self, length: int) -> None:
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise HNetError(f"{length} bytes exceed this model's max_position_embeddings {limit} (config.json); "
                            "shorten the input or raise the limit (null: none)")

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: HNetGenerationCache | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> HNetCausalLMOutput | tuple:
        if inputs_embeds is not None or input_ids is None:
            raise HNetError("H-Net reads bytes: pass input_ids (inputs_embeds is not supported)")
        core = self._core
        B, L = input_ids.shape
        if cache is not None and cache.cache.prefilled:
            self._check_length(cache.cache.max_length + L)
            if L == 1:
                logits = core.step(input_ids, cache.cache).logits
            else:  # more bytes on a live cache: each row continues where it ended
                logits = core(input_ids, cache=cache.cache).logits
        else:
            self._check_length(L)
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            order = _to_front(mask)
            ids = input_ids if order is None else input_ids.gather(1, order)
            if order is not None:
                mask = mask.gather(1, order)
            if use_cache:
                cache = HNetGenerationCache(core.allocate_inference_cache(batch_size=B))
            logits = core(ids, mask=mask, cache=None if cache is None else cache.cache).logits
            if order is not None:  # back to the caller's positions
                logits = torch.empty_like(logits).scatter_(1, order[..., None].expand_as(logits), logits)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        logits = logits.float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long(),
                                   ignore_index=IGNORE_INDEX)
        out = HNetCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()


def check_model_directory(path: str) -> None:
    """Raise one HNetError line unless `path` is an H-Net model directory whose weights match its config."""
    if not io.is_model_dir(path):
        raise HNetError(f"{path} is not an H-Net model directory (expected {io.CONFIG_NAME} and {io.WEIGHTS_NAME})")
    with open(os.path.join(path, io.CONFIG_NAME), encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise HNetError(f"{path}/{io.CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != HNetHFConfig.model_type:
        found = data.get("model_type") if isinstance(data, dict) else None
        raise HNetError(f"{path} holds a model of type {found!r}, not an H-Net ('hnet')")
    config = HNetConfig.from_dict(data)
    if config.quantization is not None:
        raise HNetError(f"{path} holds quantized MLX weights, which transformers cannot run; "
                        "use hnet_mlx / mlx-lm, or convert it with `hnet convert mlx-to-torch`")
    shapes: dict[str, tuple] = {}
    for file in io.weight_files(path):
        header = io.read_safetensors_header(file)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    check_shapes(config, shapes, path)


AutoModelForCausalLM.register(HNetHFConfig, HNetHFForCausalLM, exist_ok=True)

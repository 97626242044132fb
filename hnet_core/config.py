"""H-Net model configuration, in the official JSON format.

The official checkpoints come with JSON configs such as

    {"arch_layout": ["m4", ["T1m4", ["T27"], "m4T1"], "m4"],
     "d_model": [1024, 1536, 2048], "d_intermediate": [0, 4096, 5504],
     "vocab_size": 256,
     "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2},
     "attn_cfg": {"num_heads": [16, 16, 16], "rotary_emb_dim": [32, 48, 64],
                  "window_size": [1023, 1023, -1]},
     "tie_embeddings": false}

`arch_layout` nests one list per hierarchy level: an outer level is `[encoder, inner, decoder]`,
the innermost is `[main]`. Each layout string is a run of `<letter><count>` where m = Mamba2,
t = attention, and upper case adds a SwiGLU MLP. Per-level values (`d_model`, `d_intermediate`,
attention settings) are lists indexed by level, outermost first; `ssm_cfg` values may be scalars
(shared by every level) or per-level lists.

Both backends (hnet_torch, hnet_mlx) and the exporter read this one class, so a config means the
same model everywhere. Keys we do not use are kept and written back unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import HNetError
from .io import read_json, write_json

Layout = list[Union[str, "Layout"]]

_LAYER_RUN = re.compile(r"([a-zA-Z])(\d+)")
MAMBA_HEADDIM = 64  # the Mamba2 default that H-Net keeps (ssm_cfg never sets headdim)
SWIGLU_MULTIPLE_OF = 128  # official SwiGLU rounds its hidden size up to a multiple of 128


def parse_layout_string(text: str, where: str) -> list[str]:
    """'T1m4' -> ['T', 'm', 'm', 'm', 'm'] (one letter per layer); raises on anything else."""
    if not isinstance(text, str):
        raise HNetError(f"config field {where} must be a layout string like 'm4' or 'T1m4', got {text!r}")
    pos, letters = 0, []
    for match in _LAYER_RUN.finditer(text):
        if match.start() != pos:
            break
        letter, count = match.group(1), int(match.group(2))
        if letter not in "mMtT":
            raise HNetError(
                f"config field {where} has unknown layer letter {letter!r} in {text!r}; "
                "use m/M (Mamba2, M adds an MLP) or t/T (attention, T adds an MLP)"
            )
        letters += [letter] * count
        pos = match.end()
    if pos != len(text):
        raise HNetError(
            f"config field {where} cannot parse {text!r} at position {pos}; "
            "expected runs like 'm4' or 'T1m4' (letter m/M/t/T then a count)"
        )
    return letters


@dataclass
class SSMConfig:
    """Mamba2 settings. Scalars apply to every level; lists give one value per level."""

    d_conv: Any = 4
    expand: Any = 2
    d_state: Any = 128
    chunk_size: Any = 256

    def at(self, level: int) -> dict[str, int]:
        return {k: _pick(getattr(self, k), level) for k in ("d_conv", "expand", "d_state", "chunk_size")}


@dataclass
class AttnConfig:
    """Attention settings, one value per level (scalars are allowed and shared)."""

    num_heads: Any = field(default_factory=list)
    rotary_emb_dim: Any = field(default_factory=list)
    window_size: Any = field(default_factory=list)

    def at(self, level: int) -> dict[str, int]:
        return {
            "num_heads": _pick(self.num_heads, level, 1),
            "rotary_emb_dim": _pick(self.rotary_emb_dim, level, 0),
            "window_size": _pick(self.window_size, level, -1),
        }


def _pick(value: Any, level: int, default: int | None = None) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) == 0 and default is not None:
            return default
        return value[level]
    return value


@dataclass
class LevelLayout:
    """The layers of one hierarchy level: encoder/decoder for outer levels, main for the innermost."""

    encoder: list[str] | None
    main: list[str] | None
    decoder: list[str] | None

    @property
    def is_innermost(self) -> bool:
        return self.main is not None


@dataclass
class HNetConfig:
    arch_layout: Layout = field(default_factory=list)
    d_model: list[int] = field(default_factory=list)
    d_intermediate: list[int] = field(default_factory=list)
    vocab_size: int = 256
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)
    tie_embeddings: bool = False
    # Optional: MLX quantization recorded by `hnet convert torch-to-mlx -q` (None = not quantized).
    quantization: dict | None = None
    # Keys of the JSON we do not interpret, written back unchanged.
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.ssm_cfg, dict):
            self.ssm_cfg = _build(SSMConfig, self.ssm_cfg, "ssm_cfg")
        if isinstance(self.attn_cfg, dict):
            self.attn_cfg = _build(AttnConfig, self.attn_cfg, "attn_cfg")
        self.levels = self._parse_levels()
        self.validate()

    # -- structure -------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        """Hierarchy levels (len(d_model)); a 1-stage H-Net has 2 levels."""
        return len(self.levels)

    @property
    def num_stages(self) -> int:
        """Routing stages (levels that chunk): num_levels - 1."""
        return len(self.levels) - 1

    def _parse_levels(self) -> list[LevelLayout]:
        levels: list[LevelLayout] = []
        layout: Any = self.arch_layout
        path = "arch_layout"
        while True:
            if not isinstance(layout, list):
                raise HNetError(f"config field {path} must be a list ([encoder, [inner], decoder] or [main]), got {layout!r}")
            if len(layout) == 3:
                enc = parse_layout_string(layout[0], f"{path}[0]")
                dec = parse_layout_string(layout[2], f"{path}[2]")
                levels.append(LevelLayout(encoder=enc, main=None, decoder=dec))
                layout, path = layout[1], f"{path}[1]"
            elif len(layout) == 1:
                levels.append(LevelLayout(encoder=None, main=parse_layout_string(layout[0], f"{path}[0]"), decoder=None))
                return levels
            else:
                raise HNetError(
                    f"config field {path} has {len(layout)} entries; each level must be "
                    "[encoder, [inner], decoder] (3 entries) or [main] (1 entry, innermost)"
                )

    def layers_at(self, level: int) -> list[str]:
        lv = self.levels[level]
        return lv.main if lv.is_innermost else lv.encoder + lv.decoder  # type: ignore[operator]

    def mlp_hidden(self, level: int) -> int:
        """SwiGLU hidden size actually used (official rounds d_intermediate up to a multiple of 128)."""
        d = int(self.d_intermediate[level])
        return (d + SWIGLU_MULTIPLE_OF - 1) // SWIGLU_MULTIPLE_OF * SWIGLU_MULTIPLE_OF

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> None:
        n = len(self.levels)
        for name in ("d_model", "d_intermediate"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != n:
                raise HNetError(
                    f"config field {name} must be a list with one entry per level "
                    f"({n} levels in arch_layout), got {value!r}"
                )
            if any((not isinstance(v, int)) or v < 0 for v in value):
                raise HNetError(f"config field {name} must hold non-negative integers, got {value!r}")
        for name in ("num_heads", "rotary_emb_dim", "window_size"):
            value = getattr(self.attn_cfg, name)
            if isinstance(value, list) and len(value) not in (0, n):
                raise HNetError(f"config field attn_cfg.{name} must have one entry per level ({n}), got {value!r}")
        for name in ("d_conv", "expand", "d_state", "chunk_size"):
            value = getattr(self.ssm_cfg, name)
            if isinstance(value, list) and len(value) != n:
                raise HNetError(f"config field ssm_cfg.{name} must be a number or have one entry per level ({n}), got {value!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size <= 0:
            raise HNetError(f"config field vocab_size must be a positive integer, got {self.vocab_size!r}")
        for level in range(n):
            d = self.d_model[level]
            if d <= 0:
                raise HNetError(f"config field d_model[{level}] must be positive, got {d}")
            if level > 0 and d < self.d_model[level - 1]:
                raise HNetError(
                    f"config field d_model[{level}]={d} is smaller than d_model[{level - 1}]="
                    f"{self.d_model[level - 1]}; inner levels must be at least as wide as their parent"
                )
            letters = self.layers_at(level)
            if any(c in "tT" for c in letters):
                a = self.attn_cfg.at(level)
                heads = a["num_heads"]
                if not isinstance(heads, int) or heads <= 0 or d % heads != 0:
                    raise HNetError(f"config field attn_cfg.num_heads[{level}]={heads} must divide d_model[{level}]={d}")
                rot = a["rotary_emb_dim"]
                if not isinstance(rot, int) or rot < 0 or rot % 2 or rot > d // heads:
                    raise HNetError(
                        f"config field attn_cfg.rotary_emb_dim[{level}]={rot} must be even and at most the head dim {d // heads}"
                    )
                w = a["window_size"]
                if not isinstance(w, int) or (w < 0 and w != -1):
                    raise HNetError(f"config field attn_cfg.window_size[{level}]={w} must be -1 (global) or >= 0")
            if any(c in "mM" for c in letters):
                s = self.ssm_cfg.at(level)
                for k, v in s.items():
                    if not isinstance(v, int) or v <= 0:
                        raise HNetError(f"config field ssm_cfg.{k} must be a positive integer, got {v!r}")
                if (s["expand"] * d) % MAMBA_HEADDIM != 0:
                    raise HNetError(
                        f"config field d_model[{level}]={d} times ssm_cfg.expand={s['expand']} must be a multiple of "
                        f"the Mamba2 head dim {MAMBA_HEADDIM}"
                    )
            if any(c in "MT" for c in letters) and self.d_intermediate[level] <= 0:
                raise HNetError(
                    f"config field d_intermediate[{level}] must be > 0 because level {level} has M/T blocks (which add an MLP)"
                )

    # -- JSON ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> "HNetConfig":
        if not isinstance(data, dict):
            raise HNetError(f"an H-Net config must be a JSON object, got {type(data).__name__}")
        known = {"arch_layout", "d_model", "d_intermediate", "vocab_size", "ssm_cfg", "attn_cfg", "tie_embeddings", "quantization"}
        missing = [k for k in ("arch_layout", "d_model", "d_intermediate") if k not in data]
        if missing:
            raise HNetError(f"config is missing required field {missing[0]!r}")
        kwargs = {k: v for k, v in data.items() if k in known}
        # The keys mlx-lm and transformers read or write (hnet_core.mlx_lm_files) are not part of the model config.
        from .mlx_lm_files import CONFIG_KEYS, HF_WRITTEN_KEYS

        ignored = {*CONFIG_KEYS, *HF_WRITTEN_KEYS}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known and k not in ignored}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "arch_layout": self.arch_layout,
            "d_model": list(self.d_model),
            "d_intermediate": list(self.d_intermediate),
            "vocab_size": self.vocab_size,
            "ssm_cfg": {k: getattr(self.ssm_cfg, k) for k in ("chunk_size", "d_conv", "d_state", "expand")},
            "attn_cfg": {k: getattr(self.attn_cfg, k) for k in ("num_heads", "rotary_emb_dim", "window_size")},
            "tie_embeddings": self.tie_embeddings,
        }
        out.update(self.extra)
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "HNetConfig":
        return cls.from_dict(read_json(path, "config file not found: {path}", "config file {path} is not valid JSON ({error})"))

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict(), indent=4)


def _build(cls: type, data: dict, name: str) -> Any:
    if not isinstance(data, dict):
        raise HNetError(f"config field {name} must be an object, got {data!r}")
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise HNetError(f"config field {name} has unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")
    return cls(**data)

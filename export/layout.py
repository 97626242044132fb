"""Names, shapes and meanings of every tensor that crosses an exported graph's boundary.

Framework-free (no torch): the exporter writes this table to `io.json`, and the graphs in
graph.py produce their states in exactly this order (the exporter checks it). State names follow
the module tree of one hierarchy level at a time:

    level{s}.encoder.{i}.conv | .ssm        Mamba2 layer i of level s's encoder
    level{s}.encoder.{i}.k    | .v          attention layer i (KV buffer, rotary applied)
    level{s}.routing.last_hidden            encoder output of the previous token (q side of eq. 4)
    level{s}.dechunk.last_value             EMA output of the last chunk (eq. 5), fp32
    level{s}.decoder.{i}.*                  decoder layers
    level{s}.main.{i}.*                     layers of the innermost level's main network
    level{s}.length                         tokens each sample has at level s (= next position)

Graph inputs carry the prefix `past.`, graph outputs `present.`. The extend graph takes a piece
(input_ids, mask: BATCH x LENGTH) plus the step graph's `past.` states and returns prefill-shaped
logits and routing for the piece with the step graph's `present.` states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hnet_core.config import MAMBA_HEADDIM, HNetConfig

BATCH = "batch"
LENGTH = "length"
KV_SLOTS = "kv_slots"  # step graph: slots of a global KV buffer (the runtime may trim them)


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, bool
    shape: list  # ints, or axis names (BATCH, LENGTH, "level{s}_length", KV_SLOTS)
    meaning: str

    def to_dict(self) -> dict:
        return asdict(self)


def level_axis(level: int) -> str:
    """Name of the sequence axis at hierarchy level `level` in prefill (level 0: the input length)."""
    return LENGTH if level == 0 else f"level{level}_length"


def kv_slots(window: int, max_seqlen: int) -> tuple[int, bool]:
    """(slots, ring): a ring buffer of window + 1 slots where that is smaller than max_seqlen
    (position t lives in slot t % slots), else a buffer with one slot per position (hnet_torch's
    CausalMHA.cache_slots)."""
    if window >= 0 and window + 1 <= max_seqlen:
        return window + 1, True
    return max_seqlen, False


def _stack_specs(config: HNetConfig, level: int, part: str, letters: list[str], max_seqlen: int, dtype: str,
                 graph: str) -> list[TensorSpec]:
    d = config.d_model[level]
    out = []
    for i, letter in enumerate(letters):
        prefix = f"level{level}.{part}.{i}"
        if letter in "mM":
            s = config.ssm_cfg.at(level)
            d_inner = s["expand"] * d
            conv_dim = d_inner + 2 * s["d_state"]
            out.append(TensorSpec(f"{prefix}.conv", dtype, [BATCH, conv_dim, s["d_conv"]],
                                  "Mamba2 depthwise-conv state: the last d_conv conv inputs"))
            out.append(TensorSpec(f"{prefix}.ssm", "float32", [BATCH, d_inner // MAMBA_HEADDIM, MAMBA_HEADDIM, s["d_state"]],
                                  "Mamba2 SSM state (heads, head dim, d_state)"))
        else:
            a = config.attn_cfg.at(level)
            heads = a["num_heads"]
            slots, ring = kv_slots(a["window_size"], max_seqlen)
            if ring:
                axis = slots
                kind = f"ring buffer of window+1 = {slots} slots (position t in slot t % {slots})"
            elif graph == "prefill":
                axis = level_axis(level)
                kind = ("one entry per position at this level; pad axis 1 with zeros to the decode capacity "
                        "(kv_slots) before the first step")
            else:
                axis = KV_SLOTS
                kind = "one slot per position at this level (slot t = position t); kv_slots is the decode capacity"
            for kv in ("k", "v"):
                out.append(TensorSpec(f"{prefix}.{kv}", dtype, [BATCH, axis, heads, d // heads],
                                      f"attention {kv.upper()} cache, {kind}" + (", rotary applied" if kv == "k" else "")))
    return out


def state_specs(config: HNetConfig, max_seqlen: int, dtype: str, graph: str) -> list[TensorSpec]:
    """Every recurrent state, in graph order. graph is 'prefill' (outputs) or 'step' / 'extend' (inputs and
    outputs; both carry the same decode-time states)."""
    if graph == "extend":
        graph = "step"
    out: list[TensorSpec] = []
    for level, lv in enumerate(config.levels):
        d = config.d_model[level]
        if lv.is_innermost:
            out += _stack_specs(config, level, "main", lv.main, max_seqlen, dtype, graph)
        else:
            out += _stack_specs(config, level, "encoder", lv.encoder, max_seqlen, dtype, graph)
            out.append(TensorSpec(f"level{level}.routing.last_hidden", dtype, [BATCH, d],
                                  "routing: encoder output of the previous token (q side of eq. 4)"))
            out.append(TensorSpec(f"level{level}.dechunk.last_value", "float32", [BATCH, d],
                                  "dechunk: EMA output of the last chunk (eq. 5)"))
            out += _stack_specs(config, level, "decoder", lv.decoder, max_seqlen, dtype, graph)
        out.append(TensorSpec(f"level{level}.length", "int64", [BATCH],
                              f"tokens each sample has consumed at level {level} (its next position)"))
    return out


def routing_specs(config: HNetConfig, graph: str) -> list[TensorSpec]:
    """Per routing stage: boundary probability, boundary mask and which entries are real."""
    out = []
    for s in range(config.num_stages):
        if graph in ("prefill", "extend"):
            shape = [BATCH, level_axis(s)]
            where = "stage 0: the input bytes" if s == 0 else f"stage {s}: the chunks of stage {s - 1}, padded per row"
            if graph == "extend":
                where += " (the piece only; at least one entry per inner stage, masked when the piece made no chunk)"
        else:
            shape = [BATCH, 1]
            where = "this step"
        out += [
            TensorSpec(f"stage{s}.boundary_prob", "float32", shape, f"p_t of eq. 4 ({where})"),
            TensorSpec(f"stage{s}.boundary_mask", "bool", shape, "p_t > 0.5 and the entry is real: this token starts a chunk"),
            TensorSpec(f"stage{s}.valid", "bool", shape,
                       "the entry is real (prefill: within the row's length; step: the stage ran for this sample)"),
        ]
    return out


def graph_io(config: HNetConfig, max_seqlen: int, dtype: str, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of 'prefill', 'extend' or 'step', in graph order, with their io.json names."""
    states = state_specs(config, max_seqlen, dtype, graph)
    if graph == "prefill":
        inputs = [
            TensorSpec("input_ids", "int64", [BATCH, LENGTH], "bytes (BOS 254 first), right-padded"),
            TensorSpec("mask", "bool", [BATCH, LENGTH], "True on each row's real bytes (a prefix of at least one byte)"),
        ]
        logits = TensorSpec("logits", dtype, [BATCH, LENGTH, config.vocab_size], "next-byte logits at every position")
    elif graph == "extend":
        inputs = [
            TensorSpec("input_ids", "int64", [BATCH, LENGTH], "the next bytes of every sample (a piece), right-padded"),
            TensorSpec("mask", "bool", [BATCH, LENGTH],
                       "True on each row's real bytes (a prefix; an all-False row leaves that sample's states as they are)"),
        ]
        inputs += [TensorSpec("past." + s.name, s.dtype, s.shape, s.meaning + " (before the piece; the step's states, "
                              "global KV buffers holding at least past length + piece length slots)") for s in states]
        logits = TensorSpec("logits", dtype, [BATCH, LENGTH, config.vocab_size], "next-byte logits at every position of the piece")
    else:
        inputs = [TensorSpec("input_ids", "int64", [BATCH, 1], "the next byte of every sample")]
        inputs += [TensorSpec("past." + s.name, s.dtype, s.shape, s.meaning) for s in states]
        logits = TensorSpec("logits", dtype, [BATCH, 1, config.vocab_size], "next-byte logits")
    outputs = [logits, *routing_specs(config, graph)]
    outputs += [TensorSpec("present." + s.name, s.dtype, s.shape, s.meaning) for s in states]
    return inputs, outputs

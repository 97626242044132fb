"""Export-friendly prefill and decode-step modules over an hnet_torch model's weights.

    PrefillGraph(model, max_seqlen)(input_ids, mask) -> (logits, *routing, *states)
    ExtendGraph(model, max_seqlen)(input_ids, mask, *states) -> (logits, *routing, *states)
    StepGraph(model, max_seqlen, variant)(input_ids, *states) -> (logits, *routing, *states)

The tensors come in the order of layout.graph_io, flat and individually named, so one exported
file holds the whole model and the runtime needs nothing but these tensors. What differs from
hnet_torch's HNet.forward/step, and why:
  * the number of chunks M of a level is data dependent: it is read with `.item()` and bounded
    with `torch._check` (a Python int would be baked into the graph as the example's value);
  * every state is returned instead of written in place, and every counter is per sample;
  * in a step, the reference runs the inner level only `if boundary.any()` (a Python branch on
    data). Variant "where" always runs it for every sample and keeps the new state only where the
    sample is at a boundary; variant "cond" wraps the inner level in torch.cond (an ONNX `If`) on
    `any(boundary)`, skipping it when no sample in the batch starts a chunk;
  * an extension continues the step states with a right-padded piece (rows may be empty). Nothing is
    forced at the cut: the first new token is compared with the cached last hidden state (eq. 4),
    the EMA starts from the cached last value, and the inner level gets exactly the chunks the piece
    produced, padded to at least one (masked) entry so no axis is ever empty.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hnet_core.config import HNetConfig
from hnet_torch.chunk import boundary_order
from hnet_torch.dechunk import EMA_BLOCK, P_MAX, P_MIN
from hnet_torch.hnet import HNet
from hnet_torch.lm import HNetForCausalLM
from hnet_torch.routing import boundary_probability

from .layers import State, keep, stack_extend, stack_prefill, stack_step
from .layout import state_specs
from .scan import ChunkCounts, ema_chunk_scan

STEP_VARIANTS = ("where", "cond")


def _routing_prefill(node: HNet, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 over (b, l, d): p (b, l) with p_0 = 1, boundary = p > 0.5 within the mask."""
    r = node.routing_module
    l = h.shape[1]
    # q of the previous token: shift by one with a pad-and-cut (no zero-length slice when l = 1).
    q = F.pad(r.q_proj_layer(h), (0, 0, 1, 0))[:, :l]
    p = boundary_probability(q, r.k_proj_layer(h))
    first = torch.arange(l, device=h.device)[None] == 0
    p = torch.where(first, torch.ones((), dtype=p.dtype), p)
    return p, (p > 0.5) & mask


def level_prefill(node: HNet, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, chunks: ChunkCounts,
                  max_seqlen: int, out: State, routing: list) -> torch.Tensor:
    """One level over (b, l, D_parent) right-padded rows; appends its routing and writes its states.
    `chunks` holds the scan chunk counts of length l (shared by this level's scans)."""
    s = node.level
    d_parent = h.shape[-1]
    h = node._pad(h)
    if node.is_innermost:
        h = stack_prefill(node.main_network, h, mask, lengths, chunks, max_seqlen, f"level{s}.main", out)
        out[f"level{s}.length"] = lengths
        return h[..., :d_parent]

    h = stack_prefill(node.encoder, h, mask, lengths, chunks, max_seqlen, f"level{s}.encoder", out)  # (b, l, D)
    residual = node.residual_proj(h.to(node.residual_proj.weight.dtype))
    p, boundary = _routing_prefill(node, h, mask)
    rows = torch.arange(h.shape[0], device=h.device)
    out[f"level{s}.routing.last_hidden"] = h[rows, lengths - 1]
    routing.append((p, boundary, mask.clone()))  # a copy: a graph output may not be a graph input

    # Chunk (eq. 3): each row's boundary tokens first, in order; M = most chunks in any row.
    counts = boundary.sum(-1)  # (b,) >= 1: the first byte is always a boundary
    M = counts.max().item()
    torch._check(M >= 1)
    torch._check(M <= h.shape[1])
    order = boundary_order(boundary)[:, :M]  # (b, M)
    inner = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
    inner_mask = torch.arange(M, device=h.device)[None] < counts[:, None]
    inner_chunks = ChunkCounts(M)
    inner = level_prefill(node.main_network, inner, inner_mask, counts, inner_chunks, max_seqlen, out, routing)

    # Dechunk (eq. 5-6): EMA over the chunks, then every byte takes its chunk's value.
    p_chunks = p.float().clamp(P_MIN, P_MAX).gather(1, order)  # (b, M)
    z = ema_chunk_scan(inner, p_chunks, EMA_BLOCK, inner_chunks)  # (b, M, D) fp32
    chunk_of = (torch.cumsum(boundary.long(), dim=1) - 1).clamp(min=0)  # (b, l)
    z = z.gather(1, chunk_of[..., None].expand(-1, -1, z.shape[-1]))
    out[f"level{s}.dechunk.last_value"] = z[rows, lengths - 1]
    # Decoder input: dechunk * STE (exactly 1 in the forward pass) + residual, added in fp32 (eq. 7-9).
    h = (z.to(inner.dtype).to(residual.dtype) + residual).to(inner.dtype)
    h = stack_prefill(node.decoder, h, mask, lengths, chunks, max_seqlen, f"level{s}.decoder", out)
    out[f"level{s}.length"] = lengths
    return h[..., :d_parent]


def level_extend(node: HNet, h: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, chunks: ChunkCounts,
                 max_seqlen: int, past: State, out: State, routing: list) -> torch.Tensor:
    """One level over a piece (b, l, D_parent) of `counts` real tokens per row, on top of past's states."""
    s = node.level
    d_parent = h.shape[-1]
    h = node._pad(h)
    past_len = past[f"level{s}.length"]  # (b,) tokens before the piece
    out[f"level{s}.length"] = past_len + counts
    if node.is_innermost:
        h = stack_extend(node.main_network, h, mask, past_len, counts, chunks, max_seqlen, past, f"level{s}.main", out)
        return h[..., :d_parent]

    h = stack_extend(node.encoder, h, mask, past_len, counts, chunks, max_seqlen, past, f"level{s}.encoder", out)
    residual = node.residual_proj(h.to(node.residual_proj.weight.dtype))
    r = node.routing_module
    l = h.shape[1]
    rows = torch.arange(h.shape[0], device=h.device)
    last = past[f"level{s}.routing.last_hidden"]  # (b, D)
    # q of the previous token: the cached one for the piece's first token (eq. 4 across the cut).
    q = F.pad(r.q_proj_layer(h), (0, 0, 1, 0))[:, :l]
    first = torch.arange(l, device=h.device)[None] == 0  # (1, l)
    q = torch.where(first[..., None], r.q_proj_layer(last)[:, None].to(q.dtype), q)
    p = boundary_probability(q, r.k_proj_layer(h))
    p = torch.where(first & (past_len[:, None] == 0), torch.ones((), dtype=p.dtype), p)  # p_0 = 1 at a sample's start
    boundary = (p > 0.5) & mask
    last_index = (counts - 1).clamp(min=0)
    out[f"level{s}.routing.last_hidden"] = torch.where((counts > 0)[:, None], h[rows, last_index].to(last.dtype), last)
    routing.append((p, boundary, mask.clone()))

    # Chunk (eq. 3) the piece's boundary tokens; at least one (masked) inner entry when there are none.
    inner_counts = boundary.sum(-1)  # (b,) may be 0
    M = inner_counts.max().clamp(min=1).item()
    torch._check(M >= 1)
    torch._check(M <= h.shape[1])
    order = boundary_order(boundary)[:, :M]  # (b, M)
    inner = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
    inner_mask = torch.arange(M, device=h.device)[None] < inner_counts[:, None]
    inner_chunks = ChunkCounts(M)
    inner = level_extend(node.main_network, inner, inner_mask, inner_counts, inner_chunks, max_seqlen, past, out,
                         routing)

    # Dechunk (eq. 5-6) from the cached EMA value; bytes before the piece's first boundary keep it.
    last_value = past[f"level{s}.dechunk.last_value"]  # (b, D) fp32
    p_chunks = p.float().clamp(P_MIN, P_MAX).gather(1, order)  # (b, M)
    z = ema_chunk_scan(inner, p_chunks, EMA_BLOCK, inner_chunks, initial=last_value)  # (b, M, D) fp32
    z = torch.cat([last_value[:, None].float(), z], dim=1)  # (b, M + 1, D): entry 0 = before the piece
    chunk_of = torch.cumsum(boundary.long(), dim=1)  # (b, l) in 0..M
    z = z.gather(1, chunk_of[..., None].expand(-1, -1, z.shape[-1]))
    out[f"level{s}.dechunk.last_value"] = torch.where((counts > 0)[:, None], z[rows, last_index], last_value)
    h = (z.to(inner.dtype).to(residual.dtype) + residual).to(inner.dtype)
    h = stack_extend(node.decoder, h, mask, past_len, counts, chunks, max_seqlen, past, f"level{s}.decoder", out)
    return h[..., :d_parent]


@dataclass
class StepContext:
    """What every level of a decode step needs besides its tensors."""

    config: HNetConfig
    max_seqlen: int
    variant: str  # "where" | "cond"


def level_step(node: HNet, h: torch.Tensor, ctx: StepContext, past: State, out: State, routing: list,
               active: torch.Tensor | None) -> torch.Tensor:
    """One token per sample at this level, h (b, 1, D_parent). Samples with active False keep their state."""
    s = node.level
    d_parent = h.shape[-1]
    h = node._pad(h)
    positions = past[f"level{s}.length"]  # (b,)
    step = torch.ones_like(positions) if active is None else active.long()
    if node.is_innermost:
        h = stack_step(node.main_network, h, positions, ctx.max_seqlen, past, f"level{s}.main", out, active)
        out[f"level{s}.length"] = positions + step
        return h[..., :d_parent]

    h = stack_step(node.encoder, h, positions, ctx.max_seqlen, past, f"level{s}.encoder", out, active)
    residual = node.residual_proj(h.to(node.residual_proj.weight.dtype))
    r = node.routing_module
    last = past[f"level{s}.routing.last_hidden"]
    p = boundary_probability(r.q_proj_layer(last), r.k_proj_layer(h[:, 0]))  # (b,)
    p = torch.where(positions > 0, p, torch.ones((), dtype=p.dtype))
    out[f"level{s}.routing.last_hidden"] = keep(active, h[:, 0], last)
    boundary = p > 0.5
    if active is not None:
        boundary = boundary & active
    routing.append((p, boundary, torch.ones_like(boundary) if active is None else active))

    if ctx.variant == "cond":
        inner = _inner_step_cond(node, h, ctx, past, out, routing, boundary)
    else:
        inner = level_step(node.main_network, h, ctx, past, out, routing, boundary)  # (b, 1, D)

    last_value = past[f"level{s}.dechunk.last_value"]
    pc = p.float().clamp(P_MIN, P_MAX)[:, None]
    z = torch.where(boundary[:, None], pc * inner[:, 0].float() + (1 - pc) * last_value, last_value)
    out[f"level{s}.dechunk.last_value"] = keep(active, z, last_value)
    h = (z[:, None].to(inner.dtype).to(residual.dtype) + residual).to(inner.dtype)
    h = stack_step(node.decoder, h, positions, ctx.max_seqlen, past, f"level{s}.decoder", out, active)
    out[f"level{s}.length"] = positions + step
    return h[..., :d_parent]


def _inner_step_cond(node: HNet, h: torch.Tensor, ctx: StepContext, past: State, out: State, routing: list,
                     boundary: torch.Tensor) -> torch.Tensor:
    """The inner level under torch.cond(any(boundary)): skipped when no sample starts a chunk."""
    below = tuple(f"level{s}." for s in range(node.level + 1, ctx.config.num_levels))
    names = [t.name for t in state_specs(ctx.config, ctx.max_seqlen, "float32", "step") if t.name.startswith(below)]
    n_stages = ctx.config.num_stages - node.level - 1  # routing stages below this one

    def dense(t: torch.Tensor) -> torch.Tensor:
        # torch.cond needs both branches to return equally laid-out tensors that alias no input.
        return t.clone(memory_format=torch.contiguous_format)

    # The inner level's weights go in as operands, so the branch reads the graph's weights (as
    # torch.cond's Dynamo pass arranges) instead of capturing copies as constants.
    inner = node.main_network
    weights = {**dict(inner.named_parameters()), **dict(inner.named_buffers())}

    def run(h, boundary, *rest):
        states, tensors = rest[: len(names)], rest[len(names) :]
        inner_out, inner_routing = {}, []
        with torch.nn.utils.stateless._reparametrize_module(inner, dict(zip(weights, tensors))):
            y = level_step(inner, h, ctx, dict(zip(names, states)), inner_out, inner_routing, boundary)
        return tuple(dense(t) for t in (y, *(t for r in inner_routing for t in r), *(inner_out[n] for n in names)))

    def skip(h, boundary, *rest):
        no = torch.zeros_like(boundary)
        nan = torch.full(boundary.shape, float("nan"), device=h.device)
        states = rest[: len(names)]
        return tuple(dense(t) for t in (torch.zeros_like(h), *(t for _ in range(n_stages) for t in (nan, no, no)), *states))

    operands = (h, boundary, *(past[n] for n in names), *weights.values())
    if not torch.compiler.is_compiling():  # eager (tests of the graph itself): a plain branch
        results = run(*operands) if bool(boundary.any()) else skip(*operands)
    else:
        results = _cond(boundary.any(), run, skip, operands)
    flat = results[1 : 1 + 3 * n_stages]
    routing.extend(tuple(flat[3 * i : 3 * i + 3]) for i in range(n_stages))
    out.update(zip(names, results[1 + 3 * n_stages :]))
    return results[0]


def _cond(pred: torch.Tensor, true_fn, false_fn, operands: tuple) -> tuple:
    """torch.cond, traced without Dynamo. torch.cond first compiles its own call with Dynamo (to
    check that the branches have no side effects), which for these branches takes longer than
    tracing the rest of the step graph twice over; its operator, cond_op, traces the branches with
    the same make_fx tracer as everything else. The branches here are pure functions of their
    operands. cond_op is torch-internal: without it, torch.cond."""
    try:
        from torch._higher_order_ops.cond import cond_op
    except ImportError:
        return torch.cond(pred, true_fn, false_fn, operands)
    return cond_op(pred, true_fn, false_fn, operands)


class PrefillGraph(nn.Module):
    def __init__(self, model: HNetForCausalLM, max_seqlen: int):
        super().__init__()
        self.model = model
        self.max_seqlen = max_seqlen
        self.state_names = [t.name for t in state_specs(model.config, max_seqlen, "float32", "prefill")]

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lengths = mask.long().sum(-1)  # (b,)
        h = self.model.embeddings(input_ids)
        out: State = {}
        routing: list = []
        h = level_prefill(self.model.backbone, h, mask, lengths, ChunkCounts(input_ids.shape[1]), self.max_seqlen, out,
                          routing)
        logits = self.model.lm_head(h)
        assert sorted(out) == sorted(self.state_names), "prefill states do not match the layout"
        return (logits, *(t for r in routing for t in r), *(out[n] for n in self.state_names))


class ExtendGraph(nn.Module):
    """A right-padded piece (rows may be empty) on top of the step states: prefill continued."""

    def __init__(self, model: HNetForCausalLM, max_seqlen: int):
        super().__init__()
        self.model = model
        self.max_seqlen = max_seqlen
        self.state_names = [t.name for t in state_specs(model.config, max_seqlen, "float32", "step")]

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = dict(zip(self.state_names, states))
        out: State = {}
        routing: list = []
        h = self.model.embeddings(input_ids)
        h = level_extend(self.model.backbone, h, mask, mask.long().sum(-1), ChunkCounts(input_ids.shape[1]),
                         self.max_seqlen, past, out, routing)
        logits = self.model.lm_head(h)
        assert sorted(out) == sorted(self.state_names), "extend states do not match the layout"
        return (logits, *(t for r in routing for t in r), *(out[n] for n in self.state_names))


class StepGraph(nn.Module):
    def __init__(self, model: HNetForCausalLM, max_seqlen: int, variant: str = "where"):
        super().__init__()
        if variant not in STEP_VARIANTS:
            raise ValueError(f"variant must be one of {STEP_VARIANTS}, got {variant!r}")
        self.model = model
        self.ctx = StepContext(model.config, max_seqlen, variant)
        self.state_names = [t.name for t in state_specs(model.config, max_seqlen, "float32", "step")]

    def forward(self, input_ids: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = dict(zip(self.state_names, states))
        out: State = {}
        routing: list = []
        h = self.model.embeddings(input_ids)  # (b, 1, D)
        h = level_step(self.model.backbone, h, self.ctx, past, out, routing, None)
        logits = self.model.lm_head(h)
        routing = [tuple(t[:, None] for t in r) for r in routing]  # (b,) -> (b, 1)
        assert sorted(out) == sorted(self.state_names), "step states do not match the layout"
        return (logits, *(t for r in routing for t in r), *(out[n] for n in self.state_names))

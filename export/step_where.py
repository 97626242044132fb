"""The "where" step graph, derived from the traced "cond" one instead of being traced again.

graph.py's two step variants differ only in how a level runs its inner level. "cond" wraps it in
torch.cond(any(boundary), run, skip), which becomes an ONNX If; "where" always runs it. `run` is
exactly the call the "where" variant makes (level_step with active=boundary, which keeps the state
of every sample that is not at a boundary). So giving every If its then-branch unconditionally
turns the cond graph into the where graph: the same operators on the same values, hence the same
outputs, bit for bit (tests/test_onnx_step_variants.py compares them).

Why bother: tracing a graph costs torch.export several milliseconds per operator (a quarter of the
bundled model's export time went to the where graph); this rewrite takes a fraction of a second.
It works on the saved protobuf, after quantization and weight externalisation, so weights stored in
a shared external file stay references into it.
"""

from __future__ import annotations

import onnx

DERIVED = "derived from step_cond"  # export.json's exporter.capture entry for step.onnx


def _then_branch(node: onnx.NodeProto) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == "then_branch")


def _inline_then_branches(graph: onnx.GraphProto, taken: set[str]) -> int:
    """Replace each If of `graph` (recursively) by its then-branch's nodes, then an Identity per
    output so the If's output names keep their consumers. Returns the number of Ifs inlined."""
    nodes: list[onnx.NodeProto] = []
    inlined = 0
    for node in graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        branch = _then_branch(node)
        inlined += 1 + _inline_then_branches(branch, taken)
        graph.initializer.extend(branch.initializer)  # the inner levels' weights (and constants)
        graph.value_info.extend(branch.value_info)
        for moved in branch.node:
            if moved.name in taken:  # node names must stay unique in one graph
                moved.name = f"{node.name}/then/{moved.name}"
            taken.add(moved.name)
            nodes.append(moved)
        for inner, outer in zip(branch.output, node.output):
            nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/then/{outer}"))
    del graph.node[:]
    graph.node.extend(nodes)
    return inlined


def _remove_unused_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read (the If conditions' any(boundary), the else-branches'
    inputs), repeating until nothing changes."""
    while True:
        read = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        kept = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def where_step_from_cond(cond: onnx.ModelProto) -> onnx.ModelProto:
    """The "where" step graph of a "cond" step graph (a copy; `cond` is left as it is)."""
    model = onnx.ModelProto()
    model.CopyFrom(cond)
    _inline_then_branches(model.graph, {n.name for n in model.graph.node})  # no If: no inner level, same graph
    _remove_unused_nodes(model.graph)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # the conditions' constants go
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    values = {n for node in model.graph.node for n in node.output}
    described = [v for v in model.graph.value_info if v.name in values]
    del model.graph.value_info[:]
    model.graph.value_info.extend(described)
    return model

"""Where the weights of step_cond.onnx's If branches live.

torch.onnx.export puts every weight in the main graph, and the If branches that run the inner
levels read them from the outer scope. onnxruntime's CPU provider pre-packs (re-lays out for its
kernels) only the constant initializers of the graph a node belongs to, so branch nodes reading
outer-scope weights run unpacked. For float MatMul that costs little, but MatMulNBits without its
packed layout is 2-3x slower (measured on a quantized 2-stage export, onnxruntime 1.32: step_cond
at batch 1 went from 36 to 113 bytes/s once every weight sat in the innermost graph that reads it).

`push_down` (on the saved protobuf) moves each main-graph initializer that only one branch reads
into that branch, recursively into nested Ifs; `hoist` (on an onnx_ir model, before rewriting an
export's weights) brings them all back to the main graph. Names are unique across the graphs, so
the runtime's shared weights (SessionOptions.add_initializer, by name) and the external weights
file reach them where they are.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.append(attr.g)
            out.extend(attr.graphs)
    return out


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
    for sub in _subgraphs(graph):
        names |= _names_read(sub)
    return names


def push_down(graph: onnx.GraphProto) -> int:
    """Move initializers read only inside one subgraph into it, recursively; returns how many moves."""
    subs = _subgraphs(graph)
    if not subs:
        return 0
    read_here = {o.name for o in graph.output}
    for node in graph.node:
        read_here.update(node.input)
    read_by = [_names_read(sub) for sub in subs]
    keep, moves = [], 0
    for init in graph.initializer:
        readers = [i for i, names in enumerate(read_by) if init.name in names]
        if init.name not in read_here and len(readers) == 1:
            subs[readers[0]].initializer.append(init)
            moves += 1
        else:
            keep.append(init)
    if moves:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return moves + sum(push_down(sub) for sub in subs)


def hoist(model: ir.Model) -> None:
    """Move every subgraph initializer of `model` into its main graph (undoing push_down)."""

    def visit(graph: ir.Graph) -> None:
        for node in graph:
            for attr in node.attributes.values():
                inner = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                    list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
                for sub in inner:
                    visit(sub)
                    for name in list(sub.initializers):
                        model.graph.register_initializer(sub.initializers.pop(name))

    visit(model.graph)

"""The Linear weights of the exported graphs: stored once, transposed, and optionally quantized.

    linear = LinearWeights(Quantization("int4", block_size=32))
    linear.rewrite(onnx_model)        # for every graph of one export, before its weights are saved

torch.onnx.export writes a Linear y = x W^T as Gemm(x, W, transB=1) for a 2-D x and as
MatMul(x, Transpose(W)) for a 3-D one. onnxruntime folds each such Transpose into a new
initializer when it loads a graph, so every session held its own transposed copy of the weights
(and the prefill and step graphs could not share them). Here every such W becomes one
initializer `W.T` = W^T (in, out), used by a plain MatMul in every graph, so the weights file
holds each matrix once, in the layout the runtime reads.

With a Quantization, those MatMuls become onnxruntime's MatMulNBits (com.microsoft domain,
weight-only blockwise int4 or int8 with float scales and zero points, as onnxruntime-genai ships
LLMs): the blocks are quantized by onnxruntime's own kernel
(onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer), and the node is
built the way its MatMulNBitsQuantizer builds it. Each weight is quantized once and the result is
shared by all graphs of the export. Weights whose names contain one of `keep_float` stay in
float: the routing module's q/k projections (the boundary decision p_t > 0.5 of eq. 4 is a hard
threshold on their output), the LM head (256 rows, a negligible share of the bytes read) and, at
4 bits, the stage-0 (outermost) encoder.
Embeddings (a Gather) and norms (a Mul) are never MatMul weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from hnet_core.errors import HNetError

QUANTIZE = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what onnxruntime's MatMulNBits kernels accept (a power of two >= 16)
DEFAULT_BLOCK_SIZE = 32
# accuracy_level 4: the CPU kernel quantizes the activations to int8 per block and runs an integer
# dot product (the fast path of MatMulNBits on x86 and ARM); other providers ignore it.
DEFAULT_ACCURACY_LEVEL = 4
KEEP_FLOAT = ("routing_module.q_proj_layer", "routing_module.k_proj_layer", "lm_head")
# At 4 bits the stage-0 encoder (whose output the first routing module thresholds) also stays float.
# Measured on the bundled model's held-out text (bench/bench_onnx_quant.py, docs/benchmarks.md):
# quantizing the inner encoders costs 0.0007 bits per byte and moves no stage-0 boundary, so they are
# quantized (they are the larger ones in the official 2-stage shapes); the stage-0 one at 4 bits
# costs another 0.0054 and flips 1.9% of the stage-0 boundary decisions.
KEEP_FLOAT_INT4 = KEEP_FLOAT + ("model.backbone.encoder.",)
MS_DOMAIN = "com.microsoft"


@dataclass
class Quantization:
    kind: str  # "int8" | "int4"
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    keep_float: tuple[str, ...] | None = None  # None: KEEP_FLOAT, plus the encoders at 4 bits

    def __post_init__(self) -> None:
        if self.keep_float is None:
            self.keep_float = KEEP_FLOAT_INT4 if self.kind == "int4" else KEEP_FLOAT

    @property
    def bits(self) -> int:
        return QUANTIZE[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size, "symmetric": False,
                "accuracy_level": self.accuracy_level, "op": f"{MS_DOMAIN}.MatMulNBits",
                "keep_float": list(self.keep_float)}


def check_quantization(kind: str | None, block_size: int | None, dtype: str) -> Quantization | None:
    """The Quantization of the command-line options, or None for float weights; HNetError on a bad one."""
    if kind is None:
        if block_size is not None:
            raise HNetError("--block-size only applies with --quantize int8 or int4")
        return None
    if kind not in QUANTIZE:
        raise HNetError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if dtype != "float32":
        raise HNetError(f"--quantize {kind} quantizes float32 weights (its scales and activations stay float32); "
                        f"drop --dtype {dtype}")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size not in BLOCK_SIZES:
        raise HNetError(f"--block-size for --quantize {kind} must be one of {', '.join(map(str, BLOCK_SIZES))} "
                        f"(onnxruntime's MatMulNBits), got {block_size}")
    return Quantization(kind, block_size)


def _is_weight(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and len(value.const_value.shape) == 2)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


@dataclass
class LinearWeights:
    """Rewrites the Linear weights of every graph of one export, sharing transposes and quantized
    tensors between graphs by name (so the weights file holds each once)."""

    quantization: Quantization | None = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # initializer name -> data (until released)
    names: set[str] = field(default_factory=set)  # every initializer this object made
    quantized: set[str] = field(default_factory=set)  # original weight names
    kept_float: set[str] = field(default_factory=set)

    def rewrite(self, model: ir.Model) -> None:
        graph = model.graph
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type == "Transpose" and node.domain == "" and _is_weight(node.inputs[0]) \
                    and list(_attr(node, "perm", [1, 0])) == [1, 0]:
                weight_t = self._transposed(graph, node.inputs[0])
                node.outputs[0].replace_all_uses_with(weight_t)
                node.graph.remove(node, safe=True)
                self._quantize_uses(graph, weight_t)
            elif node.op_type == "Gemm" and node.domain == "" and _is_weight(node.inputs[1]) \
                    and _attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1 \
                    and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0:
                weight_t = self._transposed(graph, node.inputs[1])
                self._gemm_to_matmul(node, weight_t)
                self._quantize_uses(graph, weight_t)
        if self.quantization is not None:
            # W.T initializers an earlier float32 export made (quantize_export).
            for node in list(ir.traversal.RecursiveGraphIterator(graph)):
                weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
                if _is_weight(weight) and weight.name.endswith(".T"):
                    self._quantize_uses(graph, weight)
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        for name, value in list(graph.initializers.items()):
            if not value.uses() and (name + ".T" in graph.initializers or name + ".T" in self.names or name in self.names):
                graph.initializers.pop(name)  # W once transposed, W.T once quantized: unused now

    def _quantize_uses(self, graph: ir.Graph, weight_t: ir.Value) -> None:
        """Quantize the MatMuls reading W.T right away and drop the float W.T once nothing reads it, so a
        quantized export never holds a float copy of more than one weight beside the model."""
        if self.quantization is None:
            return
        original = weight_t.name[:-2]
        if any(k in original for k in self.quantization.keep_float):
            self.kept_float.add(original)
            return
        for user, index in list(weight_t.uses()):
            if user.op_type == "MatMul" and user.domain == "" and index == 1:
                self._quantize(graph, user, weight_t)
        if not weight_t.uses() and original in self.quantized:
            graph.initializers.pop(weight_t.name, None)
            self.tensors.pop(weight_t.name, None)

    def _initializer(self, graph: ir.Graph, name: str, make) -> ir.Value:
        if name in graph.initializers:
            return graph.initializers[name]
        if name not in self.tensors:
            self.tensors[name] = make()
        self.names.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(self.tensors[name], name=name))
        graph.register_initializer(value)
        return value

    def _transposed(self, graph: ir.Graph, weight: ir.Value) -> ir.Value:
        # (out, in) -> (in, out), contiguous: the MatMul B of y = x W^T.
        return self._initializer(graph, weight.name + ".T", lambda: np.ascontiguousarray(weight.const_value.numpy().T))

    def _gemm_to_matmul(self, node: ir.Node, weight_t: ir.Value) -> None:
        x, bias = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
        matmul = ir.node("MatMul", [x, weight_t], name=node.name)
        new = [matmul]
        if bias is not None:
            new.append(ir.node("Add", [matmul.outputs[0], bias], name=f"{node.name}_bias"))
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]])

    def _quantize(self, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> None:
        q = self.quantization
        name, original = weight.name, weight.name[:-2]
        k, n = weight.const_value.shape.numpy()
        if k < q.block_size:
            self.kept_float.add(original)  # a matrix narrower than one block gains nothing
            return
        packed, scales, zero_points = self._blocks(weight)
        inputs = [node.inputs[0],
                  self._initializer(graph, f"{name}_Q{q.bits}", lambda: packed),
                  self._initializer(graph, f"{name}_scales", lambda: scales),
                  self._initializer(graph, f"{name}_zero_points", lambda: zero_points)]
        new = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{node.name}_Q{q.bits}",
                      attributes={"K": k, "N": n, "bits": q.bits, "block_size": q.block_size,
                                  "accuracy_level": q.accuracy_level})
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        self.quantized.add(original)
        self.names.add(name)  # so the float W.T, unused once every MatMul on it is quantized, is dropped

    def _blocks(self, weight: ir.Value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """onnxruntime's blockwise quantization of B (K, N): packed (N, K/bs, bs*bits/8) uint8,
        scales (N, K/bs) float32, zero points (N, ceil(K/bs * bits/8)) uint8."""
        q, name = self.quantization, weight.name
        key = f"{name}_Q{q.bits}"
        if key not in self.tensors:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=False, bits=q.bits)
            packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight.const_value.numpy())
            self.tensors[key] = packed
            self.tensors[f"{name}_scales"] = scales
            self.tensors[f"{name}_zero_points"] = zero_points
        return self.tensors[key], self.tensors[f"{name}_scales"], self.tensors[f"{name}_zero_points"]

    def release(self) -> None:
        """Forget the arrays made so far (once a graph's weights are written to the shared file, the
        next graph can recompute a transpose in a moment instead of holding a second copy of the model)."""
        self.tensors.clear()

    def report(self) -> dict:
        return {"quantized": sorted(self.quantized), "float": sorted(self.kept_float)}

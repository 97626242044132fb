"""One torch.export trace per graph, translated to ONNX without the exporter's second trace.

torch.onnx.export(dynamo=True) traces a module twice: torch.export.export captures it, then
run_decompositions re-traces the whole program (functionalisation and decomposition through fake
tensors and symbolic shapes) so that every operator has an ONNX translation. For H-Net's graphs the
second trace is more than half of the export time (bundled model: 82 of 156 s), yet it changes
almost nothing: every operator our graph modules use is already in the ONNX registry except a few
aliases, which `_lower` rewrites by hand (one linear pass over the FX nodes, no tracing):

    aten.to.dtype               -> aten._to_copy (a Cast; what the decomposition emits)
    aten.__and__.Tensor         -> aten.bitwise_and.Tensor
    aten.rsub.Scalar(x, c)      -> aten.sub.Tensor(c, x)
    aten.item                   -> aten._local_scalar_dense
    aten.argsort(x, dim, desc)  -> aten.sort(x, dim, desc)[1]
    aten._assert_tensor_metadata -> removed (a trace-time check)

The translation then runs on the captured program itself. This uses torch.onnx's translator
(`torch.onnx._internal.exporter`), which is not public API: when anything here fails (another torch
version, an operator outside the list), `to_onnx` falls back to torch.onnx.export, which is slower
but gives the same graph. `last_path()` says which one ran (the exporter records it in export.json
and a test checks the fast path is taken on the torch version CI installs). float16 graphs always
take torch.onnx.export (see to_onnx).
"""

from __future__ import annotations

import logging
import operator

import onnx_ir as ir
import torch

logger = logging.getLogger(__name__)

FAST = "one-trace"
FALLBACK = "torch.onnx.export"
_state = {"path": None}


def last_path() -> str | None:
    """How the most recent to_onnx call built its model: FAST or FALLBACK."""
    return _state["path"]


def _argsort_as_sort(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    aten = torch.ops.aten
    x, *rest = node.args
    dim = rest[0] if rest else node.kwargs.get("dim", -1)
    descending = rest[1] if len(rest) > 1 else node.kwargs.get("descending", False)
    with graph.inserting_before(node):
        pair = graph.call_function(aten.sort.default, (x, dim, descending))
        pair.meta["val"] = torch.sort(node.args[0].meta["val"], dim, descending) if "val" in node.args[0].meta else None
        indices = graph.call_function(operator.getitem, (pair, 1))
    indices.meta = dict(node.meta)
    node.replace_all_uses_with(indices)
    graph.erase_node(node)


def _lower(module: torch.fx.GraphModule) -> None:
    """Rewrite the few operators without an ONNX translation to ones with one, in place and
    recursively (torch.cond branches are graph modules of their own)."""
    aten = torch.ops.aten
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "get_attr":
            sub = getattr(module, node.target, None)
            if isinstance(sub, torch.fx.GraphModule):
                _lower(sub)
        if node.op != "call_function":
            continue
        target = node.target
        if target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif target is aten.to.dtype:
            # to(x, dtype, non_blocking=False, copy=False, memory_format=None): only the dtype matters here;
            # to the dtype x already has, it returns x itself (no Cast, as the decomposition would give).
            source = node.args[0]
            dtype = node.args[1] if len(node.args) > 1 else node.kwargs["dtype"]
            value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
            is_output = any(user.op == "output" for user in node.users)  # named in the program's signature
            if isinstance(value, torch.Tensor) and value.dtype == dtype and not is_output:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
            else:
                node.target, node.args, node.kwargs = aten._to_copy.default, (source,), {"dtype": dtype}
        elif target is aten.__and__.Tensor:
            node.target = aten.bitwise_and.Tensor
        elif target is aten.rsub.Scalar:
            if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
                raise NotImplementedError("rsub with alpha")
            node.target, node.args, node.kwargs = aten.sub.Tensor, (node.args[1], node.args[0]), {}
        elif target is aten.item.default:
            node.target = aten._local_scalar_dense.default
        elif target is aten.argsort.default:
            _argsort_as_sort(graph, node)
    graph.lint()
    module.recompile()


def _promote_types(module: torch.fx.GraphModule) -> None:
    """Make type promotion explicit (ONNX operators take one dtype), as torch.onnx's
    insert_type_promotion_nodes does, with the same rules and the same inserted casts, but from the
    dtypes the trace already recorded in node.meta["val"]: that pass re-runs the whole graph on fake
    tensors to learn them (a third of the remaining export time for the bundled model)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.onnx._internal.fx import type_utils
    from torch.onnx._internal.fx.passes import type_promotion as tp

    table = tp.TypePromotionTable()

    def val(arg):
        return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg

    for gm in module.modules():
        graph = gm.graph
        for node in list(graph.nodes):
            rule = tp.get_type_promotion_rule(node, table) if node.op == "call_function" else None
            if rule is None:
                continue
            args, kwargs = torch.utils._pytree.tree_map(val, (node.args, node.kwargs))
            info = rule.preview_type_promotion(args, kwargs)
            fake_mode = next((v.fake_mode for v in torch.utils._pytree.tree_leaves((args, kwargs))
                              if isinstance(v, FakeTensor)), None)

            def promote(arg, dtype):
                if dtype is None:
                    return arg
                if isinstance(arg, (list, tuple)):
                    return type(arg)(promote(a, dtype) for a in arg)
                value = val(arg)
                if isinstance(value, torch.Tensor):
                    if value.dtype == dtype:
                        return arg
                    target, cast_args = torch.ops.prims.convert_element_type.default, (arg,)
                else:  # a Python or symbolic number becomes a 0-d tensor of the promoted dtype
                    if type_utils.from_scalar_type_to_torch_dtype(type(value)) == dtype:
                        return arg
                    target, cast_args = torch.ops.aten.scalar_tensor.default, (arg,)
                with graph.inserting_before(node):
                    cast = graph.call_function(target, cast_args, {"dtype": dtype})
                with fake_mode, torch._dispatch.python.enable_python_dispatcher():
                    cast.meta["val"] = target(value, dtype=dtype)
                cast.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
                return cast

            new_args = tuple(promote(a, info.args_dtypes.get(i)) for i, a in enumerate(node.args))
            new_kwargs = {k: promote(a, info.kwargs_dtypes.get(k)) for k, a in node.kwargs.items()}
            if new_args == node.args and new_kwargs == node.kwargs:
                continue
            if fake_mode is None:
                raise NotImplementedError(f"type promotion of {node.target} without a tensor argument")
            node.args, node.kwargs = new_args, new_kwargs
            node.target = tp.find_compatible_op_overload(node.target.overloadpacket,
                                                         *torch.utils._pytree.tree_map(val, (new_args, new_kwargs)))
            out = node.meta["val"]
            if not isinstance(out, torch.Tensor) or out.dtype != info.out_dtype:
                # torch.onnx's pass would cast the result back ("op math"); our graphs never need it.
                raise NotImplementedError(f"type promotion of {node.target} changes its result dtype")
        gm.recompile()


def _one_trace(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
               opset: int, dynamic_shapes) -> ir.Model:
    from torch.onnx import _flags
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import _core, _dynamic_shapes, _fx_passes, _ir_passes, _registration

    dims, _ = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
    program = torch.export.export(module, args, dynamic_shapes=dims, strict=False,
                                  prefer_deferred_runtime_asserts_over_guards=_flags.PREFER_DEFERRED_RUNTIME_ASSERTS_OVER_GUARDS)
    gm = program.graph_module
    _lower(gm)
    _promote_types(gm)
    program._graph_module = _fx_passes.remove_assertion_nodes(gm)
    registry = _registration.ONNXRegistry.from_torchlib()
    model = _core._exported_program_to_onnx_program(program, registry=registry).model
    model = onnxscript_apis.convert_version(model, opset)
    _ir_passes.rename_inputs(model, input_names)
    _ir_passes.rename_outputs(model, output_names)
    return model


def _two_traces(module, args, input_names, output_names, opset, dynamic_shapes) -> ir.Model:
    return torch.onnx.export(
        module, args, None, input_names=input_names, output_names=output_names, opset_version=opset, dynamo=True,
        dynamic_shapes=dynamic_shapes, verbose=False,
        # No onnxscript optimisation: its constant folding turns every Linear weight into a transposed
        # copy with a generated name, so the graphs could no longer share one weights file (and a large
        # model's .onnx would pass the 2 GB protobuf limit). onnxruntime folds those transposes itself.
        optimize=False,
    ).model


def to_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str], opset: int,
            dynamic_shapes, fast: bool = True) -> ir.Model:
    """The ONNX model of `module` called on `args` (dynamic_shapes: per input, {axis: name}).
    float16 modules take torch.onnx.export: there torch.onnx's type promotion computes reductions
    in float32 ("op math") and casts back, which `_promote_types` does not do (a float16 export
    through it fails ONNX shape inference)."""
    if fast and any(t.dtype == torch.float16 for t in (*module.parameters(), *module.buffers())):
        fast = False
    # Every traced node would record the Python stack it came from (a sixth of a graph's tracing
    # time); the exporter strips that metadata from the graphs anyway (tracing._strip_metadata).
    emit_stacks = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        return _capture(module, args, input_names, output_names, opset, dynamic_shapes, fast)
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit_stacks


def _capture(module, args, input_names, output_names, opset, dynamic_shapes, fast: bool) -> ir.Model:
    if fast:
        try:
            model = _one_trace(module, args, input_names, output_names, opset, dynamic_shapes)
            _state["path"] = FAST
            return model
        except Exception as error:  # any torch version or operator this path does not know
            logger.info("one-trace ONNX capture failed (%s: %s); using torch.onnx.export",
                        type(error).__name__, error)
    _state["path"] = FALLBACK
    return _two_traces(module, args, input_names, output_names, opset, dynamic_shapes)

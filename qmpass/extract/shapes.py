"""Static shapes of activations, for FLOP counts at reference shapes.

``onnx.shape_inference`` copies the whole model; for a large model that is mostly the
weights. Inference here runs on a copy in which every large initializer is replaced by a
typed graph input of the same shape, so its cost does not grow with the weights.
Dynamic dimensions (``batch``, ``N``...) are reported as None; callers take them as 1.
"""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["dim_size", "infer_shapes", "infer_types"]

_SMALL = 4096  # initializers up to this many elements stay (Reshape targets, axes...)

Shape = tuple[int | None, ...]


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Map every tensor name with a known rank to its shape (None for unknown dims)."""
    light = _without_large_initializers(model)
    try:
        # data propagation follows Shape -> Gather -> Concat -> Reshape chains, which
        # exporters write for dynamic batch sizes; without it those dims are unknown
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference is a nicety for FLOP counts; a model it rejects has none
        inferred = light
    shapes: dict[str, Shape] = {}
    _collect(inferred.graph, shapes)
    return shapes


def infer_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Element types (``TensorProto`` codes) of the tensors ``names``: as declared, else
    by shape inference on a copy without the large weights (types do not depend on
    weight values). Names inference cannot type are left out."""
    declared = _types(model.graph)
    if any(name not in declared for name in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(
                _without_large_initializers(model), strict_mode=False
            )
        except Exception:  # untyped names are left to the caller's default
            inferred = None
        if inferred is not None:
            for name, elem_type in _types(inferred.graph).items():
                declared.setdefault(name, elem_type)
    return {name: declared[name] for name in names if name in declared}


def _types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def dim_size(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A static dimension's size, or ``None`` for a dynamic one: a symbol, no value, or a
    negative value (PaddlePaddle's exporter and others write ``-1``, which onnxruntime
    treats as dynamic)."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None


def _collect(graph: onnx.GraphProto, shapes: dict[str, Shape]) -> None:
    for info in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(dim_size(d) for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect(attr.g, shapes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect(sub, shapes)


def _size(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _without_large_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    small = [t for t in graph.initializer if _size(t) <= _SMALL]
    declared = {i.name for i in graph.input}  # IR < 4 models list initializers as inputs
    large = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if _size(t) > _SMALL and t.name not in declared
    ]
    light_graph = helper.make_graph(
        list(graph.node),
        graph.name,
        [*graph.input, *large],
        list(graph.output),
        initializer=small,
        value_info=list(graph.value_info),
    )
    light = helper.make_model(light_graph, opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    light.functions.extend(model.functions)
    return light

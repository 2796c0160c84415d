"""Which tensors of a graph are constants, their values, and where they came from.

Exporters put weights in graph initializers, in ``Constant`` nodes, in external data
files, or behind small constant subgraphs (``Transpose``/``Reshape`` of a constant,
``ConstantOfShape``, ``Cast``...). :class:`ConstantScope` resolves a tensor name to its
value lazily, evaluating only the subgraph a weight needs with ``onnx.reference`` (no
onnxruntime session, no IR-version limits), and records the source of every value.
Subgraphs (``If``/``Loop`` bodies) get a child scope that also sees the outer names.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qmpass.errors import QmpassInputError
from qmpass.extdata import is_external, spilled, tensor_array

__all__ = ["ConstantScope"]

#: Ops whose output is not a function of their inputs: never folded.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli"}
)
#: Folded values larger than this many elements are not materialised (a weight never is).
_MAX_FOLD_ELEMENTS = 1 << 27


class ConstantScope:
    """Resolve tensor names of one graph (and its enclosing graphs) to constant values.

    ``external`` names the initializers that were loaded from external data files.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        opsets: Mapping[str, int],
        parent: ConstantScope | None = None,
        external: frozenset[str] = frozenset(),
    ) -> None:
        self._opsets = dict(opsets)
        self._external = external
        self._parent = parent
        self._initializers = {t.name: t for t in graph.initializer}
        self._producers = {out: node for node in graph.node for out in node.output if out}
        self._elem_types = {
            info.name: info.type.tensor_type.elem_type
            for info in [*graph.input, *graph.value_info, *graph.output]
            if info.type.tensor_type.elem_type
        }
        self._cache: dict[str, tuple[np.ndarray, str] | None] = {}

    def child(self, graph: onnx.GraphProto) -> ConstantScope:
        return ConstantScope(graph, self._opsets, parent=self, external=self._external)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of ``name``, or None if it depends on a graph input."""
        found = self._resolve(name)
        return None if found is None else found[0]

    def source(self, name: str) -> str | None:
        """``initializer``, ``external_data``, ``constant_node``, ``folded(Op)`` or None."""
        stored = self.stored_external(name)
        if stored is not None:  # without reading it again (one moved to a scratch file by
            # qmpass, not by the model's author, is still the initializer it was)
            return "initializer" if spilled(stored) else "external_data"
        found = self._resolve(name)
        return None if found is None else found[1]

    def _type_witness(self, name: str) -> tuple[np.ndarray, str] | None:
        """An empty array of the declared element type of ``name``, if it is declared."""
        scope: ConstantScope | None = self
        while scope is not None:
            if name in scope._elem_types:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(scope._elem_types[name])
                return np.zeros(0, dtype=dtype), "type"
            scope = scope._parent
        return None

    def stored_external(self, name: str) -> onnx.TensorProto | None:
        """The initializer ``name`` (of this graph or an enclosing one) if its data is in an
        external file, else None."""
        tensor = self.initializer(name)
        return tensor if tensor is not None and is_external(tensor) else None

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """The initializer ``name`` of this graph or an enclosing one (None if ``name`` is
        computed, or not there)."""
        scope: ConstantScope | None = self
        while scope is not None:
            if name in scope._initializers:
                return scope._initializers[name]
            if name in scope._producers:
                return None
            scope = scope._parent
        return None

    def _resolve(self, name: str) -> tuple[np.ndarray, str] | None:
        if not name:
            return None
        if name in self._initializers and is_external(self._initializers[name]):
            # read each time, never kept: holding every weight is what external data avoids
            return self._resolve_uncached(name)
        if name in self._cache:
            return self._cache[name]
        self._cache[name] = None  # cycles in a malformed graph resolve to "not constant"
        found = self._resolve_uncached(name)
        self._cache[name] = found
        return found

    def _resolve_uncached(self, name: str) -> tuple[np.ndarray, str] | None:
        if name in self._initializers:
            tensor = self._initializers[name]
            external = name in self._external or tensor.data_location == onnx.TensorProto.EXTERNAL
            try:
                array = tensor_array(tensor)
            except (ValueError, OSError) as exc:
                raise QmpassInputError(
                    f"initializer '{name}' cannot be read ({exc}); is its external data missing?"
                ) from exc
            return array, "external_data" if external else "initializer"
        node = self._producers.get(name)
        if node is None:
            return self._parent._resolve(name) if self._parent is not None else None
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
            return None
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attr in node.attribute):
            return None
        inputs = [self._resolve(i) if i else None for i in node.input]
        if node.op_type == "CastLike" and inputs[0] is not None and inputs[1] is None:
            # CastLike reads only the element type of its second input; exporters point it
            # at a graph input (to cast a constant bias to the input's type)
            inputs[1] = self._type_witness(node.input[1])
        if any(found is None for i, found in zip(node.input, inputs, strict=True) if i):
            return None
        feeds = {i: found[0] for i, found in zip(node.input, inputs, strict=True) if found}
        if node.op_type == "ConstantOfShape" and len(feeds) == 1:
            filled = _filled(node, next(iter(feeds.values())))
            return None if filled is None else (filled, "folded(ConstantOfShape)")
        try:
            outputs = ReferenceEvaluator(node, opsets=self._opsets).run(None, feeds)
        except Exception:  # the reference raises many types; any failure means "not folded"
            return None
        array = np.asarray(dict(zip(node.output, outputs, strict=False))[name])
        if array.size > _MAX_FOLD_ELEMENTS:
            return None
        if node.op_type == "Constant":
            return array, "constant_node"
        return array, f"folded({node.op_type})"


def _filled(node: onnx.NodeProto, shape: np.ndarray) -> np.ndarray | None:
    """A ``ConstantOfShape`` output as a read-only broadcast of its one value: no memory
    for the tensor itself (ONNX's light test models make every weight so, 0.55 GB on
    VGG-19, and each scope kept its own copy). None where the node is malformed."""
    value = next((numpy_helper.to_array(a.t) for a in node.attribute
                  if a.name == "value"), np.zeros(1, dtype=np.float32))
    dims = np.asarray(shape)
    if value.size != 1 or dims.ndim != 1 or dims.dtype.kind not in "iu" or np.any(dims < 0):
        return None
    if int(np.prod(dims, dtype=np.float64)) > _MAX_FOLD_ELEMENTS:
        return None
    return np.broadcast_to(value.reshape(()), tuple(int(d) for d in dims))

"""What every rewrite shares: the ``check``/``apply`` contract and graph helpers.

A rewrite is one class in one file. ``check`` looks at the graph and a planned
:class:`~qmpass.plan.Step` and returns ``None`` when the rewrite applies, or a sentence
saying why it declines ("Gemm with transA=1 is not rewritten"). ``apply`` changes the
onnx-graphsurgeon graph in place; it is only called after ``check`` returned ``None``.

Rewrites see an operator as the affine map from ``op.input`` to ``op.output`` (the
output of its bias ``Add`` or folded ``BatchNormalization`` when there is one; see
:class:`qmpass.extract.Operator`). Replacing an operator means: detach ``op.output`` from
the node that produced it, let new nodes produce it, and let ``graph.cleanup()`` drop
the nodes and weights nobody reads any more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qmpass.algebra import FactoredConv, FactoredLinear, decline_factors, decline_rank
from qmpass.extdata import copy_fields, tensor_array
from qmpass.extract import Operator
from qmpass.modelio import caller_form
from qmpass.plan.plan import Step, StepKind
from qmpass.scratch import SCRATCH_BYTES
from qmpass.scratch import active as active_scratch

__all__ = [
    "OperatorFactorisation",
    "Rewrite",
    "StepTensors",
    "add_node",
    "decline_factors",
    "decline_node",
    "decline_rank",
    "detach_output",
    "export_like",
    "find_node",
    "name_nodes",
    "new_constant",
    "unique_name",
    "weight_dtype",
    "working_form",
]

#: new weights of a step, computed by ``qmpass.plan.factors`` (matrix views, float64)
StepTensors = Mapping[str, np.ndarray]


class Rewrite(ABC):
    """One kind of rewrite: ``check`` says why not, ``apply`` changes the graph."""

    kind: ClassVar[StepKind]

    @abstractmethod
    def check(self, graph: gs.Graph, step: Step, ops: Mapping[str, Operator]) -> str | None:
        """``None`` when ``step`` can be applied to ``graph``; otherwise the reason."""

    def check_tensors(
        self, step: Step, ops: Mapping[str, Operator], tensors: StepTensors
    ) -> str | None:
        """``None`` when ``tensors`` fit ``step`` (names, shapes, finite values)."""
        return None

    def apply(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        """Rewrite ``graph`` in place (only after :meth:`check` returned ``None``).

        Raises ``ValueError`` with :meth:`check_tensors`' sentence when the tensors do not
        fit the step; the graph is then untouched.
        """
        reason = self.check_tensors(step, ops, tensors)
        if reason is not None:
            raise ValueError(f"cannot apply {step.kind} to {', '.join(step.operators)}: {reason}")
        self._rewrite(graph, step, ops, tensors)

    @abstractmethod
    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        """The graph change itself, on a step whose tensors fit."""


class OperatorFactorisation(Rewrite):
    """What the two one-operator low-rank rewrites share: the step names one operator,
    which its ``record``'s rule accepts and the graph still holds, the rank must save,
    and the tensors are ``first`` (``q x d_in``), ``second`` (``d_out x q``) and
    ``bias`` (``d_out``, required when the operator has a bias)."""

    kind: ClassVar[StepKind] = "lowrank"
    #: the algebra record a step becomes (its ``declines`` is the rule)
    record: ClassVar[type[FactoredLinear] | type[FactoredConv]]

    def check(self, graph: gs.Graph, step: Step, ops: Mapping[str, Operator]) -> str | None:
        if step.kind != self.kind:
            return f"a '{step.kind}' step is not a low-rank factorisation"
        if len(step.operators) != 1:
            return f"a low-rank step names one operator, not {len(step.operators)}"
        name = step.operators[0]
        op = ops.get(name)
        if op is None:
            return f"operator '{name}' was not extracted from this model"
        reason = self.record.declines(op) or decline_node(graph, ops, name)
        if reason is not None:
            return reason
        d_out, d_in = op.shape
        return decline_rank(step.rank, d_in, (d_out,))

    def check_tensors(
        self, step: Step, ops: Mapping[str, Operator], tensors: StepTensors
    ) -> str | None:
        op = ops[step.operators[0]]
        d_out, d_in = op.shape
        return decline_factors(tensors, step.rank, d_in, d_out, needs_bias=op.bias is not None)


def name_nodes(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` (``model`` itself, ``in_place``) whose nodes all have unique
    names, chosen exactly as extraction names them (``node.name`` or
    ``<op_type>_<index>``, ``#k`` on repeats), so Operator names find their nodes in the
    rewritten graph."""
    named = model
    if not in_place:
        named = onnx.ModelProto()
        named.CopyFrom(model)
    seen: set[str] = set()

    def unique(name: str) -> str:
        candidate, k = name, 1
        while candidate in seen:
            k += 1
            candidate = f"{name}#{k}"
        seen.add(candidate)
        return candidate

    def walk(graph: onnx.GraphProto) -> None:
        for index, node in enumerate(graph.node):
            name = unique(node.name or f"{node.op_type}_{index}")
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    walk(sub)
            node.name = name

    walk(named.graph)
    return named


def working_form(model: onnx.ModelProto, *, owned: bool) -> onnx.ModelProto:
    """``model`` as rewrites take it: in :func:`~qmpass.modelio.caller_form`, its nodes
    named (:func:`name_nodes`). ``model`` itself, edited, when ``owned`` (nobody else
    holds it: a copy would hold every weight twice); otherwise one copy."""
    form = caller_form(model, in_place=owned)
    return name_nodes(form, in_place=owned or form is not model)


def find_node(graph: gs.Graph, name: str) -> gs.Node | None:
    """The node called ``name`` in the main graph (not in subgraphs), if any."""
    for node in graph.nodes:
        if node.name == name:
            return node
    return None


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in ``graph`` yet, derived from ``base``."""
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    candidate, k = base, 1
    while candidate in taken:
        k += 1
        candidate = f"{base}_{k}"
    return candidate


def new_constant(graph: gs.Graph, base: str, array: np.ndarray, dtype: np.dtype) -> gs.Constant:
    """A new initializer with a fresh name, stored in ``dtype`` (the model's weight type);
    within :func:`qmpass.scratch.scratch_file`, a large floating-point one is written there
    and the graph holds a reference (:class:`ScratchValues`)."""
    name = unique_name(graph, base)
    values = np.ascontiguousarray(array, dtype=dtype)
    scratch = active_scratch()
    # weights only: an integer tensor may be a shape or split input, which onnxruntime's
    # shape inference reads from the proto
    if scratch is not None and values.dtype.kind == "f" and values.nbytes >= SCRATCH_BYTES:
        return gs.Constant(name, ScratchValues(scratch.put(name, values)))
    return gs.Constant(name, values)


class ScratchValues(gs.ir.tensor.LazyValues):  # type: ignore[misc]
    """onnx-graphsurgeon's values of a tensor in a scratch file: exported as the
    reference, read (memory-mapped) only when a rewrite asks for them."""

    def load(self) -> np.ndarray:
        return np.array(tensor_array(self.tensor))


def weight_dtype(graph: gs.Graph, op: Operator) -> np.dtype:
    """The element type the operator's weight is stored in (float32 unless the model
    says otherwise); new weights keep it so the model's types stay consistent."""
    tensor = graph.tensors().get(op.weight_name)
    if isinstance(tensor, gs.Constant):
        return np.dtype(tensor.values.dtype)
    if tensor is not None and tensor.dtype is not None:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)) if isinstance(
            tensor.dtype, int
        ) else np.dtype(tensor.dtype)
    return np.dtype(np.float32)


def detach_output(graph: gs.Graph, tensor_name: str) -> gs.Variable:
    """Cut ``tensor_name`` loose from the node that produces it and return it, so new
    nodes can produce it; the old producer chain is dropped by ``graph.cleanup()``."""
    tensor = graph.tensors()[tensor_name]
    if not isinstance(tensor, gs.Variable):
        raise ValueError(f"'{tensor_name}' is a constant, not an activation")
    for producer in list(tensor.inputs):
        producer.outputs = [t for t in producer.outputs if t is not tensor]
    return tensor


def export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` into a copy of ``original``'s envelope: the same IR version
    (onnxruntime refuses the newest), opsets, producer, metadata and functions, and the
    original's own records of the graph inputs and outputs (onnx-graphsurgeon drops
    their ``metadata_props``, which the dynamo exporter writes).

    ``original`` must be in :func:`qmpass.modelio.caller_form` (no initializer-backed
    inputs of IR < 4): its inputs are copied as they are."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    # the envelope onto the exported model (copying the original, then the graph into
    # it, held every weight twice more)
    for field in onnx.ModelProto.DESCRIPTOR.fields:
        if field.name != "graph":
            model.ClearField(field.name)
    copy_fields(original, model, skip="graph")
    # the interface is the original's, record for record (onnx-graphsurgeon drops inputs
    # it sees no use for, e.g. the position inputs of Sequence ops)
    del model.graph.input[:]
    model.graph.input.extend(original.graph.input)
    records = {v.name: v for v in original.graph.output}
    for value in model.graph.output:
        if value.name in records:
            value.CopyFrom(records[value.name])
    del model.graph.metadata_props[:]
    model.graph.metadata_props.extend(original.graph.metadata_props)
    return model


# -- graph state shared by the low-rank and shared-basis rewrites ----------------------------
def decline_node(graph: gs.Graph, ops: Mapping[str, Operator], name: str) -> str | None:
    """Why operator ``name`` cannot be replaced in ``graph`` (``None`` if it can): it must
    have been extracted, be a node of the main graph and still produce ``op.output``.
    (Whether its kind of rewrite takes it is the rule's: :mod:`qmpass.algebra.rules`.)"""
    op = ops.get(name)
    if op is None:
        return f"operator '{name}' was not extracted from this model"
    node = find_node(graph, name)
    if node is None or node.op != op.op_type:
        return f"operator '{name}' ({op.op_type}) is not a node of the main graph"
    out = graph.tensors().get(op.output)
    if not isinstance(out, gs.Variable) or len(out.inputs) != 1:
        return f"output '{op.output}' of operator '{name}' is not produced by one node"
    producer = out.inputs[0]
    # the node itself, or its bias Add / folded BatchNormalization reading its output
    if producer is not node and not any(t in node.outputs for t in producer.inputs):
        return f"output '{op.output}' is no longer produced by '{name}' (rewritten already?)"
    return None


def add_node(
    graph: gs.Graph,
    op_type: str,
    name: str,
    inputs: Sequence[gs.Tensor],
    outputs: Sequence[gs.Tensor],
    attrs: Mapping[str, object] | None = None,
) -> None:
    """Append a node named after ``name`` (made unique) to ``graph``."""
    graph.nodes.append(
        gs.Node(
            op_type,
            unique_name(graph, name),
            attrs=dict(attrs or {}),
            inputs=list(inputs),
            outputs=list(outputs),
        )
    )

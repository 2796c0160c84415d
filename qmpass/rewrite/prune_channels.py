"""Structured channel pruning of one coupled channel group (:mod:`qmpass.extract.channels`).

A group is a set of channels ``0..C-1`` that several tensors share. Keeping the channels
``kept`` (``k`` of them) means, for every constant of the group:

* producer weights keep the ``kept`` slices of their output axis; biases, BatchNorm
  parameters, depthwise filters and per-channel ``Add``/``Mul`` vectors the ``kept``
  entries (a depthwise ``Conv``'s ``group`` becomes ``k``);
* consumer weights ``W`` (input channels on ``axis``, the group at ``[offset, offset+C)``)
  get new input slices. Plain pruning keeps the ``kept`` ones. With least-squares
  compensation the planner supplies, per consumer node ``N``, ``"mix:N"`` (``C x k``)
  and ``"shift:N"`` (``C``) such that the full channel vector ``x ~= M x_kept + s``;
  then ``W x = W (M x_kept + s) = (W M) x_kept + W s``, so the new input slices are
  ``W M`` (``W'[o, j, ...] = sum_c W[o, c, ...] M[c, j]``) and ``W s`` joins the bias
  (summed over kernel taps for a Conv, which is exact except where zero padding at the
  borders drops taps). A consumer without a bias gets one (``Conv``: input ``B``;
  ``Gemm``: ``C``; ``MatMul``: an ``Add`` after it).

The algebra (which indices stay, ``W M`` and ``W s``) is
:class:`qmpass.algebra.PrunedGroup`'s, shared with the Relax pass; this module prints it
into the graph's constants. Constants are replaced on the node that reads them, so a
constant shared with nodes outside the group (the exporters' deduplicated ``Identity``
biases) keeps its value there; several steps compose because every slice reads the
graph as it is now (a ``Concat`` consumer's offset follows the groups already pruned
before it). Activation tensors whose width changed lose their stale shapes; graph
inputs and outputs do not
change (a group that reaches a graph output is pinned by the analysis).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qmpass.algebra import PrunedGroup, decline_kept
from qmpass.extract import Operator
from qmpass.extract.channels import ChannelConsumer, ChannelGroup, SlicedConstant, channel_groups
from qmpass.plan.plan import Step, StepKind
from qmpass.rewrite.base import Rewrite, StepTensors, unique_name

__all__ = ["PruneChannels", "decline_kept"]  # decline_kept: the algebra's, re-exported

#: name of the bias ``Add`` inserted after a MatMul consumer that had none; a later step
#: that prunes the MatMul's output channels finds it by this name and slices it too
_BIAS_SUFFIX = "/prune_bias"


class PruneChannels(Rewrite):
    """Keep ``step.kept`` of the channels of group ``step.group``; see the module docstring.

    ``groups`` are :func:`~qmpass.extract.channels.channel_groups` of the model the graph
    was imported from (named by :func:`~qmpass.rewrite.base.name_nodes`), before any step
    was applied. Tensors (optional, float64): ``"mix:N"`` (``channels x len(kept)``) and
    ``"shift:N"`` (``channels``) for consumer node ``N``. Belongs after extraction and
    before any pass that fuses or renames nodes.
    """

    kind: ClassVar[StepKind] = "prune_channels"

    def __init__(self, groups: Sequence[ChannelGroup]) -> None:
        self.groups = {g.name: g for g in groups}
        # the groups whose channels one consumer input reads (several behind a Concat)
        self._feeders: dict[tuple[str, str], list[tuple[ChannelGroup, ChannelConsumer]]] = (
            defaultdict(list)
        )
        for group in groups:
            for consumer in group.consumers:
                self._feeders[(consumer.node, consumer.activation)].append((group, consumer))

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> PruneChannels:
        """The rewrite for the groups of ``model`` (nodes named by ``name_nodes``)."""
        return cls(channel_groups(model))

    # -- check -------------------------------------------------------------------------------
    def check(self, graph: gs.Graph, step: Step, ops: Mapping[str, Operator]) -> str | None:
        if step.kind != self.kind:
            return f"a '{step.kind}' step is not a channel pruning"
        if step.group is None:
            return "the step names no channel group"
        group = self.groups.get(step.group)
        if group is None:
            return f"no channel group '{step.group}' in this model"
        reason = PrunedGroup.declines(step, group)
        if reason is not None:
            return reason
        nodes = {n.name: n for n in graph.nodes}
        for sliced in (*group.producers, *group.sliced):
            reason = _decline_sliced(nodes, sliced, group.channels)
            if reason is not None:
                return reason
        for consumer in group.consumers:
            reason = self._decline_consumer(nodes, group, consumer)
            if reason is not None:
                return reason
        return None

    def check_tensors(
        self, step: Step, ops: Mapping[str, Operator], tensors: StepTensors
    ) -> str | None:
        """``None`` when the compensation ``tensors`` fit the step; otherwise why not.
        :meth:`apply` raises ``ValueError`` with this sentence when they do not fit."""
        group = self.groups.get(str(step.group))
        if group is None:
            return f"no channel group '{step.group}' in this model"
        return PrunedGroup.declines_tensors(step, group, tensors)

    def _decline_consumer(
        self, nodes: Mapping[str, gs.Node], group: ChannelGroup, consumer: ChannelConsumer
    ) -> str | None:
        node = nodes.get(consumer.node)
        if node is None or node.op != consumer.op_type:
            return f"consumer {consumer.op_type} '{consumer.node}' is no longer in the graph"
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            return f"consumer Conv '{node.name}' is grouped"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return f"consumer Gemm '{node.name}' has transA=1"
        if not node.inputs or node.inputs[0].name != consumer.activation:
            return f"consumer '{node.name}' no longer reads '{consumer.activation}'"
        weight = _stored(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            return f"the weight of consumer '{node.name}' is no longer a stored constant"
        offset, width = self._layout(nodes, group, consumer)
        shape = tuple(weight.shape)
        if consumer.axis >= len(shape) or shape[consumer.axis] != width:
            return (f"the weight of consumer '{node.name}' has shape {list(shape)}, expected "
                    f"{width} input channels on axis {consumer.axis}; another step changed it")
        if offset < 0 or offset + group.channels > width:
            return f"the channels of group '{group.name}' no longer fit consumer '{node.name}'"
        return None

    def _layout(
        self, nodes: Mapping[str, gs.Node], group: ChannelGroup, consumer: ChannelConsumer
    ) -> tuple[int, int]:
        """The consumer's current (offset, input width): groups that enter the same
        ``Concat`` before this one and were pruned already moved it."""
        offset, width = consumer.offset, consumer.width
        for other, seen in self._feeders[(consumer.node, consumer.activation)]:
            if other.name == group.name:
                continue
            removed = other.channels - _current_width(nodes, other)
            width -= removed
            if seen.offset < consumer.offset:
                offset -= removed
        return offset, width

    # -- apply -------------------------------------------------------------------------------
    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        group = self.groups[str(step.group)]
        record = PrunedGroup.of(step, group, tensors)
        nodes = {n.name: n for n in graph.nodes}
        layouts = {c: self._layout(nodes, group, c) for c in group.consumers}
        slicer = _Slicer(graph, record)
        recorded = {(s.node, s.input_index) for s in (*group.producers, *group.sliced)}
        for sliced in group.producers:
            node = nodes[sliced.node]
            slicer.slice(node, sliced.input_index, sliced.axis, sliced.offset)
            _slice_added_bias(slicer, node, recorded, group.channels)
        for sliced in group.sliced:
            node = nodes[sliced.node]
            slicer.slice(node, sliced.input_index, sliced.axis, sliced.offset)
            if node.op == "Conv" and sliced.input_index == 1:
                # a depthwise Conv: one group per channel
                node.attrs["group"] = len(record.kept)
        for consumer in group.consumers:
            _rewrite_consumer(graph, nodes[consumer.node], consumer, layouts[consumer], slicer)
        _retarget_reshapes(graph, set(group.tensors), group.channels - len(record.kept))
        _clear_shapes(graph, {*group.tensors, *(c.activation for c in group.consumers)})


def _retarget_reshapes(graph: gs.Graph, tensors: set[str], removed: int) -> None:
    """A classifier head's ``Reshape`` to ``[N, C]`` with ``C`` written out (the dynamo
    exporter's ``[-1, 32]``) must ask for the channels left, or it would fold the batch
    into them. The target is replaced on this node only (it may be shared)."""
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2 or node.inputs[0].name not in tensors:
            continue
        target = _stored(node.inputs[1])
        if target is None:
            continue  # computed from Shape: follows the pruned tensor by itself
        values = np.asarray(target.values).reshape(-1)
        if values.size == 2 and values[1] > 0:
            new = np.array([values[0], values[1] - removed], dtype=values.dtype)
            node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}/shape"), new)


# -- reading and replacing constants ------------------------------------------------------


def _stored(tensor: gs.Tensor) -> gs.Constant | None:
    """The stored constant behind ``tensor``: itself, a ``Constant`` node's value, or
    the end of an ``Identity`` chain; None for anything computed."""
    seen: set[int] = set()
    while id(tensor) not in seen:
        seen.add(id(tensor))
        if isinstance(tensor, gs.Constant):
            return tensor
        if len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            return producer.attrs["value"]
        if producer.op != "Identity" or not producer.inputs:
            return None
        tensor = producer.inputs[0]
    return None


class _Slicer:
    """Replaces constant inputs of nodes with the record's edit of them; one constant
    read by several nodes of the group is sliced once and the new one shared."""

    def __init__(self, graph: gs.Graph, record: PrunedGroup) -> None:
        self.graph, self.record, self.channels = graph, record, record.channels
        self._done: dict[tuple[int, int, int], gs.Constant] = {}

    def slice(self, node: gs.Node, index: int, axis: int, offset: int = 0) -> None:
        source = _stored(node.inputs[index])
        if source is None:  # check() saw it; only a graph changed in between gets here
            raise ValueError(f"input {index} of '{node.name}' is not a stored constant")
        key = (id(source), axis, offset)
        if key in self._done:
            node.inputs[index] = self._done[key]
            return
        sliced = self.record.keep(np.asarray(source.values), axis, offset)
        self._done[key] = self.put(node, index, sliced)

    def put(self, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
        """Give input ``index`` of ``node`` the value ``values`` (in its stored dtype),
        in place when the node is the constant's only reader, else as a new constant."""
        current = node.inputs[index]
        source = _stored(current)
        dtype = source.values.dtype if source is not None else values.dtype
        values = np.ascontiguousarray(values, dtype=dtype)
        if (isinstance(current, gs.Constant) and len(current.outputs) == 1
                and current not in self.graph.outputs):
            current.values = values
            return current
        base = source.name if source is not None and source.name else f"{node.name}/input{index}"
        fresh = gs.Constant(unique_name(self.graph, base), values)
        node.inputs[index] = fresh
        return fresh


def _current_width(nodes: Mapping[str, gs.Node], group: ChannelGroup) -> int:
    """How many channels the group has in the graph now (fewer once it was pruned)."""
    for producer in group.producers:
        node = nodes.get(producer.node)
        if node is None or len(node.inputs) <= producer.input_index:
            continue
        source = _stored(node.inputs[producer.input_index])
        if source is not None and producer.axis < len(source.shape):
            return int(source.shape[producer.axis]) - producer.offset
    return group.channels


def _decline_sliced(
    nodes: Mapping[str, gs.Node], sliced: SlicedConstant, channels: int
) -> str | None:
    node = nodes.get(sliced.node)
    if node is None:
        return f"node '{sliced.node}' is no longer in the graph"
    if len(node.inputs) <= sliced.input_index:
        return f"node '{sliced.node}' has no input {sliced.input_index} any more"
    source = _stored(node.inputs[sliced.input_index])
    if source is None:
        return (f"input {sliced.input_index} of '{sliced.node}' is no longer a stored "
                "constant")
    shape = tuple(source.shape)
    if sliced.axis >= len(shape) or shape[sliced.axis] < sliced.offset + channels or (
        sliced.offset == 0 and shape[sliced.axis] != channels
    ):
        return (f"input {sliced.input_index} of '{sliced.node}' has shape {list(shape)}, "
                f"expected {channels} channels on axis {sliced.axis}; another step changed it")
    return None


# -- producers and consumers --------------------------------------------------------------


def _slice_added_bias(
    slicer: _Slicer, node: gs.Node, recorded: set[tuple[str, int]], channels: int
) -> None:
    """Slice a bias that an earlier step gave this producer (when it was a consumer)."""
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        if (node.name, 2) in recorded:
            return
        source = _stored(node.inputs[2])
        if source is not None and source.shape and source.shape[-1] == channels:
            slicer.slice(node, 2, len(source.shape) - 1)
    elif node.op == "MatMul":
        for reader in list(node.outputs[0].outputs):
            if reader.op == "Add" and reader.name.startswith(node.name + _BIAS_SUFFIX):
                source = _stored(reader.inputs[1])
                if source is not None:
                    slicer.slice(reader, 1, len(source.shape) - 1)


def _rewrite_consumer(
    graph: gs.Graph,
    node: gs.Node,
    consumer: ChannelConsumer,
    layout: tuple[int, int],
    slicer: _Slicer,
) -> None:
    """Print the record's consumer edit: the new weight in place of the stored one, the
    bias change added to the node's bias (Gemm stores ``C`` scaled by ``beta`` and
    multiplies ``B`` by ``alpha``)."""
    offset, _ = layout
    source = _stored(node.inputs[1])
    assert source is not None  # check() made sure
    weight = np.asarray(source.values)
    new, delta = slicer.record.consumer(node.name, weight, consumer.axis, offset)
    slicer.put(node, 1, new)
    if delta is None:
        return
    if node.op == "Gemm":
        delta = delta * float(node.attrs.get("alpha", 1.0))
    _add_bias(graph, node, slicer, delta, weight.dtype)


def _add_bias(
    graph: gs.Graph, node: gs.Node, slicer: _Slicer, delta: np.ndarray, dtype: np.dtype
) -> None:
    """Add ``delta`` (one value per output channel) to the consumer's bias, making one
    if it has none (stored in ``dtype``, the weight's)."""
    if node.op in ("Conv", "Gemm"):
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        present = len(node.inputs) > 2 and node.inputs[2].name
        source = _stored(node.inputs[2]) if present else None
        if present and source is None:
            raise ValueError(f"the bias of '{node.name}' is not a stored constant")
        if source is not None and beta != 0.0:
            slicer.put(node, 2, np.asarray(source.values, dtype=np.float64) + delta / beta)
            return
        bias = gs.Constant(unique_name(graph, f"{node.name}/bias"),
                           np.ascontiguousarray(delta, dtype=dtype))
        if present:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return
    # MatMul: fold into its bias Add when it has one of one value per output
    output = node.outputs[0]
    readers = list(output.outputs)
    if len(readers) == 1 and readers[0].op == "Add" and output not in graph.outputs:
        add = readers[0]
        other = 1 if add.inputs[0] is output else 0
        source = _stored(add.inputs[other])
        if source is not None and source.shape and source.shape[-1] == delta.size and \
                int(np.prod(source.shape)) == delta.size:
            values = np.asarray(source.values, dtype=np.float64) + delta.reshape(source.shape)
            slicer.put(add, other, values)
            return
    inner = gs.Variable(unique_name(graph, f"{output.name}/unbiased"), dtype=output.dtype)
    node.outputs[0] = inner
    bias = gs.Constant(unique_name(graph, f"{node.name}/bias"),
                       np.ascontiguousarray(delta, dtype=dtype))
    add = gs.Node("Add", unique_name(graph, node.name + _BIAS_SUFFIX), inputs=[inner, bias],
                  outputs=[output])
    graph.nodes.append(add)


def _clear_shapes(graph: gs.Graph, names: set[str]) -> None:
    """Forget the shapes of tensors whose channel count changed (and of the other outputs
    of the nodes making them), so export writes no stale value_info."""
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    for name in names:
        tensor = tensors.get(name)
        if not isinstance(tensor, gs.Variable) or name in outputs:
            continue
        tensor.shape = None
        for producer in tensor.inputs:
            for out in producer.outputs:
                if out.name not in outputs:
                    out.shape = None

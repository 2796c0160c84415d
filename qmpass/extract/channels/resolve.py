"""From a graph to its channel groups: walk the nodes with the op rules, then resolve.

The walk (:class:`~.walk.Walk`) records facts by tensor; once every node is seen, the
union-find's sets are the channel spaces, and each space collects its facts: producers,
sliced constants, consumers, the channel counts and axes its tensors need. A space whose
facts disagree (two channel counts, two layouts, a constant that does not broadcast) is
pinned with the reason; a ``Concat`` maps its consumers into each input's space at the
input's offset (its index map) and the output space is absorbed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from math import prod

import onnx

from qmpass.extract.channels.records import ChannelConsumer, ChannelGroup, SlicedConstant
from qmpass.extract.channels.rules import onnx_rule
from qmpass.extract.channels.walk import ConcatFact, Pending, Walk, subgraphs
from qmpass.extract.constants import ConstantScope
from qmpass.extract.shapes import infer_shapes

__all__ = ["channel_groups"]

_MAX_REASONS = 3


def channel_groups(model: onnx.ModelProto) -> tuple[ChannelGroup, ...]:
    """The channel groups of ``model``'s main graph, in graph order, pinned ones included.

    Node names are the identities used in the result, so pass a model whose nodes are
    uniquely named (:func:`qmpass.rewrite.base.name_nodes`). The model is not modified.
    """
    opsets = {o.domain or "": o.version for o in model.opset_import}
    scope = ConstantScope(model.graph, opsets)
    walk = Walk(model.graph, scope, infer_shapes(model), opsets.get("", 0))
    for node in model.graph.node:
        _visit(walk, node)
    for name in walk.outputs:
        walk.pin(name, f"tensor '{name}' is a graph output")
    return _Resolution(walk).groups()


def _visit(w: Walk, node: onnx.NodeProto) -> None:
    for name in sorted(w.captured.get(node.name, ())):
        w.pin(name, f"tensor '{name}' is read inside a subgraph of {node.op_type} "
              f"'{node.name}'")
    acts = [i for i, name in enumerate(node.input) if name and w.const(name) is None]
    if not acts:
        return  # constants only: a weight computation, or a Constant node
    claimed: set[int] = set()
    declined = ""
    if node.domain in ("", "ai.onnx") and not subgraphs(node):
        rule = onnx_rule(node.op_type)
        if rule is not None and rule.couple is not None:
            claimed = rule.couple(w, node)
        elif rule is not None and rule.declined is not None:
            declined = f" ({rule.declined})"
    for index in acts:
        if index not in claimed:
            name = node.input[index]
            w.pin(name, f"tensor '{name}' is read by {node.op_type} '{node.name}'{declined}")
    if not claimed:
        for out in node.output:
            if out:
                w.origin.setdefault(out, f"computed by {node.op_type} '{node.name}'")


@dataclass
class _Space:
    tensors: list[str] = field(default_factory=list)
    producers: list[tuple[SlicedConstant, int, int]] = field(default_factory=list)
    sliced: list[tuple[SlicedConstant, int]] = field(default_factory=list)
    consumers: list[tuple[ChannelConsumer, int]] = field(default_factory=list)
    needs: list[tuple[str, int]] = field(default_factory=list)
    counts: list[tuple[int, str]] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    channels: int = 0
    axis: int = -1
    absorbed: bool = False


class _Resolution:
    """The walk's facts gathered by space, checked, and made into groups."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.rank = walk.rank
        uf = walk.spaces
        self.spaces: dict[str, _Space] = {}
        for tensor in uf.order:
            self.spaces.setdefault(uf.find(tensor), _Space()).tensors.append(tensor)

    def of(self, tensor: str) -> _Space:
        return self.spaces[self.walk.spaces.find(tensor)]

    def groups(self) -> tuple[ChannelGroup, ...]:
        w = self.walk
        for tensor, sliced_c, channels, params in w.producers:
            self.of(tensor).producers.append((sliced_c, channels, params))
        for tensor, sliced_c, params in w.sliced:
            self.of(tensor).sliced.append((sliced_c, params))
        for tensor, record, params in w.consumers:
            self.of(tensor).consumers.append((record, params))
        for tensor, axis in w.needs:
            self.of(tensor).needs.append((tensor, axis))
        for tensor, count, who in w.counts:
            self.of(tensor).counts.append((count, who))
        for pending in w.pending:
            self.of(pending.activation).pending.append(pending)
        for tensor, reason in w.pins:
            if tensor in w.spaces:
                found = self.of(tensor)
                if reason not in found.pins:
                    found.pins.append(reason)

        for s in self.spaces.values():
            self._resolve_channels(s)
            self._resolve_axis(s)
        for concat in w.concats:
            self._resolve_concat(concat)
        for s in self.spaces.values():
            for pending in s.pending:
                self._resolve_constant(s, pending)
            if not s.producers:
                s.pins.append(self._no_producer(s))
            else:  # channels that also come from where no rule follows them (a Resize)
                foreign = [t for t in s.tensors if t in self.walk.origin]
                if foreign:
                    s.pins.append(f"tensor '{foreign[0]}' is "
                                  f"{self.walk.origin[foreign[0]]}, whose channels qmpass "
                                  "does not follow")
        return _groups(self.spaces.values())

    def _resolve_channels(self, s: _Space) -> None:
        if not s.counts:
            return
        s.channels, first = s.counts[0]
        for count, who in s.counts[1:]:
            if count != s.channels:
                s.pins.append(
                    f"channel counts disagree: {first} {s.channels}, {who} {count}"
                )
                break

    def _resolve_axis(self, s: _Space) -> None:
        """Channels are on axis 1 (NCHW) or the last axis; 2-D tensors fit either."""
        layouts = [(t, a) for t, a in s.needs if self.rank(t) != 2]
        s.axis = layouts[0][1] if layouts else -1
        for tensor, axis in layouts:
            if axis != s.axis:
                s.pins.append(
                    f"tensor '{tensor}' has its channels on axis {axis}, "
                    f"'{layouts[0][0]}' on axis {s.axis}"
                )
                break

    def _resolve_concat(self, concat: ConcatFact) -> None:
        """The index map of a channel ``Concat``: input ``k``'s channel ``c`` is channel
        ``offset_k + c`` of the output, so the output's consumers read every input's
        group at that input's offset."""
        out = self.of(concat.output)
        inputs = [self.of(name) for name in concat.inputs]
        where = f"Concat '{concat.node}'"
        problem = None
        rank = self.rank(concat.output)
        if len({id(s) for s in inputs}) < len(inputs) or any(s is out for s in inputs):
            problem = f"one channel space enters {where} twice"
        elif out.tensors != [concat.output] or out.pins or out.sliced or out.pending:
            problem = (
                f"output '{concat.output}' of {where} is used by more than weight consumers"
                + (f" ({out.pins[0]})" if out.pins else "")
            )
        elif any(s.axis != inputs[0].axis for s in inputs):
            problem = f"the inputs of {where} have different channel layouts"
        elif not _channel_concat(concat.axis, inputs[0].axis, rank):
            problem = f"{where} joins axis {concat.axis}, not the channel axis"
        elif any(not s.counts for s in inputs):
            problem = f"an input of {where} has an unknown channel count"
        elif out.counts and out.channels != sum(s.channels for s in inputs):
            problem = (
                f"{where} output has {out.channels} channels, its inputs "
                f"{sum(s.channels for s in inputs)}"
            )
        elif any(a != inputs[0].axis and self.rank(t) != 2 for t, a in out.needs):
            problem = f"the consumers of {where} read another channel axis"
        if problem is not None:
            for s in [*inputs, out]:
                if problem not in s.pins:
                    s.pins.append(problem)
            return
        offset = 0
        for s in inputs:
            for record, params in out.consumers:
                s.consumers.append((replace(record, offset=offset), params))
            offset += s.channels
        out.absorbed = True

    def _resolve_constant(self, s: _Space, pending: Pending) -> None:
        """Slice a per-channel constant operand; a broadcast (size 1) one stays as is."""
        shape = pending.shape
        where = f"constant '{pending.tensor}' of '{pending.node}'"
        if s.axis == -1:
            k_axis = len(shape) - 1
        else:
            rank = self.rank(pending.activation)
            if rank is None:
                s.pins.append(f"{where}: the rank of '{pending.activation}' is unknown")
                return
            if len(shape) > rank:
                s.pins.append(f"{where} adds dimensions to '{pending.activation}'")
                return
            k_axis = 1 - (rank - len(shape))
        if k_axis < 0 or shape[k_axis] == 1:
            return
        if shape[k_axis] != s.channels:
            s.pins.append(f"{where} has shape {list(shape)}, which does not match the "
                          f"{s.channels} channels")
            return
        if pending.storage_problem is not None:
            s.pins.append(f"{where}: {pending.storage_problem}")
            return
        sliced = SlicedConstant(pending.node, pending.input_index, pending.tensor, k_axis)
        s.sliced.append((sliced, prod(shape) // s.channels))

    def _no_producer(self, s: _Space) -> str:
        for tensor in s.tensors:
            if tensor in self.walk.origin:
                return (f"no weight produces its channels ('{tensor}' is "
                        f"{self.walk.origin[tensor]})")
        return "no weight produces its channels"


def _groups(spaces: Iterable[_Space]) -> tuple[ChannelGroup, ...]:
    groups: list[ChannelGroup] = []
    taken: set[str] = set()
    for s in spaces:
        if s.absorbed or not (s.producers or s.consumers):
            continue
        name = s.producers[0][0].node if s.producers else s.tensors[0]
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{name}#{k}"
        taken.add(candidate)
        # a Shape reader says least about why (the Reshape it feeds says more)
        pins = sorted(dict.fromkeys(s.pins), key=lambda r: " read by Shape " in r)
        reason = None
        if pins:
            reason = "; ".join(pins[:_MAX_REASONS])
            if len(pins) > _MAX_REASONS:
                reason += f"; and {len(pins) - _MAX_REASONS} more"
        params = (
            sum(p for _, _, p in s.producers)
            + sum(p for _, p in s.sliced)
            + sum(p for _, p in s.consumers)
        )
        groups.append(
            ChannelGroup(
                name=candidate,
                channels=s.channels,
                channel_axis=s.axis,
                producers=tuple(p for p, _, _ in s.producers),
                sliced=tuple(dict.fromkeys(p for p, _ in s.sliced)),
                consumers=tuple(c for c, _ in s.consumers),
                tensors=tuple(s.tensors),
                reason=reason,
                params_per_channel=params,
            )
        )
    return tuple(groups)


def _channel_concat(axis: int, layout: int, rank: int | None) -> bool:
    if layout == -1:
        return axis == -1 or (rank is not None and axis == rank - 1)
    return axis == 1 or (rank is not None and axis == 1 - rank)

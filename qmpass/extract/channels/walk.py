"""The state of a channel walk over one graph: what the op rules record.

The op rules (:mod:`.rules`) look at one node at a time and record *facts* about the
activation tensors it reads and writes: two tensors carry the same channels (a union in
the union-find), a weight produces or reads a space on an axis, a constant is sliced
with it, a count or layout the space must have, or a *pin* (why the space cannot be
pruned). Which tensors form one space is only known once every node is seen, so the
facts are kept by tensor and resolved into groups afterwards (:mod:`.resolve`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qmpass.extract.channels.records import ChannelConsumer, SlicedConstant
from qmpass.extract.channels.unionfind import UnionFind
from qmpass.extract.constants import ConstantScope
from qmpass.extract.shapes import Shape

__all__ = ["ConcatFact", "Pending", "Walk", "attrs", "captured", "subgraphs"]


@dataclass
class Pending:
    """A constant operand of an elementwise op; whether it is sliced, and on which axis,
    is known only once the space's channel count and layout are."""

    activation: str
    node: str
    input_index: int
    tensor: str
    shape: tuple[int, ...]
    storage_problem: str | None


@dataclass
class ConcatFact:
    """A ``Concat`` whose output space maps input ``k`` to ``[offset_k, offset_k + C_k)``
    (resolved once the input spaces' channel counts are known)."""

    node: str
    output: str
    inputs: tuple[str, ...]
    axis: int


class Walk:
    """The graph's readers, constants and shapes, and the facts recorded on its tensors."""

    def __init__(
        self, graph: onnx.GraphProto, scope: ConstantScope, shapes: dict[str, Shape], opset: int
    ) -> None:
        self.graph, self.scope, self.shapes, self.opset = graph, scope, shapes, opset
        self.initializers = {t.name for t in graph.initializer}
        self.producer_of = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                if name:
                    self.readers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.captured: dict[str, set[str]] = {
            node.name: captured(node) for node in graph.node if subgraphs(node)
        }
        self.captured_any = set().union(*self.captured.values()) if self.captured else set()
        self.spaces = UnionFind()
        # facts, keyed by the tensor they were observed on
        self.producers: list[tuple[str, SlicedConstant, int, int]] = []
        self.sliced: list[tuple[str, SlicedConstant, int]] = []
        self.consumers: list[tuple[str, ChannelConsumer, int]] = []
        self.needs: list[tuple[str, int]] = []
        self.counts: list[tuple[str, int, str]] = []
        self.pending: list[Pending] = []
        self.pins: list[tuple[str, str]] = []
        self.concats: list[ConcatFact] = []
        # walk-time layout: channel axis (1 or -1) and rank of tensors, where known
        self.tag: dict[str, int] = {}
        self.rank_hint: dict[str, int] = {}
        self.collapsed: set[str] = set()  # NCHW tensors whose spatial dims are all 1
        self.origin: dict[str, str] = {i.name: "a graph input" for i in graph.input}

    # -- spaces --------------------------------------------------------------------------
    def touch(self, tensor: str) -> None:
        self.spaces.touch(tensor)

    def join(self, a: str, b: str) -> None:
        """``a`` and ``b`` carry the same channels, index for index."""
        self.spaces.join(a, b)

    # -- helpers -------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        return self.scope.value(name) if name else None

    def rank(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return len(shape) if shape is not None else self.rank_hint.get(tensor)

    def copy_layout(self, src: str, dst: str, rank: int | None = None) -> None:
        if src in self.tag:
            self.tag[dst] = self.tag[src]
        r = rank if rank is not None else self.rank(src)
        if r is not None:
            self.rank_hint[dst] = r

    def pin(self, tensor: str, reason: str) -> None:
        self.pins.append((tensor, reason))

    def storage_problem(self, name: str) -> str | None:
        """None when ``name`` is stored (initializer or ``Constant``, through Identity)."""
        return None if self.stored(name) is not None else self._computed(name)

    def stored(self, name: str) -> str | None:
        """The stored tensor behind ``name`` (following ``Identity``), or None."""
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            if name in self.initializers:
                return name
            node = self.producer_of.get(name)
            if node is None:
                return None
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                return name if any(a.name == "value" for a in node.attribute) else None
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                return None
            name = node.input[0]
        return None

    def _computed(self, name: str) -> str:
        node = self.producer_of.get(name)
        if node is None:
            return f"'{name}' is not a stored constant"
        return f"'{name}' is computed by {node.op_type} '{node.name}', not stored"

    def weight_problem(self, node: onnx.NodeProto, index: int) -> str | None:
        """Why the weight input ``index`` of ``node`` cannot be sliced, if it cannot."""
        name = node.input[index]
        where = f"{node.op_type} '{node.name}'"
        problem = self.storage_problem(name)
        if problem is not None:
            return f"weight of {where}: {problem}"
        others = [n.name for n in self.readers[name] if n.name != node.name]
        if name in self.captured_any:
            others.append("a subgraph")
        if name in self.outputs:
            others.append("the graph outputs")
        if others or sum(1 for i in node.input if i == name) > 1:
            return f"weight '{name}' of {where} is shared with {', '.join(others) or 'itself'}"
        return None

    # -- facts ---------------------------------------------------------------------------
    def producer(
        self, tensor: str, node: onnx.NodeProto, index: int, value: np.ndarray, axis: int,
        layout: int, problem: str | None,
    ) -> None:
        """Input ``index`` of ``node`` (its weight ``value``) produces ``tensor``'s channels
        on ``axis``; ``layout`` is where ``tensor`` has them (1: NCHW, -1: last)."""
        self.touch(tensor)
        stored = self.stored(node.input[index]) or node.input[index]
        sliced = SlicedConstant(node.name, index, stored, axis)
        channels = int(value.shape[axis])
        self.producers.append((tensor, sliced, channels, value.size // max(channels, 1)))
        self.counts.append((tensor, channels, f"{node.op_type} '{node.name}' produces"))
        self.tag[tensor] = layout
        self.needs.append((tensor, layout))
        if problem is not None:
            self.pin(tensor, problem)

    def consumer(
        self, tensor: str, node: onnx.NodeProto, value: np.ndarray, axis: int, layout: int,
        problem: str | None,
    ) -> None:
        """``node``'s weight ``value`` (input 1) reads ``tensor``'s channels on ``axis``."""
        self.touch(tensor)
        width = int(value.shape[axis])
        weight = self.stored(node.input[1]) or node.input[1]
        record = ChannelConsumer(node.name, node.op_type, tensor, 0, width, weight, axis)
        self.consumers.append((tensor, record, value.size // max(width, 1)))
        self.counts.append((tensor, width, f"{node.op_type} '{node.name}' reads"))
        self.needs.append((tensor, layout))
        if problem is not None:
            self.pin(tensor, problem)

    def slice_constant(self, tensor: str, node: onnx.NodeProto, index: int, axis: int) -> None:
        """Input ``index`` of ``node`` holds one value per channel of ``tensor`` on ``axis``."""
        name = node.input[index]
        value = self.const(name)
        problem = self.storage_problem(name)
        if value is None or problem is not None:
            self.pin(tensor, f"input {index} of {node.op_type} '{node.name}': "
                     f"{problem or f'{name!r} is not constant'}")
            return
        sliced = SlicedConstant(node.name, index, self.stored(name) or name, axis)
        self.sliced.append((tensor, sliced, value.size // max(int(value.shape[axis]), 1)))
        self.counts.append(
            (tensor, int(value.shape[axis]), f"input {index} of {node.op_type} '{node.name}' has")
        )

    def maybe_sliced(self, activation: str, node: onnx.NodeProto, index: int,
                     value: np.ndarray) -> None:
        """A constant operand of an elementwise op on ``activation``: sliced if it has one
        value per channel, decided once the space's layout is known."""
        name = node.input[index]
        self.pending.append(
            Pending(activation, node.name, index, self.stored(name) or name,
                    tuple(int(d) for d in value.shape), self.storage_problem(name))
        )


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def captured(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` read from enclosing scopes."""
    names: set[str] = set()

    def walk(graph: onnx.GraphProto, outer_defined: set[str]) -> None:
        defined = set(outer_defined)
        defined.update(i.name for i in graph.input)
        defined.update(t.name for t in graph.initializer)
        for inner in graph.node:
            for name in inner.input:
                if name and name not in defined:
                    names.add(name)
            for sub in subgraphs(inner):
                walk(sub, defined)
            defined.update(o for o in inner.output if o)

    for sub in subgraphs(node):
        walk(sub, set())
    return names

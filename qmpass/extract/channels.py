"""Coupled channel groups: the channel spaces that structured pruning can shrink (read-only).

Removing output channel ``c`` of a convolution is only an exact graph edit if every tensor
that carries channel ``c`` loses it too: the Relu after it, the other side of a residual
``Add``, the slice of a ``Concat`` it feeds, and the input channel ``c`` of every layer
that reads it. As in Torch-Pruning's dependency graph, such channels form one *group*
that is pruned atomically. Here the groups come from a union-find over the activation
tensors of the main graph:

* a *producer* (``Conv`` with ``group=1``, ``MatMul``/``Gemm`` with a constant right
  operand) starts a channel space at its output; its weight is sliced on its output axis;
* a *pass-through* op keeps the channel indexing, so its output joins its input's space:
  unary activations, ``BatchNormalization`` and depthwise ``Conv`` (their constants are
  sliced), pooling, elementwise ops with a constant (scalar, or one value per channel to
  slice), and elementwise ops of two activations, which *unite* two spaces (a residual
  ``Add`` makes both branches one group);
* a *consumer* (``Conv`` with ``group=1``, ``MatMul``/``Gemm`` with a constant right
  operand) reads the space; its weight is sliced on its input axis. A global pooling
  followed by ``Flatten`` (or ``Reshape`` to ``[N, C]``) moves the channels of an NCHW
  tensor to the last axis, so a classifier head is a consumer too;
* a ``Concat`` on the channel axis gives its output a space of its own in which input
  ``k`` occupies ``[offset_k, offset_k + C_k)``; the consumers of the output are
  consumers of every input's group at that offset.

Any other reader of a tensor of a space (``Reshape``, ``LayerNormalization``, a graph
output, a subgraph that captures it...), a space that no weight produces (the graph
input, the output of a ``LayerNormalization``), and weights that are shared or computed
*pin* the group: it is reported with the reason and is not pruned.

Weights may be initializers or ``Constant`` nodes, also behind ``Identity`` nodes (the
PyTorch exporter deduplicates equal tensors that way); anything computed pins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from math import prod
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qmpass.extract.constants import ConstantScope
from qmpass.extract.shapes import Shape, infer_shapes

__all__ = ["ChannelConsumer", "ChannelGroup", "SlicedConstant", "channel_groups"]

#: unary ops that act on every element alone: channel ``c`` in gives channel ``c`` out
_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Erf", "Gelu", "Mish",
        "ThresholdedRelu", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log",
        "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    }
)
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
#: pools over the spatial axes of an NCHW tensor
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_MAX_REASONS = 3


@dataclass(frozen=True)
class SlicedConstant:
    """A constant input of a node that loses the pruned channels.

    ``node`` reads it as input ``input_index``; ``tensor`` is where it is stored (the
    initializer, or the ``Constant`` node's output, behind any ``Identity`` chain);
    channel ``c`` of the group is index ``offset + c`` of ``axis``.
    """

    node: str
    input_index: int
    tensor: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class ChannelConsumer:
    """A node whose weight reads the group's channels on its input side.

    ``activation`` is the tensor it reads (for calibration statistics); its channels
    ``[offset, offset + channels)`` are the group's (a ``Concat`` output is wider than
    one group: ``width`` is the consumer's whole input width). ``weight`` is the
    initializer (or stored constant) and ``axis`` the weight axis of input channels.
    """

    node: str
    op_type: str
    activation: str
    offset: int
    width: int
    weight: str
    axis: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together; ``reason`` is None when the group is prunable.

    ``params_per_channel`` is the number of stored values removed with one channel:
    a producer's output slice, one value per sliced constant (biases, BatchNorm, depthwise
    taps, bias-``Add`` vectors) and a consumer's input slice.
    """

    name: str
    channels: int
    channel_axis: int
    producers: tuple[SlicedConstant, ...]
    sliced: tuple[SlicedConstant, ...]
    consumers: tuple[ChannelConsumer, ...]
    tensors: tuple[str, ...]
    reason: str | None = None
    params_per_channel: int = 0

    @property
    def operators(self) -> tuple[str, ...]:
        """Producer node names, then consumer node names, without repeats."""
        names = [p.node for p in self.producers] + [c.node for c in self.consumers]
        return tuple(dict.fromkeys(names))

    @property
    def prunable(self) -> bool:
        return self.reason is None


def channel_groups(model: onnx.ModelProto) -> tuple[ChannelGroup, ...]:
    """The channel groups of ``model``'s main graph, in graph order, pinned ones included.

    Node names are the identities used in the result, so pass a model whose nodes are
    uniquely named (:func:`qmpass.rewrite.base.name_nodes`). The model is not modified.
    """
    opsets = {o.domain or "": o.version for o in model.opset_import}
    scope = ConstantScope(model.graph, opsets)
    return _Analysis(model.graph, scope, infer_shapes(model), opsets.get("", 0)).run()


# -- the analysis ------------------------------------------------------------------------


@dataclass
class _Pending:
    """A constant operand of an elementwise op; whether it is sliced, and on which axis,
    is known only once the space's channel count and layout are."""

    activation: str
    node: str
    input_index: int
    tensor: str
    shape: tuple[int, ...]
    storage_problem: str | None


@dataclass
class _Concat:
    node: str
    output: str
    inputs: tuple[str, ...]
    axis: int


@dataclass
class _Space:
    tensors: list[str] = field(default_factory=list)
    producers: list[tuple[SlicedConstant, int, int]] = field(default_factory=list)
    sliced: list[tuple[SlicedConstant, int]] = field(default_factory=list)
    consumers: list[tuple[ChannelConsumer, int]] = field(default_factory=list)
    needs: list[tuple[str, int]] = field(default_factory=list)
    counts: list[tuple[int, str]] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    channels: int = 0
    axis: int = -1
    absorbed: bool = False


class _Analysis:
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
            node.name: _captured(node) for node in graph.node if _subgraphs(node)
        }
        self.captured_any = set().union(*self.captured.values()) if self.captured else set()
        # union-find over activation tensors, in the order they are first seen
        self.parent: dict[str, str] = {}
        self.order: list[str] = []
        self.position: dict[str, int] = {}
        # facts, keyed by the tensor they were observed on
        self.producers: list[tuple[str, SlicedConstant, int, int]] = []
        self.sliced: list[tuple[str, SlicedConstant, int]] = []
        self.consumers: list[tuple[str, ChannelConsumer, int]] = []
        self.needs: list[tuple[str, int]] = []
        self.counts: list[tuple[str, int, str]] = []
        self.pending: list[_Pending] = []
        self.pins: list[tuple[str, str]] = []
        self.concats: list[_Concat] = []
        # walk-time layout: channel axis (1 or -1) and rank of tensors, where known
        self.tag: dict[str, int] = {}
        self.rank_hint: dict[str, int] = {}
        self.collapsed: set[str] = set()  # NCHW tensors whose spatial dims are all 1
        self.origin: dict[str, str] = {i.name: "a graph input" for i in graph.input}

    # -- union-find ----------------------------------------------------------------------
    def touch(self, tensor: str) -> None:
        if tensor not in self.parent:
            self.parent[tensor] = tensor
            self.position[tensor] = len(self.order)
            self.order.append(tensor)

    def find(self, tensor: str) -> str:
        root = tensor
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[tensor] != root:
            self.parent[tensor], tensor = root, self.parent[tensor]
        return root

    def join(self, a: str, b: str) -> None:
        self.touch(a)
        self.touch(b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the earlier-seen root stays the root, so names follow graph order
            first, second = sorted((ra, rb), key=self.position.__getitem__)
            self.parent[second] = first

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

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> tuple[ChannelGroup, ...]:
        for node in self.graph.node:
            self.visit(node)
        for name in self.outputs:
            self.pin(name, f"tensor '{name}' is a graph output")
        return self.finish()

    def visit(self, node: onnx.NodeProto) -> None:
        for name in sorted(self.captured.get(node.name, ())):
            self.pin(name, f"tensor '{name}' is read inside a subgraph of {node.op_type} "
                     f"'{node.name}'")
        acts = [i for i, name in enumerate(node.input) if name and self.const(name) is None]
        if not acts:
            return  # constants only: a weight computation, or a Constant node
        claimed: set[int] = set()
        if node.domain in ("", "ai.onnx") and not _subgraphs(node):
            handler = self._handler(node.op_type)
            if handler is not None:
                claimed = handler(node)
        for index in acts:
            if index not in claimed:
                name = node.input[index]
                self.pin(name, f"tensor '{name}' is read by {node.op_type} '{node.name}'")
        if not claimed:
            for out in node.output:
                if out:
                    self.origin.setdefault(out, f"computed by {node.op_type} '{node.name}'")

    def _handler(self, op_type: str) -> Callable[[onnx.NodeProto], set[int]] | None:
        """The method that understands ``op_type``; it returns the input indices it
        accounted for (every other activation input pins its space)."""
        if op_type in _UNARY:
            return self._unary
        if op_type in _BINARY:
            return self._binary
        if op_type in _POOLS or op_type in _GLOBAL_POOLS:
            return self._pool
        return {
            "Conv": self._conv,
            "MatMul": self._matmul,
            "Gemm": self._gemm,
            "BatchNormalization": self._batchnormalization,
            "ReduceMean": self._reducemean,
            "Flatten": self._flatten,
            "Reshape": self._reshape,
            "Squeeze": self._squeeze,
            "Concat": self._concat,
        }.get(op_type)

    def _conv(self, node: onnx.NodeProto) -> set[int]:
        x, w, y = node.input[0], node.input[1], node.output[0]
        value = self.const(w)
        if value is None or value.ndim < 3 or self.const(x) is not None:
            return set()
        attrs = _attrs(node)
        groups = int(attrs.get("group", 1))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        where = f"Conv '{node.name}'"
        if groups == 1:
            problem = self.weight_problem(node, 1)
            self.consumer(x, node, value, 1, 1, problem)
            self.rank_hint.setdefault(x, value.ndim)
            self.producer(y, node, 1, value, 0, 1, problem)
            self.rank_hint[y] = value.ndim
            if bias is not None:
                self.slice_constant(y, node, 2, 0)
            return {0}
        if value.shape[0] == groups and value.shape[1] == 1:
            # depthwise: output channel c is input channel c filtered alone
            self.join(x, y)
            self.copy_layout(x, y, value.ndim)
            self.needs.append((x, 1))
            self.counts.append((x, groups, f"depthwise {where} (group={groups}) reads"))
            self.slice_constant(x, node, 1, 0)
            if bias is not None:
                self.slice_constant(x, node, 2, 0)
            return {0}
        self.touch(x)
        self.touch(y)
        self.pin(x, f"tensor '{x}' is read by grouped {where} (group={groups})")
        self.pin(y, f"tensor '{y}' is produced by grouped {where} (group={groups})")
        return {0}

    def _matmul(self, node: onnx.NodeProto) -> set[int]:
        a, b, y = node.input[0], node.input[1], node.output[0]
        value = self.const(b)
        if value is None or value.ndim != 2 or self.const(a) is not None:
            return set()
        problem = self.weight_problem(node, 1)
        self.consumer(a, node, value, 0, -1, problem)
        self.producer(y, node, 1, value, 1, -1, problem)
        rank = self.rank(a)
        if rank is not None:
            self.rank_hint[y] = rank
        return {0}

    def _gemm(self, node: onnx.NodeProto) -> set[int]:
        a, b, y = node.input[0], node.input[1], node.output[0]
        attrs = _attrs(node)
        value = self.const(b)
        if int(attrs.get("transA", 0)) or value is None or value.ndim != 2:
            return set()
        if self.const(a) is not None:
            return set()
        trans_b = bool(attrs.get("transB", 0))
        problem = self.weight_problem(node, 1)
        self.consumer(a, node, value, 1 if trans_b else 0, -1, problem)
        self.producer(y, node, 1, value, 0 if trans_b else 1, -1, problem)
        self.rank_hint[a] = self.rank_hint[y] = 2
        if len(node.input) > 2 and node.input[2]:
            d_out = int(value.shape[0 if trans_b else 1])
            c = self.const(node.input[2])
            if c is None:
                self.pin(y, f"bias C of Gemm '{node.name}' is computed, not stored")
            elif c.size == d_out and c.ndim >= 1 and c.shape[-1] == d_out and d_out > 1:
                self.slice_constant(y, node, 2, c.ndim - 1)
            elif c.size != 1:
                self.pin(y, f"bias C of Gemm '{node.name}' has shape {list(c.shape)}, "
                         "not one value per output")
        return {0}

    def _unary(self, node: onnx.NodeProto) -> set[int]:
        x, y = node.input[0], node.output[0]
        self.join(x, y)
        self.copy_layout(x, y)
        return {0}

    def _batchnormalization(self, node: onnx.NodeProto) -> set[int]:
        if int(_attrs(node).get("training_mode", 0)) or len([o for o in node.output if o]) > 1:
            return set()
        x, y = node.input[0], node.output[0]
        self.join(x, y)
        self.copy_layout(x, y)
        self.needs.append((x, 1))
        for index in range(1, 5):
            self.slice_constant(x, node, index, 0)
        return {0}

    def _binary(self, node: onnx.NodeProto) -> set[int]:
        if len(node.input) != 2:
            return set()
        y = node.output[0]
        values = [self.const(name) for name in node.input]
        if values[0] is None and values[1] is None:
            a, b = node.input
            self.join(a, y)
            self.join(b, y)
            self.copy_layout(a if a in self.tag else b, y)
            return {0, 1}
        act = 0 if values[0] is None else 1
        k_index = 1 - act
        k = values[k_index]
        assert k is not None
        x = node.input[act]
        self.join(x, y)
        rank = self.rank(x)
        self.copy_layout(x, y, None if rank is None else max(rank, k.ndim))
        if k.size > 1:
            name = node.input[k_index]
            self.pending.append(
                _Pending(x, node.name, k_index, self.stored(name) or name,
                         tuple(int(d) for d in k.shape), self.storage_problem(name))
            )
        return {act}

    def _pool(self, node: onnx.NodeProto) -> set[int]:
        x, y = node.input[0], node.output[0]
        self.join(x, y)
        self.copy_layout(x, y)
        self.needs.append((x, 1))
        if node.op_type in _GLOBAL_POOLS:
            self.collapsed.add(y)
        return {0}

    def _reducemean(self, node: onnx.NodeProto) -> set[int]:
        x, y = node.input[0], node.output[0]
        attrs = _attrs(node)
        if self.opset >= 18:
            axes_value = self.const(node.input[1]) if len(node.input) > 1 else None
            axes = None if axes_value is None else [int(a) for a in axes_value.reshape(-1)]
        else:
            axes = [int(a) for a in attrs["axes"]] if "axes" in attrs else None
        rank, tag = self.rank(x), self.tag.get(x)
        if not axes or rank is None or tag is None:
            return set()
        axes = sorted({a % rank for a in axes})
        channel = 1 if tag == 1 else rank - 1
        keepdims = bool(attrs.get("keepdims", 1))
        if channel in axes or (tag == 1 and 0 in axes and not keepdims):
            return set()
        self.join(x, y)
        self.copy_layout(x, y, rank if keepdims else rank - len(axes))
        self.needs.append((x, tag))
        if tag == 1 and keepdims and set(range(2, rank)) <= set(axes):
            self.collapsed.add(y)
        return {0}

    def _flatten(self, node: onnx.NodeProto) -> set[int]:
        x, y = node.input[0], node.output[0]
        if x not in self.collapsed or int(_attrs(node).get("axis", 1)) != 1:
            return set()
        self.join(x, y)
        self.copy_layout(x, y, 2)
        return {0}

    def _reshape(self, node: onnx.NodeProto) -> set[int]:
        """Only ``[N, C, 1, 1] -> [N, C]`` after a global pooling is a pass-through: a
        constant target ``[0, -1]``, ``[0, C]``, ``[-1, C]``, or (``x.view(x.size(0), -1)``
        from PyTorch) a computed one whose inferred output is ``[N, C]``."""
        x, y = node.input[0], node.output[0]
        if x not in self.collapsed or len(node.input) < 2:
            return set()
        target = self.const(node.input[1])
        if target is None:
            inferred = self.shapes.get(y)
            if inferred is None or len(inferred) != 2 or inferred[1] is None:
                return set()
            first, second = 0, int(inferred[1])
        elif target.size == 2:
            first, second = (int(v) for v in target.reshape(-1))
        else:
            return set()
        if first == 0 and second == -1:
            pass
        elif first in (0, -1) and second > 0:
            self.counts.append((x, second, f"Reshape '{node.name}' to [N, {second}] needs"))
        else:
            return set()
        self.join(x, y)
        self.copy_layout(x, y, 2)
        return {0}

    def _squeeze(self, node: onnx.NodeProto) -> set[int]:
        """``[N, C, 1, 1] -> [N, C]`` after a global pooling (squeezing the spatial axes)."""
        x, y = node.input[0], node.output[0]
        rank = self.rank(x)
        if x not in self.collapsed or rank is None:
            return set()
        if self.opset >= 13:
            value = self.const(node.input[1]) if len(node.input) > 1 else None
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        else:
            axes = [int(a) for a in _attrs(node).get("axes", ())] or None
        if axes is None or {a % rank for a in axes} != set(range(2, rank)):
            return set()
        self.join(x, y)
        self.copy_layout(x, y, 2)
        return {0}

    def _concat(self, node: onnx.NodeProto) -> set[int]:
        inputs = tuple(node.input)
        if any(not name or self.const(name) is not None for name in inputs):
            return set()
        y = node.output[0]
        for name in inputs:
            self.touch(name)
        self.touch(y)
        self.copy_layout(inputs[0], y)
        self.concats.append(_Concat(node.name, y, inputs, int(_attrs(node).get("axis", 0))))
        return set(range(len(inputs)))

    # -- from facts to groups ------------------------------------------------------------
    def finish(self) -> tuple[ChannelGroup, ...]:
        spaces: dict[str, _Space] = {}
        for tensor in self.order:
            spaces.setdefault(self.find(tensor), _Space()).tensors.append(tensor)

        def space(tensor: str) -> _Space | None:
            return spaces[self.find(tensor)] if tensor in self.parent else None

        for tensor, sliced_c, channels, params in self.producers:
            spaces[self.find(tensor)].producers.append((sliced_c, channels, params))
        for tensor, sliced_c, params in self.sliced:
            spaces[self.find(tensor)].sliced.append((sliced_c, params))
        for tensor, record, params in self.consumers:
            spaces[self.find(tensor)].consumers.append((record, params))
        for tensor, axis in self.needs:
            spaces[self.find(tensor)].needs.append((tensor, axis))
        for tensor, count, who in self.counts:
            spaces[self.find(tensor)].counts.append((count, who))
        for pending in self.pending:
            spaces[self.find(pending.activation)].pending.append(pending)
        for tensor, reason in self.pins:
            found = space(tensor)
            if found is not None and reason not in found.pins:
                found.pins.append(reason)

        for s in spaces.values():
            self._resolve_channels(s)
            self._resolve_axis(s)
        for concat in self.concats:
            self._resolve_concat(concat, spaces)
        for s in spaces.values():
            for pending in s.pending:
                self._resolve_constant(s, pending)
            if not s.producers:
                s.pins.append(self._no_producer(s))
        return self._groups(spaces.values())

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

    def _resolve_concat(self, concat: _Concat, spaces: dict[str, _Space]) -> None:
        out = spaces[self.find(concat.output)]
        inputs = [spaces[self.find(name)] for name in concat.inputs]
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

    def _resolve_constant(self, s: _Space, pending: _Pending) -> None:
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
            if tensor in self.origin:
                return f"no weight produces its channels ('{tensor}' is {self.origin[tensor]})"
        return "no weight produces its channels"

    def _groups(self, spaces: Iterable[_Space]) -> tuple[ChannelGroup, ...]:
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


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def _captured(node: onnx.NodeProto) -> set[str]:
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
            for sub in _subgraphs(inner):
                walk(sub, defined)
            defined.update(o for o in inner.output if o)

    for sub in _subgraphs(node):
        walk(sub, set())
    return names

"""The op rules of channel coupling: one registered rule per op family.

As Torch-Pruning registers one pruner per layer type, each :class:`ChannelRule` here
says how one family of ops couples the channels of its inputs and outputs (its *index
map*: where channel ``c`` of an input is in the output). It is the single source of
which ops are channel-wise for both sides of the project:

* the ONNX analysis (:mod:`.resolve`) looks a node's ``op_type`` up and runs the rule's
  ``couple``, which records facts on the walk (:mod:`.walk`) and returns the inputs it
  accounted for; every other activation input pins its space;
* the Relax pruning (:mod:`qmpass.tvm.prune`) looks a call's op name up and acts on the
  rule's ``kind``; what it cannot do there is an explicit decline in that module.

================  =====================================  =================================
kind              ONNX ops                               index map
================  =====================================  =================================
``elementwise``   ``Relu``, ``Sqrt``, ``Exp``, ...       ``c -> c``
``binary``        ``Add``, ``Sub``, ``Mul``, ``Div``,    ``c -> c`` from both operands (a
                  ``Pow``, ``Max``, ``Min``              residual ``Add`` unites two
                                                         spaces); a constant operand is
                                                         broadcast or sliced per channel
``batchnorm``     ``BatchNormalization``                 ``c -> c``; its vectors sliced
``pool``          ``MaxPool``, ``AveragePool``,          ``c -> c`` (NCHW)
                  ``LpPool``
``reduce``        ``GlobalAveragePool``, ...,            ``c -> c`` over the other axes
                  ``ReduceMean``, ``ReduceMax``
``flatten``       ``Flatten``, ``Reshape``, ``Squeeze``  ``[N, C, 1, 1] -> [N, C]``:
                                                         ``c -> c`` after a global pooling
``concat``        ``Concat``                             input ``k``: ``c -> offset_k + c``
``split``         ``Split``, ``Slice``                   piece ``k``: ``c -> c - offset_k``
                                                         (declined: the rewrite does not
                                                         edit split sizes or slice starts)
``conv``          ``Conv``                               producer (out) and consumer (in);
                                                         depthwise ``c -> c``
``matmul``        ``MatMul``, ``Gemm``                   producer (out) and consumer (in)
================  =====================================  =================================

Each rule also names the Relax ops of its kind (``relax.nn.relu``, ``relax.divide``...):
those the ONNX importer emits for its ONNX ops, and Relax ops with no ONNX op of their
own that act alike (``relax.nn.silu``). Some ONNX ops are imported as several Relax ops
(``Elu`` is ``relu``, ``exp``, ``subtract`` and ``multiply`` with scalars), some not as
ops at all (``Clip`` is a ``call_tir``, ``Dropout`` a tuple): the Relax side sees what the
importer wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import onnx

from qmpass.extract.channels.walk import ConcatFact, Walk, attrs

__all__ = [
    "CHANNEL_WISE",
    "RULES",
    "ChannelRule",
    "Kind",
    "onnx_rule",
    "relax_rule",
]

Kind = Literal[
    "elementwise", "binary", "batchnorm", "pool", "reduce", "flatten", "concat", "split",
    "conv", "matmul",
]
#: what a rule does on the ONNX side: the input indices it accounted for
Couple = Callable[[Walk, onnx.NodeProto], set[int]]


@dataclass(frozen=True)
class ChannelRule:
    """How one op family couples channels. ``couple`` is None where the ONNX analysis
    declines every such node (``declined`` says why): it pins what the node reads."""

    kind: Kind
    onnx: frozenset[str]
    relax: frozenset[str]
    index_map: str
    couple: Couple | None = None
    declined: str | None = None


# -- the ONNX side of each rule -------------------------------------------------------------
def _elementwise(w: Walk, node: onnx.NodeProto) -> set[int]:
    x, y = node.input[0], node.output[0]
    w.join(x, y)
    w.copy_layout(x, y)
    return {0}


def _binary(w: Walk, node: onnx.NodeProto) -> set[int]:
    if len(node.input) != 2:
        return set()
    y = node.output[0]
    values = [w.const(name) for name in node.input]
    if values[0] is None and values[1] is None:
        a, b = node.input
        w.join(a, y)
        w.join(b, y)
        w.copy_layout(a if a in w.tag else b, y)
        return {0, 1}
    act = 0 if values[0] is None else 1
    k = values[1 - act]
    assert k is not None  # one operand is constant, the other is not
    x = node.input[act]
    w.join(x, y)
    rank = w.rank(x)
    w.copy_layout(x, y, None if rank is None else max(rank, k.ndim))
    if k.size > 1:
        w.maybe_sliced(x, node, 1 - act, k)
    return {act}


def _batchnormalization(w: Walk, node: onnx.NodeProto) -> set[int]:
    if int(attrs(node).get("training_mode", 0)) or len([o for o in node.output if o]) > 1:
        return set()
    x, y = node.input[0], node.output[0]
    w.join(x, y)
    w.copy_layout(x, y)
    w.needs.append((x, 1))
    for index in range(1, 5):
        w.slice_constant(x, node, index, 0)
    return {0}


def _pool(w: Walk, node: onnx.NodeProto) -> set[int]:
    x, y = node.input[0], node.output[0]
    w.join(x, y)
    w.copy_layout(x, y)
    w.needs.append((x, 1))
    return {0}


def _reduce(w: Walk, node: onnx.NodeProto) -> set[int]:
    """A global pooling, or a reduction over axes that are not the channel axis."""
    x, y = node.input[0], node.output[0]
    if node.op_type.startswith("Global"):
        claimed = _pool(w, node)
        w.collapsed.add(y)
        return claimed
    a = attrs(node)
    if w.opset >= 18:
        axes_value = w.const(node.input[1]) if len(node.input) > 1 else None
        axes = None if axes_value is None else [int(v) for v in axes_value.reshape(-1)]
    else:
        axes = [int(v) for v in a["axes"]] if "axes" in a else None
    rank, tag = w.rank(x), w.tag.get(x)
    if not axes or rank is None or tag is None:
        return set()
    axes = sorted({v % rank for v in axes})
    channel = 1 if tag == 1 else rank - 1
    keepdims = bool(a.get("keepdims", 1))
    if channel in axes or (tag == 1 and 0 in axes and not keepdims):
        return set()
    w.join(x, y)
    w.copy_layout(x, y, rank if keepdims else rank - len(axes))
    w.needs.append((x, tag))
    if tag == 1 and keepdims and set(range(2, rank)) <= set(axes):
        w.collapsed.add(y)
    return {0}


def _flatten(w: Walk, node: onnx.NodeProto) -> set[int]:
    """``[N, C, 1, 1] -> [N, C]`` after a global pooling: ``Flatten(axis=1)``, a
    ``Squeeze`` of the spatial axes, or a ``Reshape`` (:func:`_reshape`)."""
    if node.op_type == "Reshape":
        return _reshape(w, node)
    if node.op_type == "Squeeze":
        return _squeeze(w, node)
    x, y = node.input[0], node.output[0]
    if x not in w.collapsed or int(attrs(node).get("axis", 1)) != 1:
        return set()
    w.join(x, y)
    w.copy_layout(x, y, 2)
    return {0}


def _reshape(w: Walk, node: onnx.NodeProto) -> set[int]:
    """Only ``[N, C, 1, 1] -> [N, C]`` after a global pooling is a pass-through: a
    constant target ``[0, -1]``, ``[0, C]``, ``[-1, C]``, or (``x.view(x.size(0), -1)``
    from PyTorch) a computed one whose inferred output is ``[N, C]``."""
    x, y = node.input[0], node.output[0]
    if x not in w.collapsed or len(node.input) < 2:
        return set()
    target = w.const(node.input[1])
    if target is None:
        inferred = w.shapes.get(y)
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
        w.counts.append((x, second, f"Reshape '{node.name}' to [N, {second}] needs"))
    else:
        return set()
    w.join(x, y)
    w.copy_layout(x, y, 2)
    return {0}


def _squeeze(w: Walk, node: onnx.NodeProto) -> set[int]:
    x, y = node.input[0], node.output[0]
    rank = w.rank(x)
    if x not in w.collapsed or rank is None:
        return set()
    if w.opset >= 13:
        value = w.const(node.input[1]) if len(node.input) > 1 else None
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    else:
        axes = [int(a) for a in attrs(node).get("axes", ())] or None
    if axes is None or {a % rank for a in axes} != set(range(2, rank)):
        return set()
    w.join(x, y)
    w.copy_layout(x, y, 2)
    return {0}


def _concat(w: Walk, node: onnx.NodeProto) -> set[int]:
    inputs = tuple(node.input)
    if any(not name or w.const(name) is not None for name in inputs):
        return set()
    y = node.output[0]
    for name in inputs:
        w.touch(name)
    w.touch(y)
    w.copy_layout(inputs[0], y)
    w.concats.append(ConcatFact(node.name, y, inputs, int(attrs(node).get("axis", 0))))
    return set(range(len(inputs)))


def _conv(w: Walk, node: onnx.NodeProto) -> set[int]:
    x, weight, y = node.input[0], node.input[1], node.output[0]
    value = w.const(weight)
    if value is None or value.ndim < 3 or w.const(x) is not None:
        return set()
    groups = int(attrs(node).get("group", 1))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    where = f"Conv '{node.name}'"
    if groups == 1:
        problem = w.weight_problem(node, 1)
        w.consumer(x, node, value, 1, 1, problem)
        w.rank_hint.setdefault(x, value.ndim)
        w.producer(y, node, 1, value, 0, 1, problem)
        w.rank_hint[y] = value.ndim
        if bias is not None:
            w.slice_constant(y, node, 2, 0)
        return {0}
    if value.shape[0] == groups and value.shape[1] == 1:
        # depthwise: output channel c is input channel c filtered alone
        w.join(x, y)
        w.copy_layout(x, y, value.ndim)
        w.needs.append((x, 1))
        w.counts.append((x, groups, f"depthwise {where} (group={groups}) reads"))
        w.slice_constant(x, node, 1, 0)
        if bias is not None:
            w.slice_constant(x, node, 2, 0)
        return {0}
    w.touch(x)
    w.touch(y)
    w.pin(x, f"tensor '{x}' is read by grouped {where} (group={groups})")
    w.pin(y, f"tensor '{y}' is produced by grouped {where} (group={groups})")
    return {0}


def _matmul(w: Walk, node: onnx.NodeProto) -> set[int]:
    """``MatMul``, or ``Gemm`` (``transB`` picks the weight's axes; a bias ``C`` with one
    value per output is sliced)."""
    a, b, y = node.input[0], node.input[1], node.output[0]
    value = w.const(b)
    gemm = node.op_type == "Gemm"
    trans_b = gemm and bool(attrs(node).get("transB", 0))
    if gemm and int(attrs(node).get("transA", 0)):
        return set()
    if value is None or value.ndim != 2 or w.const(a) is not None:
        return set()
    problem = w.weight_problem(node, 1)
    w.consumer(a, node, value, 1 if trans_b else 0, -1, problem)
    w.producer(y, node, 1, value, 0 if trans_b else 1, -1, problem)
    if not gemm:
        rank = w.rank(a)
        if rank is not None:
            w.rank_hint[y] = rank
        return {0}
    w.rank_hint[a] = w.rank_hint[y] = 2
    if len(node.input) > 2 and node.input[2]:
        d_out = int(value.shape[0 if trans_b else 1])
        c = w.const(node.input[2])
        if c is None:
            w.pin(y, f"bias C of Gemm '{node.name}' is computed, not stored")
        elif c.size == d_out and c.ndim >= 1 and c.shape[-1] == d_out and d_out > 1:
            w.slice_constant(y, node, 2, c.ndim - 1)
        elif c.size != 1:
            w.pin(y, f"bias C of Gemm '{node.name}' has shape {list(c.shape)}, "
                     "not one value per output")
    return {0}


# -- the registry ---------------------------------------------------------------------------
def _rule(kind: Kind, onnx_ops: Iterable[str], relax_ops: Iterable[str], index_map: str,
          couple: Couple | None = None, declined: str | None = None) -> ChannelRule:
    return ChannelRule(kind, frozenset(onnx_ops), frozenset(relax_ops), index_map, couple,
                       declined)


RULES: tuple[ChannelRule, ...] = (
    _rule(
        "elementwise",
        ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
         "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Erf", "Gelu", "Mish",
         "ThresholdedRelu", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log",
         "Reciprocal", "Floor", "Ceil", "Round", "Sign"],
        ["relax.nn.relu", "relax.nn.leakyrelu", "relax.sigmoid", "relax.tanh", "relax.clip",
         "relax.nn.selu", "relax.nn.softplus", "relax.erf", "relax.nn.gelu",
         "relax.nn.gelu_tanh", "relax.nn.silu", "relax.negative", "relax.abs", "relax.sqrt",
         "relax.rsqrt", "relax.square", "relax.exp", "relax.log", "relax.floor",
         "relax.ceil", "relax.round", "relax.sign"],
        "c -> c",
        _elementwise,
    ),
    _rule(
        "binary",
        ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"],
        ["relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
         "relax.minimum", "relax.power"],
        "c -> c from both operands; a constant operand is broadcast or sliced per channel",
        _binary,
    ),
    _rule("batchnorm", ["BatchNormalization"], ["relax.nn.batch_norm"],
          "c -> c; scale, bias, mean and variance sliced", _batchnormalization),
    _rule("pool", ["MaxPool", "AveragePool", "LpPool"],
          ["relax.nn.max_pool2d", "relax.nn.avg_pool2d"], "c -> c (NCHW)", _pool),
    _rule("reduce",
          ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceMax"],
          ["relax.mean", "relax.max"], "c -> c, reduced over axes other than the channels'",
          _reduce),
    _rule("flatten", ["Flatten", "Reshape", "Squeeze"], ["relax.reshape", "relax.squeeze"],
          "[N, C, 1, 1] -> [N, C] after a global pooling: c -> c", _flatten),
    _rule("concat", ["Concat"], ["relax.concat"], "input k: c -> offset_k + c", _concat),
    _rule("split", ["Split", "Slice"], ["relax.split", "relax.strided_slice"],
          "piece k: c -> c - offset_k",
          declined="channels are not followed through it: on the channel axis, pruning "
                   "would change its split sizes or slice bounds, which no rewrite edits"),
    _rule("conv", ["Conv"], ["relax.nn.conv2d"],
          "producer of its output channels, consumer of its input channels; depthwise "
          "c -> c", _conv),
    _rule("matmul", ["MatMul", "Gemm"], ["relax.matmul"],
          "producer of its output features, consumer of its input features", _matmul),
)


def _index(rules: Iterable[ChannelRule], side: Literal["onnx", "relax"]
           ) -> Mapping[str, ChannelRule]:
    found: dict[str, ChannelRule] = {}
    for rule in rules:
        for op in getattr(rule, side):
            if op in found:
                raise ValueError(f"{side} op {op} has two channel rules: "
                                 f"{found[op].kind} and {rule.kind}")
            found[op] = rule
    return found


_BY_ONNX = _index(RULES, "onnx")
_BY_RELAX = _index(RULES, "relax")

#: kinds that act on every channel alone with nothing to edit but per-channel constants
CHANNEL_WISE: frozenset[Kind] = frozenset({"elementwise", "binary"})


def onnx_rule(op_type: str) -> ChannelRule | None:
    """The rule of an ONNX op type (default domain), or None: it pins what it reads."""
    return _BY_ONNX.get(op_type)


def relax_rule(op_name: str) -> ChannelRule | None:
    """The rule of a Relax op (``relax.divide``), or None."""
    return _BY_RELAX.get(op_name)

"""Structured channel pruning in Relax: :class:`qmpass.algebra.PrunedGroup` on Relax sites.

A ``prune_channels`` step keeps the channels ``kept`` (``k`` of ``C``) of one channel
group (:mod:`qmpass.extract.channels`). :mod:`qmpass.rewrite.prune_channels` edits the
ONNX graph; here the same edit is made on the sites of :mod:`qmpass.tvm.extract`, whose
weights are the affine maps ``y = W x + b`` with any batch norm folded in
(``W = scale * W_conv``, ``b = scale * (b_conv - mean) + beta``). Because a batch norm
acts per output channel, the ONNX edits of a conv, its bias and its batch norm are one
edit of the folded ``(W, b)``:

* a producer (conv2d with ``groups=1``, or matmul) keeps the ``kept`` output rows:
  ``W' = W[kept]``, ``b' = b[kept]``;
* a depthwise conv2d in the group keeps its ``kept`` filters and ``groups = k``;
* a consumer reads the group at input channels ``[offset, offset + C)``. With the
  planner's compensation ``x ~= M x_kept + s`` (``"mix:N"``, ``C x k``; ``"shift:N"``,
  ``C``), ``W x = (W M) x_kept + W s``: the group's input slice ``W_g`` becomes
  ``W_g M`` (per kernel tap for a conv) and ``b' = b + W_g s`` summed over the taps (for a
  conv this is exact except where zero padding drops taps at the borders, as in ONNX);
  without ``mix`` the ``kept`` input slices stay.

The edits of one site commute (rows and columns), so a site that is a consumer of one
step and a producer of the next is edited by both, in plan order; each site is emitted
once, as ``conv2d(x, W')`` (original strides, padding, dilation; ``groups``) ``+ b'`` as
``(1, C', 1, 1)``, or ``matmul(x, W'^T) + b'``.

Which Relax ops the group's channels pass through is decided by the registry of channel
rules that the ONNX analysis uses (:mod:`qmpass.extract.channels.rules`), looked up by
the op's name: an ``elementwise`` op (``relu``, ``sqrt``, ``exp``...), a ``binary`` op
(``add``, ``subtract``, ``multiply``, ``divide``, ``power``, ``maximum``, ``minimum``)
of two tensors of the group or of one and a constant that broadcasts over the channels
(a scalar), NCHW pooling, a global mean/max over the spatial axes and the
``reshape``/``squeeze`` to ``[N, C]`` after it (its shape ``[N, C]`` becomes ``[N, k]``).
Where the registry lets the ONNX analysis go on but this pass cannot, it declines
explicitly, with the reason, and the function is unchanged:

* a constant operand with one value per channel (the ONNX rewriter slices it; here
  constants are edited only inside the conv2d/matmul sites);
* a batch norm that is not folded into a site (it reads per-channel constants);
* a concat (the consumers' offsets into another group's channels are not supported);
* a split or strided slice (declined on both sides: see the registry).

Any other op, a tensor the function returns, or a site the step does not name declines
the step as well.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import tvm
from tvm import relax

from qmpass.algebra import PrunedGroup, conv_kernel
from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.extract.channels.rules import relax_rule
from qmpass.plan.plan import Step
from qmpass.tvm.extract import Site, static_dims

__all__ = ["Dataflow", "PrunedStep", "SiteEdit", "prune_step"]

#: where a tensor of the group has its channels: NCHW, NCHW after a global pooling
#: (spatial dims 1), or the last axis
Layout = Literal["nchw", "pooled", "last"]


@dataclass(frozen=True, eq=False)
class SiteEdit:
    """The weights a site will have once the prune steps that touch it are applied.

    ``weight`` is ``(Cout, Cin/groups, kh, kw)`` for a conv2d and ``(d_out, d_in)`` for a
    matmul, in float64 with any batch norm folded in; ``bias`` is None while the site has
    none; ``roles`` maps ``"output"``/``"input"``/``"depthwise"`` to the plan index of the
    step that edited that side.
    """

    site: Site
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int
    roles: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, site: Site) -> SiteEdit:
        op = site.operator
        bias = None if op.bias is None else np.asarray(op.bias, dtype=np.float64)
        if site.kind == "matmul":
            return cls(site, np.asarray(op.weight, dtype=np.float64), bias, 1)
        geometry = op.geometry
        assert geometry is not None  # every conv2d site has one
        kernel = conv_kernel(np.asarray(op.weight, dtype=np.float64), geometry.kernel_shape,
                             geometry.groups)
        return cls(site, kernel, bias, geometry.groups)

    def keep_outputs(self, record: PrunedGroup, role: str, index: int) -> SiteEdit:
        """The record's producer edit: ``W[kept]``, ``b[kept]``; a depthwise conv keeps
        ``groups = k``."""
        groups = len(record.kept) if role == "depthwise" else self.groups
        bias = None if self.bias is None else record.keep(self.bias, 0)
        return replace(self, weight=record.keep(self.weight, 0), bias=bias, groups=groups,
                       roles={**self.roles, role: index})

    def compensate(self, record: PrunedGroup, node: str, offset: int, index: int
                   ) -> SiteEdit:
        """The record's consumer edit of ``node`` (input channels on axis 1)."""
        weight, delta = record.consumer(node, self.weight, 1, offset)
        bias = self.bias
        if delta is not None:
            bias = delta if bias is None else bias + delta
        return replace(self, weight=weight, bias=bias, roles={**self.roles, "input": index})

    def emit(self, bb: Any, x: Any) -> Any:
        """The site's new computation on ``x``; the last call is returned unbound."""
        site, dtype = self.site, self.site.dtype
        d_out = self.weight.shape[0]
        if site.kind == "matmul":
            product = relax.op.matmul(x, _const(self.weight.T, dtype))
            bias_shape: tuple[int, ...] = (d_out,)
        else:
            geometry = site.operator.geometry
            assert geometry is not None
            product = relax.op.nn.conv2d(
                x, _const(self.weight, dtype), strides=list(geometry.strides),
                padding=list(geometry.pads), dilation=list(geometry.dilations),
                groups=self.groups)
            bias_shape = (1, d_out, 1, 1)
        if self.bias is None:
            return product
        return relax.op.add(bb.emit(product), _const(self.bias.reshape(bias_shape), dtype))


@dataclass(frozen=True)
class PrunedStep:
    """What one prune step does: the edits of the sites it touches (keyed by their call
    variable, composed with earlier steps' edits), the new ``[N, k]`` shape of each
    classifier-head reshape (keyed by its variable), and the sites it touched."""

    edits: Mapping[Any, SiteEdit]
    reshapes: Mapping[Any, Any]
    sites: tuple[Site, ...]


class Dataflow:
    """Who reads which variable in a Relax function, and which sites start where."""

    def __init__(self, func: Any, sites: Sequence[Site]) -> None:
        self.value: dict[Any, Any] = {}
        self.readers: dict[Any, list[Any]] = defaultdict(list)
        for block in func.body.blocks:
            for binding in block.bindings:
                self.value[binding.var] = binding.value
                for var in relax.analysis.free_vars(binding.value):
                    self.readers[var].append(binding.var)
        self.returned = set(relax.analysis.free_vars(func.body.body))
        self.site_at = {site.call: site for site in sites}


def prune_step(
    step: Step,
    index: int,
    tensors: Mapping[str, np.ndarray],
    group: ChannelGroup,
    ops: Mapping[str, Operator],
    sites: Mapping[str, Site],
    flow: Dataflow,
    edits: Mapping[Any, SiteEdit],
) -> PrunedStep | str:
    """Step ``index`` of the plan as site edits on top of ``edits``, or why it is
    declined. ``group`` names its producers, depthwise convs and consumers by the keys
    of ``ops`` and ``sites`` (the operators and their Relax sites)."""
    reason = PrunedGroup.declines(step, group) or PrunedGroup.declines_tensors(
        step, group, tensors)
    if reason is not None:
        return reason
    record = PrunedGroup.of(step, group, tensors)
    channels = group.channels

    def site_of(name: str) -> Site | str:
        if name not in ops:
            return f"operator '{name}' is not in the plan's extraction"
        site = sites.get(name)
        return site if site is not None else \
            f"operator '{name}' has no matching call in the Relax function"

    producers: list[Site] = []
    depthwise: list[Site] = []
    consumers: list[Site] = []
    for name in dict.fromkeys(p.node for p in group.producers):
        found = site_of(name)
        if isinstance(found, str):
            return found
        geometry = found.operator.geometry
        if geometry is not None and geometry.groups != 1:
            return f"producer '{name}' is a grouped conv2d"
        if found.operator.shape[0] != channels:
            return f"producer '{name}' has {found.operator.shape[0]} outputs, not {channels}"
        producers.append(found)
    for sliced in group.sliced:
        op = ops.get(sliced.node)
        if op is None or op.op_type != "Conv" or sliced.input_index != 1:
            # biases and batch norms are folded into the sites; any other constant
            # (an elementwise op's) is on the path, where the walk declines it
            continue
        found = site_of(sliced.node)
        if isinstance(found, str):
            return found
        depthwise.append(found)
    for consumer in group.consumers:
        found = site_of(consumer.node)
        if isinstance(found, str):
            return found
        consumers.append(found)

    walked = _walk(flow, producers, depthwise, consumers, channels, len(record.kept))
    if isinstance(walked, str):
        return walked
    new = dict(edits)

    def edit(site: Site, role: str) -> SiteEdit | str:
        current = new.get(site.call) or SiteEdit.of(site)
        clash = current.roles if role == "depthwise" else \
            {r: i for r, i in current.roles.items() if r in (role, "depthwise")}
        if clash:
            return (f"site '{site.operator.name}' was pruned already by step "
                    f"{min(clash.values())}")
        return current

    for site in producers:
        current = edit(site, "output")
        if isinstance(current, str):
            return current
        new[site.call] = current.keep_outputs(record, "output", index)
    for site in depthwise:
        current = edit(site, "depthwise")
        if isinstance(current, str):
            return current
        new[site.call] = current.keep_outputs(record, "depthwise", index)
    for consumer, site in zip(group.consumers, consumers, strict=True):
        current = edit(site, "input")
        if isinstance(current, str):
            return current
        width = current.weight.shape[1] * (current.groups if site.kind == "conv2d" else 1)
        if current.groups != 1 or width != consumer.width or \
                consumer.offset + channels > width:
            return (f"consumer '{consumer.node}' reads {width} input channels in "
                    f"{current.groups} groups; the group needs channels "
                    f"{consumer.offset}..{consumer.offset + channels - 1} of {consumer.width}")
        new[site.call] = current.compensate(record, consumer.node, consumer.offset, index)
    touched = tuple(dict.fromkeys([*producers, *depthwise, *consumers]))
    return PrunedStep(new, walked, touched)


def _walk(
    flow: Dataflow, producers: Sequence[Site], depthwise: Sequence[Site],
    consumers: Sequence[Site], channels: int, kept: int,
) -> dict[Any, Any] | str:
    """Follow the group's channels from the producers' outputs through the function.

    Returns the new shapes of the head reshapes, or why the path cannot be pruned: a
    reader that is not channel-wise, a constant operand, a tensor that leaves the
    function, a residual operand from outside the group, a site of the group that the
    walk does not reach."""
    layout: dict[Any, Layout] = {}
    queue: list[Any] = []

    def enter(var: Any, where: Layout) -> None:
        if var not in layout:
            layout[var] = where
            queue.append(var)

    for site in producers:
        enter(site.output, "nchw" if site.kind == "conv2d" else "last")
    expected = {site.call: site for site in [*depthwise, *consumers]}
    reached: set[Any] = set()
    operands: list[tuple[Any, Any]] = []  # (binary binding, its operand)
    reshapes: dict[Any, Any] = {}
    while queue:
        var = queue.pop(0)
        where = layout[var]
        if var in flow.returned:
            return f"the group's channels reach the function's output ('{var.name}')"
        for reader in dict.fromkeys(flow.readers[var]):
            value = flow.value[reader]
            target = flow.site_at.get(reader)
            if target is not None and target.input.same_as(var):
                if reader not in expected:
                    return (f"'{var.name}' is read by {target.kind} "
                            f"'{target.operator.name}', which the step does not name")
                wanted: tuple[Layout, ...] = ("last",) if target.kind == "matmul" else \
                    ("nchw", "pooled")
                if where not in wanted:
                    return (f"{target.kind} '{target.operator.name}' reads '{var.name}' "
                            "with its channels on another axis")
                reached.add(reader)
                if any(target is d for d in depthwise):
                    enter(target.output, where)
                continue
            problem = _channel_wise(value, var, where, channels)
            if isinstance(problem, str):
                return f"'{var.name}' is read by '{reader.name}': {problem}"
            out_layout, binary, shape = problem
            if binary:
                operands.extend((reader, arg) for arg in value.args
                                if isinstance(arg, relax.Var))
            if shape is not None:
                reshapes[reader] = relax.ShapeExpr([shape.values[0], kept])
            enter(reader, out_layout)
    for reader, arg in operands:
        if arg not in layout:
            return (f"'{reader.name}' = {_op(flow.value[reader])}(...) also reads "
                    f"'{getattr(arg, 'name', arg)}', which is not a tensor of the group")
        if layout[arg] != layout[reader]:
            return f"the operands of '{reader.name}' have their channels on different axes"
    for call, site in expected.items():
        if call not in reached:
            return (f"{site.kind} '{site.operator.name}' does not read the group's "
                    "channels in the Relax function")
    return reshapes


def _channel_wise(
    value: Any, var: Any, where: Layout, channels: int
) -> tuple[Layout, bool, Any] | str:
    """The layout of a reader's output, whether it is a binary op of tensors, and the
    shape to retarget (a head reshape); or why the reader does not act on each channel
    alone (or does, but would need an edit this pass does not make)."""
    if not isinstance(value, relax.Call):
        return f"a {type(value).__name__} binding is not a channel-wise operation"
    op = _op(value)
    rule = relax_rule(op)
    kind = None if rule is None else rule.kind
    tensor_args = [a for a in value.args if isinstance(getattr(a, "ty", None), relax.TensorType)]
    if kind == "elementwise" and len(tensor_args) == 1:
        return where, False, None
    if kind == "binary" and len(value.args) == 2:
        for arg in value.args:
            if not isinstance(arg, relax.Var):
                problem = _constant_operand(arg, var, where)
                if problem is not None:
                    return (f"{op} with a constant operand {problem} (the pass slices no "
                            "constant outside the conv2d/matmul sites)")
        return where, True, None
    if kind == "batchnorm":
        return "a batch norm that is not folded into a conv2d site (it reads per-channel " \
               "constants)"
    if kind == "concat":
        return "a concat (channel offsets across groups are not supported)"
    if kind == "split" and rule is not None:
        return f"{op}: {rule.declined}"
    if kind == "pool" and where in ("nchw", "pooled") and \
            str(value.attrs.layout) == "NCHW" and str(value.attrs.out_layout) == "NCHW":
        return where, False, None
    if kind == "reduce" and where in ("nchw", "pooled"):
        axes = value.attrs.axis
        if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            return ("pooled" if bool(value.attrs.keepdims) else "last"), False, None
        return f"{op} over axes {None if axes is None else [int(a) for a in axes]}"
    if op == "relax.squeeze" and where == "pooled":
        axes = value.attrs.axis
        if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            return "last", False, None
    if op == "relax.reshape" and where == "pooled":
        shape = value.args[1]
        if isinstance(shape, relax.ShapeExpr) and len(shape.values) == 2:
            last = shape.values[1]
            if isinstance(last, tvm.tirx.IntImm) and int(last) == channels:
                return "last", False, shape
            return f"a reshape to {shape} where [N, {channels}] is expected"
        return f"a reshape to {shape}, not a static [N, {channels}]"
    return f"{op or type(value.op).__name__} is not a channel-wise operation the pass " \
           "prunes through"


def _constant_operand(arg: Any, var: Any, where: Layout) -> str | None:
    """Why a binary op's non-tensor-of-the-group operand would need an edit, or None when
    it broadcasts over the channels (size 1 on their axis) without widening ``var``."""
    shape, target = static_dims(arg), static_dims(var)
    if shape is None or None in shape or target is None:
        return "of unknown shape"
    if len(shape) > len(target):
        return f"of shape {list(shape)}, which adds dimensions"
    lead = len(target) - len(shape)
    if any(d != 1 and d != target[lead + i] for i, d in enumerate(shape)):
        return f"of shape {list(shape)}, which widens the tensor"
    axis = (1 if where in ("nchw", "pooled") else len(target) - 1) - lead
    if axis >= 0 and shape[axis] != 1:
        return f"of shape {list(shape)}, one value per channel"
    return None


def _op(call: Any) -> str:
    return str(call.op.name) if hasattr(call.op, "name") else ""


def _const(array: np.ndarray, dtype: str) -> Any:
    return relax.const(np.ascontiguousarray(array).astype(dtype), dtype)

"""Gated low-rank factorisation: MatMul/Gemm operators (or a shared basis's members) whose
rank a run-time input ``budget_level`` chooses, every level's factors stored as constants.

The algebra is :class:`qmpass.algebra.GatedFactors`; this module prints it. The model
gets one int64 scalar input ``budget_level`` that is also an initializer (0), so a
caller who does not feed it runs level 0 (ONNX IR 4 and later: an initializer listed
among the inputs is its default), checked once by ``level = Gather(0 .. L-1,
budget_level)`` (outside ``-L .. L-1`` an onnxruntime error; negative values count from
the end, as Gather's do). Two graph forms (``build_gated``'s ``form``):

* ``"model"`` (written by ``compress --budgets``): each distinct level printed as a model
  of its own (:meth:`GatedLowRank.fix`: a factored operator at rank ``q`` becomes
  ``MatMul(MatMul(x, first[:q]^T), second[:, :q]^T) + b_level``, constants of exactly
  that rank), joined by a flat chain of ``If``s on the level in the main graph
  (:func:`~qmpass.rewrite.gated_switch.switch_model`): a run pays one ``If`` per
  distinct level, whatever the number of operators, and reads every weight from at
  most one scope up (where onnxruntime pre-packs it).
* ``"operator"``: per gated operator, with ``R_0 > R_1 > ...`` the distinct ranks of its
  factored levels and ``t_j`` the number of levels whose rank is at least ``R_j``::

      y = If(level < t_0) { MatMul(MatMul(x, first[:R_0]^T), second[:, :R_0]^T) }
          else If(level < t_1) { ... R_1 ... } ... else { ... the smallest rank ... }
          + Gather(biases, level)                                [-> Split into members]

  and, where the first levels leave the operator dense, an outer
  ``If(level < dense_levels)`` running the original map (``x W^T + b``) in one branch.
  Every constant lives in the branch that reads it. Each operator pays its ``If``s.

Either way nothing is sliced or copied at run time (onnxruntime pre-packs the constant
factors), at the price of storing each distinct rank's pair: ``sum_j R_j`` directions
instead of ``R_0``. ``bench/gated.py`` measured the alternatives (slicing the largest
pair; summing nested pieces of it under ``If``s) and both forms against standalone
models; the whole-model form was the fastest on whole models (docs/GATED.md).

The model also carries ``metadata_props`` ``qmpass.budgets`` (the budgets, comma
separated); :func:`refuse_gated` is how ``lower``, the Relax pass and ``compress`` tell
a gated model apart and refuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from qmpass.algebra.gated import GatedFactors, gated_declines, nested_ranks_declines
from qmpass.errors import QmpassInputError
from qmpass.extract import Operator
from qmpass.rewrite.base import (
    add_node,
    decline_node,
    detach_output,
    export_like,
    new_constant,
    unique_name,
    weight_dtype,
)
from qmpass.rewrite.gated_switch import switch_model

__all__ = [
    "GATED_INPUT",
    "GATED_METADATA",
    "GatedForm",
    "GatedLowRank",
    "build_gated",
    "refuse_gated",
]

GATED_INPUT = "budget_level"
GATED_METADATA = "qmpass.budgets"
_MIN_OPSET = 13  # Split sizes as an input
#: the graph form: whole-model branches under one If chain, or an If chain per operator
GatedForm = Literal["model", "operator"]


def refuse_gated(model: onnx.ModelProto, command: str) -> None:
    """Raise :class:`~qmpass.errors.QmpassInputError` (one sentence naming ``command``)
    when ``model`` is a budget-gated model: no stage but onnxruntime takes one."""
    marked = any(p.key == GATED_METADATA for p in model.metadata_props)
    defaulted = {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}
    if marked or GATED_INPUT in defaulted:
        raise QmpassInputError(
            f"this is a budget-gated model (input '{GATED_INPUT}'); {command} does not "
            "take gated models: run it on the original model (docs/GATED.md).")


class GatedLowRank:
    """Check and print one :class:`~qmpass.algebra.GatedFactors` (see the module
    docstring); ``level`` is the graph's checked, non-negative level."""

    def check(self, graph: gs.Graph, members: Sequence[Operator],
              ops: Mapping[str, Operator], ranks: Sequence[int | None]) -> str | None:
        reason = gated_declines(members)
        for op in members:
            reason = reason or decline_node(graph, ops, op.name)
        if reason is None and len({weight_dtype(graph, op) for op in members}) > 1:
            reason = "members store weights in different types"
        return reason or nested_ranks_declines(ranks, members[0].shape[1],
                                               [op.shape[0] for op in members])

    def fix(self, graph: gs.Graph, members: Sequence[Operator], record: GatedFactors,
            level: int) -> None:
        """The members as level ``level`` (factored) computes them, nothing gated."""
        outputs = [detach_output(graph, op.output) for op in members]
        _Printer(graph, f"{members[0].name}/gated", graph.tensors()[members[0].input],
                 record, None, weight_dtype(graph, members[0])).fixed(graph, outputs, level)

    def apply(self, graph: gs.Graph, members: Sequence[Operator], record: GatedFactors,
              level: gs.Variable) -> None:
        dtype = weight_dtype(graph, members[0])
        x = graph.tensors()[members[0].input]
        outputs = [detach_output(graph, op.output) for op in members]
        printer = _Printer(graph, f"{members[0].name}/gated", x, record, level, dtype)
        if record.dense_levels == 0:
            printer.factored(graph, outputs)
            return
        printer.switch(graph, outputs, [(record.dense_levels, printer.dense)],
                       printer.factored)


Fill = Callable[[gs.Graph, list[gs.Variable]], None]


class _Printer:
    """The nodes of one gated operator; every constant is created in ``main`` (for a
    fresh name) and read only by the (sub)graph a ``fill`` builds."""

    def __init__(self, main: gs.Graph, base: str, x: gs.Tensor, record: GatedFactors,
                 level: gs.Variable | None, dtype: np.dtype) -> None:
        self.main, self.base, self.x, self.record = main, base, x, record
        self.level, self.dtype = level, dtype

    def const(self, name: str, array: np.ndarray, kind: np.dtype | None = None) -> gs.Constant:
        return new_constant(self.main, f"{self.base}/{name}", array, kind or self.dtype)

    def var(self, name: str, kind: np.dtype | None = None) -> gs.Variable:
        return gs.Variable(unique_name(self.main, f"{self.base}/{name}"),
                           dtype=kind or self.dtype)

    def switch(self, sub: gs.Graph, outs: list[gs.Variable],
               cases: Sequence[tuple[int, Fill]], last: Fill) -> None:
        """``outs`` in ``sub``: the first case whose ``level < bound`` fills them, else
        ``last`` (nested ``If``s, each branch its own graph)."""
        if not cases:
            last(sub, outs)
            return
        (bound, fill), rest = cases[0], cases[1:]
        branches = []
        for kind in ("then", "else"):
            branch_outs = [self.var(f"{kind}{bound}/out{i}") for i in range(len(outs))]
            branch = gs.Graph(outputs=branch_outs, opset=self.main.opset)
            if kind == "then":
                fill(branch, branch_outs)
            else:
                self.switch(branch, branch_outs, rest, last)
            branches.append(branch)
        assert self.level is not None
        taken = gs.Variable(unique_name(self.main, f"{self.base}/below{bound}"),
                            dtype=np.bool_, shape=[])
        scalar = gs.Constant(unique_name(self.main, f"{self.base}/bound{bound}"),
                             np.array(bound, dtype=np.int64))  # new_constant makes it 1-d
        add_node(sub, "Less", f"{self.base}/Less{bound}", [self.level, scalar], [taken])
        add_node(sub, "If", f"{self.base}/If{bound}", [taken], outs,
                 {"then_branch": branches[0], "else_branch": branches[1]})

    def dense(self, sub: gs.Graph, outs: list[gs.Variable]) -> None:
        """The original members, ``x W_i^T + b_i`` each (bias of the dense level 0)."""
        record = self.record
        assert record.weight is not None
        start = 0
        for i, (size, out) in enumerate(zip(record.sizes, outs, strict=True)):
            rows = slice(start, start + size)
            start += size
            weight = self.const(f"dense/weight{i}", record.weight[rows].T)
            bias = self.const(f"dense/bias{i}", record.biases[0, rows])
            product = self.var(f"dense/product{i}")
            add_node(sub, "MatMul", f"{self.base}/dense/MatMul{i}", [self.x, weight], [product])
            add_node(sub, "Add", f"{self.base}/dense/Add{i}", [product, bias], [out])

    def pair(self, rank: int) -> Fill:
        """``x first[:rank]^T second[:, :rank]^T``, both factors constants of that rank."""
        def fill(sub: gs.Graph, outs: list[gs.Variable]) -> None:
            first = self.const(f"r{rank}/first", self.record.first[:rank].T)
            second = self.const(f"r{rank}/second", self.record.second[:, :rank].T)
            hidden = self.var(f"r{rank}/hidden")
            add_node(sub, "MatMul", f"{self.base}/r{rank}/MatMul_first", [self.x, first],
                     [hidden])
            add_node(sub, "MatMul", f"{self.base}/r{rank}/MatMul_second", [hidden, second],
                     outs)
        return fill

    def factored(self, sub: gs.Graph, outs: list[gs.Variable]) -> None:
        """The factored levels: the level's pair, the level's bias, the split."""
        record = self.record
        ranks = sorted({q for q in record.ranks if q is not None}, reverse=True)
        bounds = [sum(q is None or q >= rank for q in record.ranks) for rank in ranks]
        product = self.var("product")
        cases = [(b, self.pair(r)) for b, r in zip(bounds, ranks, strict=True)]
        self.switch(sub, [product], cases[:-1], self.pair(ranks[-1]))
        bias = self.var("bias")
        assert self.level is not None
        add_node(sub, "Gather", f"{self.base}/Gather_bias",
                 [self.const("biases", record.biases), self.level], [bias], {"axis": 0})
        self.biased(sub, product, bias, outs)

    def fixed(self, sub: gs.Graph, outs: list[gs.Variable], level: int) -> None:
        """Level ``level`` (factored) alone: its pair, its bias, the split."""
        rank = self.record.ranks[level]
        assert rank is not None
        product = self.var("product")
        self.pair(rank)(sub, [product])
        self.biased(sub, product, self.const(f"r{rank}/bias", self.record.biases[level]), outs)

    def biased(self, sub: gs.Graph, product: gs.Variable, bias: gs.Tensor,
               outs: list[gs.Variable]) -> None:
        """``outs``: ``product + bias``, split into the members."""
        if len(outs) == 1:
            add_node(sub, "Add", f"{self.base}/Add_bias", [product, bias], outs)
            return
        fused = self.var("fused")
        add_node(sub, "Add", f"{self.base}/Add_bias", [product, bias], [fused])
        add_node(sub, "Split", f"{self.base}/Split",
                 [fused, self.const("split", np.array(self.record.sizes), np.dtype(np.int64))],
                 outs, {"axis": -1})


def build_gated(
    model: onnx.ModelProto,
    ops: Mapping[str, Operator],
    units: Sequence[tuple[Sequence[Operator], GatedFactors]],
    budgets: Sequence[float],
    form: GatedForm = "model",
) -> tuple[onnx.ModelProto, dict[int, str]]:
    """``model`` (named by :func:`~qmpass.rewrite.base.name_nodes`, in caller form) with
    every unit gated, the ``budget_level`` input (default 0) and the budgets in its
    metadata; and, by position, the units that declined (with why). The result passes
    ``onnx.checker``; its interface is the original's plus ``budget_level``. ``form``:
    a flat ``If`` chain over whole-model branches (``"model"``, :mod:`.gated_switch`) or
    one per gated operator (``"operator"``; see the module docstring)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        return model, dict.fromkeys(range(len(units)),
                                    f"gated models need opset {_MIN_OPSET} or later "
                                    f"(the model has {opset})")
    untyped = [o.name for o in model.graph.output
               if not o.type.HasField("tensor_type") or not o.type.tensor_type.elem_type]
    if form == "model" and untyped:  # the If chain starts from empty tensors of each type
        return model, dict.fromkeys(range(len(units)), f"the model's output '{untyped[0]}' "
                                    "is not a tensor of a known type")
    graph = gs.import_onnx(model)
    if GATED_INPUT in graph.tensors():
        return model, dict.fromkeys(range(len(units)), f"the model already has a tensor "
                                    f"named '{GATED_INPUT}'")
    rewrite = GatedLowRank()
    declined: dict[int, str] = {}
    accepted = []
    for index, (members, record) in enumerate(units):
        reason = rewrite.check(graph, members, ops, record.ranks)
        if reason is None:
            accepted.append((members, record))
        else:
            declined[index] = reason
    if len(declined) == len(units):
        return model, declined
    if form == "operator":
        # the checked level: out of -L .. L-1 an onnxruntime error, negative from the end
        level = gs.Variable(unique_name(graph, f"{GATED_INPUT}/checked"), dtype=np.int64,
                            shape=[])
        add_node(graph, "Gather", f"{GATED_INPUT}/Gather",
                 [new_constant(graph, f"{GATED_INPUT}/levels", np.arange(len(budgets)),
                               np.dtype(np.int64)),
                  gs.Variable(GATED_INPUT, dtype=np.int64, shape=[])], [level], {"axis": 0})
        for members, record in accepted:
            rewrite.apply(graph, members, record, level)
        out = export_like(graph, model)
    else:
        out = _whole_model(model, accepted, len(budgets))
    out.ir_version = max(out.ir_version, 4)  # an input with an initializer is its default
    out.graph.input.append(helper.make_tensor_value_info(GATED_INPUT, TensorProto.INT64, []))
    out.graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64),
                                                         GATED_INPUT))
    del out.metadata_props[:]
    out.metadata_props.extend(p for p in model.metadata_props if p.key != GATED_METADATA)
    out.metadata_props.append(onnx.StringStringEntryProto(
        key=GATED_METADATA, value=",".join(f"{b:g}" for b in budgets)))
    onnx.checker.check_model(out, full_check=True)
    return out, declined


def _whole_model(model: onnx.ModelProto,
                 units: Sequence[tuple[Sequence[Operator], GatedFactors]],
                 count: int) -> onnx.ModelProto:
    """Each distinct level as a model of its own, joined by :func:`switch_model`."""
    maps = [tuple((record.ranks[k], record.biases[k].tobytes()) for _, record in units)
            for k in range(count)]
    starts = [k for k in range(count) if k == 0 or maps[k] != maps[k - 1]]
    levels = []
    for k in starts:
        graph = gs.import_onnx(model)
        for members, record in units:
            if record.ranks[k] is not None:
                GatedLowRank().fix(graph, members, record, k)
        levels.append(export_like(graph, model))
    return switch_model(model, levels, starts, GATED_INPUT, count)

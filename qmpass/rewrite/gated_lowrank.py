"""Gated low-rank factorisation: one MatMul/Gemm (or a shared basis's members) whose rank
a run-time input ``budget_level`` chooses, from factors stored once at the largest rank.

The algebra is :class:`qmpass.algebra.GatedFactors`; this module prints it. The model
gets one int64 scalar input ``budget_level`` that is also an initializer (0), so a
caller who does not feed it runs level 0 (ONNX IR 4 and later: an initializer listed
among the inputs is its default). Per gated operator:

    q    = Gather(ranks, Unsqueeze(budget_level))            int64 [1], ranks per level
    y    = MatMul(MatMul(x, Slice(first^T, 0:q, axis 1)), Slice(second^T, 0:q, axis 0))
           + Gather(biases, budget_level)                   [-> Split into members]

so onnxruntime multiplies by the first ``q`` directions only. Where the first levels
leave the operator dense, an ``If(budget_level < dense_levels)`` runs the original map
(``x W^T + b``, its weight kept once) in one branch and the factored one in the other.
Every constant lives in the branch that reads it; the branches read ``x`` and the level
from the outer scope. ``budget_level`` outside ``0 .. levels - 1`` is an onnxruntime
error (a Gather index out of range); negative values count from the end, as Gather's do.

The model also carries ``metadata_props`` ``qmpass.budgets`` (the budgets, comma
separated); :func:`refuse_gated` is how ``lower``, the Relax pass and ``compress`` tell
a gated model apart and refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

__all__ = [
    "GATED_INPUT",
    "GATED_METADATA",
    "GatedLowRank",
    "build_gated",
    "refuse_gated",
]

GATED_INPUT = "budget_level"
GATED_METADATA = "qmpass.budgets"
_MIN_OPSET = 13  # Split sizes, Unsqueeze axes and Slice bounds as inputs


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
    docstring); ``level`` and ``level_1d`` are the graph's ``budget_level`` and its
    one-element form."""

    def check(self, graph: gs.Graph, members: Sequence[Operator],
              ops: Mapping[str, Operator], ranks: Sequence[int | None]) -> str | None:
        reason = gated_declines(members)
        for op in members:
            reason = reason or decline_node(graph, ops, op.name)
        if reason is None and len({weight_dtype(graph, op) for op in members}) > 1:
            reason = "members store weights in different types"
        return reason or nested_ranks_declines(ranks, members[0].shape[1],
                                               [op.shape[0] for op in members])

    def apply(self, graph: gs.Graph, members: Sequence[Operator], record: GatedFactors,
              level: gs.Variable, level_1d: gs.Variable) -> None:
        dtype = weight_dtype(graph, members[0])
        x = graph.tensors()[members[0].input]
        outputs = [detach_output(graph, op.output) for op in members]
        base = f"{members[0].name}/gated"
        if record.dense_levels == 0:
            _factored(graph, graph, base, x, outputs, record, level, level_1d, dtype)
            return
        branches = []
        for branch in ("dense", "factored"):
            outs = [gs.Variable(unique_name(graph, f"{base}/{branch}/out{i}"), dtype=dtype)
                    for i in range(len(outputs))]
            sub = gs.Graph(outputs=outs, opset=graph.opset)
            if branch == "dense":
                _dense(sub, graph, base, x, outs, record, dtype)
            else:
                _factored(sub, graph, f"{base}/f", x, outs, record, level, level_1d, dtype)
            branches.append(sub)
        dense = gs.Variable(unique_name(graph, f"{base}/is_dense"), dtype=np.bool_, shape=[])
        bound = gs.Constant(unique_name(graph, f"{base}/dense_levels"),  # a scalar
                            np.array(record.dense_levels, dtype=np.int64))
        add_node(graph, "Less", f"{base}/Less", [level, bound], [dense])
        add_node(graph, "If", f"{base}/If", [dense], outputs,
                 {"then_branch": branches[0], "else_branch": branches[1]})


def _dense(sub: gs.Graph, main: gs.Graph, base: str, x: gs.Tensor, outs: list[gs.Variable],
           record: GatedFactors, dtype: np.dtype) -> None:
    """The original members, ``x W_i^T + b_i`` each (bias of the dense level 0)."""
    assert record.weight is not None
    start = 0
    for i, (size, out) in enumerate(zip(record.sizes, outs, strict=True)):
        rows = slice(start, start + size)
        start += size
        weight = new_constant(main, f"{base}/dense/weight{i}", record.weight[rows].T, dtype)
        bias = new_constant(main, f"{base}/dense/bias{i}", record.biases[0, rows], dtype)
        product = gs.Variable(unique_name(main, f"{base}/dense/product{i}"), dtype=dtype)
        add_node(sub, "MatMul", f"{base}/dense/MatMul{i}", [x, weight], [product])
        add_node(sub, "Add", f"{base}/dense/Add{i}", [product, bias], [out])


def _factored(sub: gs.Graph, main: gs.Graph, base: str, x: gs.Tensor,
              outs: list[gs.Variable], record: GatedFactors, level: gs.Variable,
              level_1d: gs.Variable, dtype: np.dtype) -> None:
    """The factors sliced to the level's rank, the level's bias, the split."""
    i64 = np.dtype(np.int64)

    def const(name: str, array: np.ndarray, kind: np.dtype = dtype) -> gs.Constant:
        return new_constant(main, f"{base}/{name}", array, kind)

    def var(name: str, kind: np.dtype = dtype) -> gs.Variable:
        return gs.Variable(unique_name(main, f"{base}/{name}"), dtype=kind)

    table = np.array([record.rank if q is None else q for q in record.ranks])
    rank = var("rank", i64)
    add_node(sub, "Gather", f"{base}/Gather_rank", [const("ranks", table, i64), level_1d],
             [rank], {"axis": 0})
    first, second = var("first_q"), var("second_q")
    add_node(sub, "Slice", f"{base}/Slice_first",
             [const("first", record.first.T), const("zero", np.array([0]), i64), rank,
              const("axis1", np.array([1]), i64)], [first])
    add_node(sub, "Slice", f"{base}/Slice_second",
             [const("second", record.second.T), const("zero0", np.array([0]), i64), rank,
              const("axis0", np.array([0]), i64)], [second])
    hidden, product, bias = var("hidden"), var("product"), var("bias")
    add_node(sub, "MatMul", f"{base}/MatMul_first", [x, first], [hidden])
    add_node(sub, "MatMul", f"{base}/MatMul_second", [hidden, second], [product])
    add_node(sub, "Gather", f"{base}/Gather_bias", [const("biases", record.biases), level],
             [bias], {"axis": 0})
    if len(outs) == 1:
        add_node(sub, "Add", f"{base}/Add_bias", [product, bias], outs)
        return
    fused = var("fused")
    add_node(sub, "Add", f"{base}/Add_bias", [product, bias], [fused])
    add_node(sub, "Split", f"{base}/Split",
             [fused, const("split", np.array(record.sizes), i64)], outs, {"axis": -1})


def build_gated(
    model: onnx.ModelProto,
    ops: Mapping[str, Operator],
    units: Sequence[tuple[Sequence[Operator], GatedFactors]],
    budgets: Sequence[float],
) -> tuple[onnx.ModelProto, dict[int, str]]:
    """``model`` (named by :func:`~qmpass.rewrite.base.name_nodes`, in caller form) with
    every unit gated, the ``budget_level`` input (default 0) and the budgets in its
    metadata; and, by position, the units that declined (with why). The result passes
    ``onnx.checker``; its interface is the original's plus ``budget_level``."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        return model, dict.fromkeys(range(len(units)),
                                    f"gated models need opset {_MIN_OPSET} or later "
                                    f"(the model has {opset})")
    graph = gs.import_onnx(model)
    if GATED_INPUT in graph.tensors():
        return model, dict.fromkeys(range(len(units)), f"the model already has a tensor "
                                    f"named '{GATED_INPUT}'")
    level = gs.Variable(GATED_INPUT, dtype=np.int64, shape=[])
    level_1d = gs.Variable(unique_name(graph, f"{GATED_INPUT}/1d"), dtype=np.int64, shape=[1])
    add_node(graph, "Unsqueeze", f"{GATED_INPUT}/Unsqueeze",
             [level, new_constant(graph, f"{GATED_INPUT}/axes", np.array([0]),
                                  np.dtype(np.int64))], [level_1d])
    rewrite = GatedLowRank()
    declined: dict[int, str] = {}
    for index, (members, record) in enumerate(units):
        reason = rewrite.check(graph, members, ops, record.ranks)
        if reason is not None:
            declined[index] = reason
            continue
        rewrite.apply(graph, members, record, level, level_1d)
    if len(declined) == len(units):
        return model, declined
    out = export_like(graph, model)
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

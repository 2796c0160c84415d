"""The graph form of a gated operator: every level multiplies by constant factors of
exactly its rank (no ``Slice`` of a stored factor anywhere), computes the level's map
``x first[:q]^T second[:, :q]^T + b_level`` to float32 rounding, and a run without
``budget_level`` is level 0."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from conftest import const, make_model, tensor
from onnx import helper
from onnxruntime import InferenceSession
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from qmpass.algebra.gated import GatedFactors
from qmpass.compress.gated_report import stored_params
from qmpass.extract import extract_operators
from qmpass.rewrite.base import name_nodes
from qmpass.rewrite.gated_lowrank import GATED_INPUT, GatedForm, build_gated

RNG = np.random.default_rng(15)
D_IN = 40


def _f32(*shape: int) -> np.ndarray:
    """float64 values that float32 holds exactly (the printed constants lose nothing)."""
    return RNG.normal(size=shape).astype(np.float32).astype(np.float64)


def _model(sizes: tuple[int, ...]) -> onnx.ModelProto:
    nodes, inits, outs = [], [], []
    for i, size in enumerate(sizes):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"y{i}"])]
        inits += [const(f"w{i}", _f32(D_IN, size).astype(np.float32)),
                  const(f"b{i}", _f32(size).astype(np.float32))]
        outs.append(tensor(f"y{i}", ["batch", size]))
    return name_nodes(make_model(nodes, [tensor("x", ["batch", D_IN])], outs, inits))


def _gated(sizes: tuple[int, ...], ranks: tuple[int | None, ...],
           form: GatedForm = "model") -> tuple[onnx.ModelProto, GatedFactors]:
    model = _model(sizes)
    members = extract_operators(model).operators
    d_out, widest = sum(sizes), max(q for q in ranks if q is not None)
    weight = np.vstack([np.asarray(op.weight, dtype=np.float64) for op in members])
    original = np.concatenate([np.asarray(op.bias, dtype=np.float64) for op in members])
    biases = np.vstack([original if q is None else _f32(d_out) for q in ranks])
    record = GatedFactors(_f32(widest, D_IN), _f32(d_out, widest), ranks, biases,
                          weight if ranks[0] is None else None, sizes)
    gated, declined = build_gated(model, {op.name: op for op in members},
                                  [(members, record)], tuple(np.linspace(1, 0.2, len(ranks))),
                                  form)
    assert not declined
    return gated, record


def _graphs(graph: onnx.GraphProto, scope: dict[str, tuple[int, ...]] | None = None
            ) -> Iterator[tuple[onnx.GraphProto, dict[str, tuple[int, ...]]]]:
    """Every graph, with the constants it can read (its own and its enclosing graphs')."""
    scope = {**(scope or {}), **{t.name: tuple(t.dims) for t in graph.initializer}}
    yield graph, scope
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _graphs(sub, scope)


FORMS = ["model", "operator"]
CASES = [((48,), (None, 20, 20, 12, 6)), ((16, 16, 16), (16, 8, 8)), ((48,), (12, 12))]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("sizes", "ranks"), CASES)
def test_every_level_is_the_old_formula(sizes, ranks, form) -> None:
    gated, record = _gated(sizes, ranks, form)
    sess = InferenceSession(gated.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.normal(size=(64, D_IN)).astype(np.float32)
    x64 = x.astype(np.float64)
    for level, q in enumerate(ranks):
        if q is None:
            expected = x64 @ record.weight.T + record.biases[level]  # type: ignore[union-attr]
        else:  # the sliced form this one replaced
            expected = x64 @ record.first[:q].T @ record.second[:, :q].T + record.biases[level]
        got = np.concatenate(sess.run(None, {"x": x, GATED_INPUT: np.array(level)}), axis=1)
        np.testing.assert_allclose(got, expected, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(expected).max()))
        if level == len(ranks) - 1:  # negative levels count from the end
            last = sess.run(None, {"x": x, GATED_INPUT: np.array(-1)})
            np.testing.assert_array_equal(np.concatenate(last, axis=1), got)
    level_0 = sess.run(None, {"x": x, GATED_INPUT: np.array(0)})
    for a, b in zip(sess.run(None, {"x": x}), level_0, strict=True):  # no budget_level
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgument):
        sess.run(None, {"x": x, GATED_INPUT: np.array(len(ranks))})


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("sizes", "ranks"), CASES)
def test_every_factor_is_a_constant_of_its_rank_and_nothing_is_sliced(sizes, ranks, form) -> None:
    gated, _ = _gated(sizes, ranks, form)
    distinct = sorted({q for q in ranks if q is not None})
    weights = {}
    for graph, scope in _graphs(gated.graph):
        assert "Slice" not in {n.op_type for n in graph.node}
        for node in graph.node:
            if node.op_type == "MatMul":  # its weight: a constant (pre-packed by onnxruntime)
                assert node.input[1] in scope
                weights[node.input[1]] = scope[node.input[1]]
    d_out = sum(sizes)
    expected = [(D_IN, q) for q in distinct] + [(q, d_out) for q in distinct]
    if ranks[0] is None:
        expected += [(D_IN, size) for size in sizes]
    assert sorted(weights.values()) == sorted(expected)  # each stored once
    # stored: one pair per distinct rank, a bias per level (the whole-model form: per
    # factored level, as _gated's differ), and where some level is dense, its weight and bias
    dense = D_IN * d_out if ranks[0] is None else 0
    biases = len(ranks) if form == "operator" else sum(q is not None for q in ranks)
    assert stored_params(gated) == (sum(distinct) * (D_IN + d_out) + dense
                                    + (d_out if ranks[0] is None else 0) + biases * d_out)


def _readers(graph: onnx.GraphProto, scopes: tuple[set[str], ...] = ()
             ) -> Iterator[tuple[str, int]]:
    """Every MatMul weight and how many scopes up from its reader it is stored (0: the
    reader's own graph)."""
    scopes = ({t.name for t in graph.initializer}, *scopes)
    for node in graph.node:
        if node.op_type == "MatMul":
            yield node.input[1], next(i for i, s in enumerate(scopes) if node.input[1] in s)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _readers(sub, scopes)


@pytest.mark.parametrize(("sizes", "ranks"), CASES)
def test_no_weight_is_read_from_two_scopes_up(sizes, ranks) -> None:
    # onnxruntime pre-packs a MatMul's constant weight only when it is its graph's own or
    # the enclosing graph's; one from further up runs unpacked (docs/GATED.md)
    gated, _ = _gated(sizes, ranks)
    depths = dict(_readers(gated.graph))
    assert depths and max(depths.values()) <= 1
    # a pair two levels share (rank 20 at levels 1 and 2; rank 8 at 1 and 2) is read from
    # the main graph by both branches
    assert (1 in depths.values()) == (len(set(ranks)) < len(ranks))

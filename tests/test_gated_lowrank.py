"""GatedLowRank: a MatMul (or a shared basis's members) whose rank the ``budget_level``
input picks from factors stored once, checked level by level in onnxruntime against the
numpy record (:class:`qmpass.algebra.GatedFactors`), and the record's own algebra."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import const, make_model, tensor, trained_matrix
from onnx import helper
from rewrite_helpers import lowrank_step

from qmpass.algebra.gated import GatedFactors, nested_ranks_declines
from qmpass.errors import QmpassInputError
from qmpass.extract import Operator, extract_operators
from qmpass.plan.factors import projection
from qmpass.rewrite.base import name_nodes
from qmpass.rewrite.gated_lowrank import GATED_INPUT, build_gated, refuse_gated
from qmpass.verify import run_model

RNG = np.random.default_rng(3)


def _one_matmul() -> tuple[onnx.ModelProto, Operator]:
    w = trained_matrix(48, 40)  # d_out x d_in
    b = RNG.normal(size=48).astype(np.float32)
    model = name_nodes(make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [tensor("x", ["batch", 40])], [tensor("y", ["batch", 48])],
        [const("w", w.T), const("b", b)]))
    return model, extract_operators(model).operators[0]


def _levels(ops: list[Operator], ranks: list[int | None], cov: np.ndarray,
            mean: np.ndarray) -> list:
    """Each level's (step, tensors) as the planner makes them: whitened factors, the
    bias absorbing the mean of what was cut."""
    proj = projection([op.weight for op in ops], cov)
    bias = np.concatenate([np.asarray(op.bias) for op in ops])
    out = []
    for q in ranks:
        if q is None:
            out.append(None)
            continue
        first, second = proj.factors(q)
        out.append((lowrank_step(ops[0], q),
                    {"first": first, "second": second,
                     "bias": bias + (proj.weight - second @ first) @ mean}))
    return out


def _feeds(d_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = RNG.normal(size=(256, d_in)) @ RNG.normal(size=(d_in, d_in)) / np.sqrt(d_in) + 0.3
    return x.astype(np.float32), np.cov(x, rowvar=False), x.mean(axis=0)


def test_whitened_factors_are_nested_and_the_bias_is_not() -> None:
    _, op = _one_matmul()
    _, cov, mean = _feeds(40)
    proj = projection([op.weight], cov)
    first, second = proj.factors(24)
    for q in (8, 16):
        f_q, s_q = proj.factors(q)
        np.testing.assert_allclose(f_q, first[:q], rtol=0, atol=1e-12)
        np.testing.assert_allclose(s_q, second[:, :q], rtol=0, atol=1e-12)
    shift = [(proj.weight - s @ f) @ mean for f, s in (proj.factors(8), proj.factors(16))]
    assert np.linalg.norm(shift[0] - shift[1]) > 1e-3  # one bias per level is needed


def test_onnxruntime_computes_each_level_of_the_record() -> None:
    model, op = _one_matmul()
    x, cov, mean = _feeds(40)
    levels = _levels([op], [None, 16, 12, 6], cov, mean)
    record = GatedFactors.of([op], levels)
    assert (record.rank, record.dense_levels) == (16, 1)
    np.testing.assert_array_equal(record.at(0).matrix, op.weight)  # the dense level
    for level, (_, tensors) in enumerate(levels[1:], start=1):  # each level's own plan
        np.testing.assert_allclose(record.at(level).matrix,
                                   tensors["second"] @ tensors["first"], atol=1e-12)
        np.testing.assert_array_equal(record.biases[level], tensors["bias"])
    gated, declined = build_gated(model, {op.name: op}, [([op], record)], (1, 0.7, 0.5, 0.3))
    assert not declined
    assert gated.ir_version >= 4
    assert [i.name for i in gated.graph.input] == ["x", GATED_INPUT]
    assert GATED_INPUT in {t.name for t in gated.graph.initializer}  # its default
    assert {n.op_type for n in gated.graph.node} >= {"If", "Equal", "Gather"}
    original = run_model(model, {"x": x})[0]
    outputs = []
    for level in range(4):
        y = run_model(gated, {"x": x, GATED_INPUT: np.array(level)})[0]
        np.testing.assert_allclose(y, record(x.astype(np.float64), level), rtol=1e-4,
                                   atol=1e-4)
        outputs.append(y)
    np.testing.assert_allclose(outputs[0], original, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run_model(gated, {"x": x})[0], outputs[0])  # default 0
    errors = [np.linalg.norm(y - original) for y in outputs]
    assert errors == sorted(errors) and errors[3] > errors[2] > errors[1] > 100 * errors[0]


def test_a_shared_basis_is_gated_with_its_split() -> None:
    w = trained_matrix(96, 32)
    b = RNG.normal(size=96).astype(np.float32)
    nodes, inits, outs = [], [], []
    for i in range(3):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"y{i}"])]
        inits += [const(f"w{i}", w[32 * i:32 * (i + 1)].T), const(f"b{i}", b[32 * i:32 * (i + 1)])]
        outs.append(tensor(f"y{i}", ["batch", 32]))
    model = name_nodes(make_model(nodes, [tensor("x", ["batch", 32])], outs, inits))
    members = extract_operators(model).operators
    x, cov, mean = _feeds(32)
    levels = _levels(members, [16, 8], cov, mean)
    record = GatedFactors.of(members, levels)
    assert record.weight is None  # no dense level: the original weights are dropped
    gated, declined = build_gated(model, {op.name: op for op in members}, [(members, record)],
                                  (0.6, 0.3))
    assert not declined and "MatMul" not in {n.op_type for n in gated.graph.node}  # in Ifs
    assert not any(t.name.startswith("w") for t in gated.graph.initializer)
    for level in range(2):
        ys = run_model(gated, {"x": x, GATED_INPUT: np.array(level)})
        np.testing.assert_allclose(np.concatenate(ys, axis=1),
                                   record(x.astype(np.float64), level), rtol=1e-4, atol=1e-4)


def test_ranks_that_are_not_nested_are_declined() -> None:
    _, op = _one_matmul()
    _, cov, mean = _feeds(40)
    assert nested_ranks_declines([None, None], 40, [48]) is not None
    assert "grow" in str(nested_ranks_declines([8, 16], 40, [48]))
    assert "first" in str(nested_ranks_declines([8, None], 40, [48]))
    with pytest.raises(ValueError, match="nested"):
        GatedFactors.of([op], _levels([op], [16, 24], cov, mean))
    other = _levels([op], [16, 8], cov, mean)
    first, second = projection([op.weight], None).factors(8)  # another decomposition
    other[1] = (other[1][0], {"first": first, "second": second, "bias": other[1][1]["bias"]})
    with pytest.raises(ValueError, match="not nested"):
        GatedFactors.of([op], other)


def _dense_and_rank_8():
    """One MatMul, its record for the levels dense and rank 8, and a copy of its model to
    alter."""
    model, op = _one_matmul()
    _, cov, mean = _feeds(40)
    record = GatedFactors.of([op], _levels([op], [None, 8], cov, mean))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return model, op, record, copy


def test_old_opsets_are_declined_and_gated_models_refused_elsewhere() -> None:
    model, op, record, old = _dense_and_rank_8()
    old.opset_import[0].version = 11
    same, declined = build_gated(old, {op.name: op}, [([op], record)], (1, 0.5))
    assert same is old and "opset 13" in declined[0]
    gated, _ = build_gated(model, {op.name: op}, [([op], record)], (1, 0.5))
    refuse_gated(model, "lower")  # not gated: nothing to refuse
    with pytest.raises(QmpassInputError, match="lower does not take gated models"):
        refuse_gated(gated, "lower")


def test_a_model_with_its_own_budget_level_tensor_is_declined() -> None:
    _, op, record, taken = _dense_and_rank_8()
    taken.graph.input[0].name = GATED_INPUT  # the activation itself
    taken.graph.node[0].input[0] = GATED_INPUT
    refuse_gated(taken, "lower")  # an input of that name alone is not a gated model
    ops = {o.name: o for o in extract_operators(taken).operators}
    same, declined = build_gated(taken, ops, [([ops[op.name]], record)], (1, 0.5))
    assert same is taken and GATED_INPUT in declined[0]


def test_a_model_with_an_output_that_is_no_tensor_is_declined() -> None:
    _, op, record, listed = _dense_and_rank_8()
    listed.graph.node.append(helper.make_node("SequenceConstruct", ["y"], ["ys"]))
    del listed.graph.output[:]
    listed.graph.output.append(helper.make_tensor_sequence_value_info(
        "ys", onnx.TensorProto.FLOAT, None))
    same, declined = build_gated(listed, {op.name: op}, [([op], record)], (1, 0.5))
    assert same is listed and "'ys' is not a tensor" in declined[0]
    gated, declined = build_gated(listed, {op.name: op}, [([op], record)], (1, 0.5),
                                  "operator")  # its If chains are per operator
    assert not declined and gated is not listed

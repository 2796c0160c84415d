"""CrossLayerSharedBasis: MatMuls reading different tensors share one basis initializer.

The record (:class:`qmpass.algebra.CrossLayerBasis`) against numpy, its rule, the ONNX
printer in onnxruntime (one ``V`` consumed by one MatMul per input tensor), the fit of
:mod:`qmpass.plan.units.crosslayer` against the sample error it claims to measure, and
the planner keeping a shared basis only where it wins (and saying by how much it lost
where it does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import helper

import models
import qmpass
from qmpass import CompressConfig
from qmpass.algebra import CrossLayerBasis, crosslayer_basis_declines, decline_crosslayer_rank
from qmpass.extract import Operator, extract_operators
from qmpass.frg.crosslayer import CROSSLAYER_THRESHOLD
from qmpass.plan.plan import Cost, Plan, Step
from qmpass.plan.units import input_key, lowrank_candidate
from qmpass.plan.units.crosslayer import (
    crosslayer_candidates,
    crosslayer_outcomes,
    crosslayer_verified,
    pooled_projection,
    refine,
    shared_fit,
)
from qmpass.rewrite.base import export_like, name_nodes
from qmpass.rewrite.shared_basis_crosslayer import CrossLayerSharedBasis
from qmpass.verify import run_model

D = 16
RNG = np.random.default_rng(11)


def _chain(wa: np.ndarray, wb: np.ndarray, wc: np.ndarray | None = None) -> onnx.ModelProto:
    """``x -> A (+ba) -> Relu -> h``; ``h -> B (+bb) -> yb`` and, with ``wc``,
    ``h -> C -> yc`` (no bias): A reads ``x``, B and C read ``h``. Weights ``d_out x d_in``
    (stored transposed, as exporters write MatMuls)."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a0"], name="A"),
             helper.make_node("Add", ["a0", "ba"], ["ya"], name="A_bias"),
             helper.make_node("Relu", ["ya"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "B"], ["b0"], name="B"),
             helper.make_node("Add", ["b0", "bb"], ["yb"], name="B_bias")]
    inits = [const("A", wa.T), const("ba", RNG.standard_normal(wa.shape[0]) * 0.1),
             const("B", wb.T), const("bb", RNG.standard_normal(wb.shape[0]) * 0.1)]
    outputs = [tensor("yb", ["n", wb.shape[0]])]
    if wc is not None:
        nodes.append(helper.make_node("MatMul", ["h", "C"], ["yc"], name="C"))
        inits.append(const("C", wc.T))
        outputs.append(tensor("yc", ["n", wc.shape[0]]))
    return name_nodes(make_model(nodes, [tensor("x", ["n", D])], outputs, inits))


@dataclass(frozen=True)
class _Stats:
    mean: np.ndarray
    cov: np.ndarray
    max_norm: float


def _stats_of(rows: np.ndarray) -> _Stats:
    """Sample moments (the covariance normalised by n, as the errors' expectations)."""
    return _Stats(rows.mean(axis=0), np.cov(rows.T, bias=True),
                  float(np.linalg.norm(rows, axis=1).max()))


def _activations(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    tapped.graph.output.append(tensor("h", ["n", D]))
    return run_model(tapped, {"x": x})[-1]


def _ops(model: onnx.ModelProto) -> dict[str, Operator]:
    return {op.name: op for op in extract_operators(model).operators}


# -- the record and its rule ---------------------------------------------------------------------
def test_the_record_is_one_basis_with_each_members_coefficients() -> None:
    ops = _ops(_chain(trained_matrix(D, D), trained_matrix(D, D)[::-1], trained_matrix(8, D)))
    members = [ops["A"], ops["B"], ops["C"]]
    q = 5
    first = RNG.standard_normal((q, D))
    second = RNG.standard_normal((D + D + 8, q))
    bias = RNG.standard_normal(D + D + 8)
    step = Step("crosslayer_basis", ("A", "B", "C"), Cost(0, 0), Cost(0, 0), 0.0, rank=q)
    record = CrossLayerBasis.of(step, members, {"first": first, "second": second,
                                                "bias": bias})
    assert record.readers == ((0,), (1, 2))  # A reads x; B and C read h
    x = RNG.standard_normal((7, D))
    for index, (lo, hi) in enumerate([(0, D), (D, 2 * D), (2 * D, 2 * D + 8)]):
        expected = x @ (second[lo:hi] @ first).T + bias[lo:hi]
        np.testing.assert_allclose(record.member(index)(x), expected, rtol=1e-12)
    fused = record.reader(1)
    assert fused.sizes == (D, 8) and fused.first is record.first
    np.testing.assert_allclose(fused.fused(x), x @ (second[D:] @ first).T + bias[D:])
    assert record.stored == q * D + q * (2 * D + 8)
    with pytest.raises(ValueError, match="tensor 'first' has shape"):
        CrossLayerBasis.of(step, members, {"first": first[:, :3], "second": second,
                                           "bias": bias})


def test_the_rule_wants_two_tensors_of_one_width() -> None:
    ops = _ops(_chain(trained_matrix(D, D), trained_matrix(D, D)[::-1], trained_matrix(8, D)))
    assert crosslayer_basis_declines([ops["A"], ops["B"]]) is None
    assert "one tensor" in (crosslayer_basis_declines([ops["B"], ops["C"]]) or "")
    assert "two or more" in (crosslayer_basis_declines([ops["A"]]) or "")
    assert "more than once" in (crosslayer_basis_declines([ops["A"], ops["A"]]) or "")
    wide = _ops(_chain(trained_matrix(D, D), trained_matrix(D, D)))
    other = _ops(make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="W")],
                            [tensor("x", ["n", 8])], [tensor("y", ["n", 4])],
                            [const("W", trained_matrix(4, 8).T)]))
    assert "input width" in (crosslayer_basis_declines([wide["A"], other["W"]]) or "")
    # 16 -> 16 twice over two tensors: rank 8 saves no work (8*(2*16+32) = 16*32)
    assert decline_crosslayer_rank(7, D, [D, D], 2) is None
    assert "saves no work" in (decline_crosslayer_rank(8, D, [D, D], 2) or "")
    assert "saves no weights" in (decline_crosslayer_rank(11, D, [D, D], 1) or "")


# -- the ONNX printer ------------------------------------------------------------------------------
def _rewrite(model: onnx.ModelProto, step: Step, tensors: dict[str, np.ndarray]
             ) -> tuple[onnx.ModelProto, str | None]:
    graph = gs.import_onnx(model)
    rewrite, ops = CrossLayerSharedBasis(), _ops(model)
    reason = rewrite.check(graph, step, ops) or rewrite.check_tensors(step, ops, tensors)
    if reason is None:
        rewrite.apply(graph, step, ops, tensors)
    return export_like(graph, model), reason


def test_one_basis_initializer_is_read_by_a_matmul_per_tensor() -> None:
    model = _chain(trained_matrix(D, D), trained_matrix(D, D)[::-1], trained_matrix(8, D))
    ops = _ops(model)
    members = [ops["A"], ops["B"], ops["C"]]
    x = RNG.standard_normal((64, D)).astype(np.float32)
    stats = [_stats_of(x.astype(np.float64)), *[_stats_of(_activations(model, x))] * 2]
    q = 5
    fit = shared_fit(members, stats, pooled_projection(members, stats).factors(q)[0])
    tensors = {"first": fit.first, "second": fit.second, "bias": fit.bias}
    step = Step("crosslayer_basis", ("A", "B", "C"), Cost(0, 0), Cost(0, 0), 0.0, rank=q)
    rewritten, reason = _rewrite(model, step, tensors)
    assert reason is None
    onnx.checker.check_model(rewritten, full_check=True)
    basis = [i.name for i in rewritten.graph.initializer if tuple(i.dims) == (D, q)]
    assert len(basis) == 1  # V stored once ...
    readers = [n for n in rewritten.graph.node if basis[0] in n.input]
    assert [n.op_type for n in readers] == ["MatMul", "MatMul"]  # ... read once per tensor
    assert {n.input[0] for n in readers} == {"x", "h"}
    assert sum(n.op_type == "Split" for n in rewritten.graph.node) == 1  # B and C fused
    # onnxruntime computes the record: A's new output feeds the Relu B and C read
    record = CrossLayerBasis.of(step, members, tensors)
    h = np.maximum(record.member(0)(x.astype(np.float64)), 0.0)
    got = run_model(rewritten, {"x": x})
    np.testing.assert_allclose(got[0], record.member(1)(h), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], record.member(2)(h), rtol=1e-4, atol=1e-4)


def test_the_printer_declines_with_a_reason() -> None:
    model = _chain(trained_matrix(D, D), trained_matrix(D, D)[::-1], trained_matrix(8, D))
    tensors = {"first": np.ones((3, D)), "second": np.ones((40, 3)), "bias": np.zeros(40)}

    def step(names: tuple[str, ...], rank: int = 3, kind: str = "crosslayer_basis") -> Step:
        return Step(kind, names, Cost(0, 0), Cost(0, 0), 0.0, rank=rank)  # type: ignore[arg-type]

    assert "not a cross-layer" in (_rewrite(model, step(("A", "B"), kind="lowrank"),
                                            tensors)[1] or "")
    assert "one tensor" in (_rewrite(model, step(("B", "C")), tensors)[1] or "")
    assert "not extracted" in (_rewrite(model, step(("A", "Z")), tensors)[1] or "")
    assert "saves no" in (_rewrite(model, step(("A", "B", "C"), rank=12), tensors)[1] or "")
    assert "shape" in (_rewrite(model, step(("A", "B")), tensors)[1] or "")


# -- the fit and the planner -----------------------------------------------------------------------
def test_the_fit_measures_the_sample_error_it_reports() -> None:
    model = _chain(trained_matrix(D, D), trained_matrix(12, D))
    ops = _ops(model)
    members = [ops["A"], ops["B"]]
    x = (RNG.standard_normal((200, D)) @ RNG.standard_normal((D, D))).astype(np.float32)
    inputs = [x.astype(np.float64), _activations(model, x).astype(np.float64)]
    stats = [_stats_of(rows) for rows in inputs]
    fit = shared_fit(members, stats, pooled_projection(members, stats).factors(4)[0])
    lo = 0
    for op, rows, error in zip(members, inputs, fit.errors, strict=True):
        second, bias = fit.second[lo:lo + op.shape[0]], fit.bias[lo:lo + op.shape[0]]
        lo += op.shape[0]
        exact = rows @ op.weight.T + op.bias
        approx = rows @ (second @ fit.first).T + bias
        centred = (rows - rows.mean(axis=0)) @ op.weight.T
        measured = np.sum((exact - approx) ** 2) / np.sum(centred**2)
        assert error == pytest.approx(measured, rel=1e-9)
        # the coefficients are the member's own least-squares optimum for the basis
        z = np.hstack([rows @ fit.first.T, np.ones((len(rows), 1))])
        best = np.linalg.lstsq(z, exact, rcond=None)[0]
        np.testing.assert_allclose(second.T, best[:-1], atol=1e-6 * np.abs(best).max())
        # and each member's output moves within the certificate's bound
        moved = np.linalg.norm(exact - approx, axis=1).max()
        assert moved <= fit.certificate["bound"] * (1 + 1e-9)


def _units(model: onnx.ModelProto, stats: dict[str, _Stats]):  # type: ignore[no-untyped-def]
    ops = _ops(model)
    candidates = [lowrank_candidate([ops[n]], stats[input_key(ops[n]).key], 1, fused=False)
                  for n in ("A", "B")]
    return ops, [c for c in candidates if c is not None]


def test_identical_operators_share_and_the_gain_is_recorded() -> None:
    """Two copies of one matrix reading equally distributed tensors: a shared basis of
    width q is exact where each copy's rank q is, for 3/4 of the parameters."""
    w = trained_matrix(D, D)
    model = _chain(w, w)
    ops = _ops(model)
    same = _stats_of(np.abs(RNG.standard_normal((400, D))))
    stats = {input_key(ops[n]).key: same for n in ("A", "B")}
    ops, base = _units(model, stats)
    merged, proposals = crosslayer_candidates(base, ops, stats, 1)
    assert len(proposals) == 1 and proposals[0].reason is None
    assert proposals[0].bures < CROSSLAYER_THRESHOLD  # the QM-FRG proposed it (biases differ)
    (unit,) = merged
    assert unit.key.startswith("crosslayer:") and set(unit.operators) == {"A", "B"}
    shared = [v for v in unit.variants[1:] if v.label > 0]
    measured = {m[0]: m for m in proposals[0].measured}
    assert all(v.error < measured[v.label][3] for v in shared)  # only winners are offered
    assert {2, 3, 4} <= {v.label for v in shared}  # rank 1 ties the cheapest separate
    (step, _), = shared[2].build()
    outcome, = crosslayer_outcomes(proposals, [step])
    assert outcome["status"] == "shared" and outcome["gain"] > 0
    assert outcome["error"] == pytest.approx(step.predicted_error)
    plan = Plan("m", "qmfrg", {"keep": 0.5}, Cost(1, 1), (step,), shared_bases=(outcome,))
    assert Plan.from_json(plan.to_json()) == plan


def test_operators_on_disjoint_inputs_are_declined_with_the_loss() -> None:
    """A acts on the first half of its input, B on the second: one basis must hold both
    halves, so sharing costs more for the same error at every rank."""
    a = np.zeros((D, D))
    b = np.zeros((D, D))
    half = D // 2
    a[:, :half] = trained_matrix(D, half)
    b[:, half:] = trained_matrix(D, half)[::-1]
    model = _chain(a, b)
    ops = _ops(model)
    iid = _stats_of(RNG.standard_normal((400, D)))
    stats = {input_key(ops[n]).key: iid for n in ("A", "B")}
    ops, base = _units(model, stats)
    merged, proposals = crosslayer_candidates(base, ops, stats, 1, threshold=math.pi / 2)
    assert merged == base  # the units are left as they were
    (proposal,) = proposals
    assert proposal.reason is not None and "loses at every rank" in proposal.reason
    assert all(error >= separate for _, _, error, separate in proposal.measured)
    (outcome,) = crosslayer_outcomes(proposals, [])
    assert outcome["status"] == "declined" and outcome["measured"]


def test_no_calibration_changes_nothing() -> None:
    model = _chain(trained_matrix(D, D), trained_matrix(D, D))
    ops = _ops(model)
    base = [c for c in (lowrank_candidate([ops[n]], None, 1, fused=False) for n in "AB")
            if c is not None]
    assert crosslayer_candidates(base, ops, None, 1) == (base, [])


# -- the trained transformer, end to end -------------------------------------------------------
MLP_IN = ("/layers/layers.0/mlp/mlp.0/MatMul", "/layers/layers.1/mlp/mlp.0/MatMul")


def test_analyze_lists_the_cross_layer_candidates() -> None:
    analysis = qmpass.analyze(fixture_path("transformer_digits"),
                              qmpass.AnalysisConfig(progress=False))
    candidates = analysis.to_dict()["crosslayer_candidates"]
    assert candidates[0]["operators"] == list(MLP_IN)  # the closest pair of layers
    assert 0.5 < candidates[0]["bures"] < 0.6
    assert all(c["bures"] <= CROSSLAYER_THRESHOLD for c in candidates)
    assert [c["bures"] for c in candidates] == sorted(c["bures"] for c in candidates)


def test_compress_records_every_group_and_prints_the_shared_ones() -> None:
    original = onnx.load(str(fixture_path("transformer_digits")))
    calib = models.load_calib("transformer_digits")
    model, report = qmpass.compress(original, CompressConfig(keep=0.75, calib=calib))
    rows = report.to_dict()["shared_bases"]
    assert rows[0]["operators"] == list(MLP_IN)
    assert rows[0]["status"] != "declined"  # the MLP inputs share for less at some rank
    assert any(m["error"] < m["separate_error"] for m in rows[0]["measured"])
    for row in rows:
        if row["status"] == "declined":
            assert "loses at every rank" in row["reason"]
            assert all(m["error"] >= m["separate_error"] for m in row["measured"])
        if row["status"] == "shared":
            assert row["gain"] == pytest.approx(row["separate_error"] - row["error"])
            assert row["gain"] > 0
    shared = [s for s in report.plan.steps if s.kind == "crosslayer_basis"]
    assert len(shared) == sum(r["status"] == "shared" for r in rows)
    ops = {op.name: op for op in extract_operators(original).operators}
    for step in shared:  # printed: one basis initializer read by a MatMul per tensor
        tensors = {ops[n].input for n in step.operators}
        readers = [[n.input[0] for n in model.graph.node
                    if n.op_type == "MatMul" and n.input[1] == i.name]
                   for i in model.graph.initializer if tuple(i.dims) == (64, step.rank)]
        assert sorted(tensors) in [sorted(r) for r in readers]
    assert abs(report.to_dict()["keep_achieved"] - 0.75) <= 0.03
    # the model output decides between the plans with and without cross-layer bases
    alternatives = report.to_dict()["alternatives"]
    assert "prune without cross-layer bases" in alternatives and "prune" in alternatives
    chose_shared = alternatives["prune"] <= alternatives["prune without cross-layer bases"]
    assert bool(shared) == chose_shared
    assert any(r["status"] == ("shared" if chose_shared else "not_kept") for r in rows)
    _, without = qmpass.compress(original, CompressConfig(keep=0.75, calib=calib,
                                                          crosslayer=False))
    assert without.plan.shared_bases == ()
    assert all(s.kind != "crosslayer_basis" for s in without.plan.steps)



def test_a_basis_turned_down_by_verification_says_both_errors() -> None:
    rows = ({"operators": ["A", "B"], "status": "shared", "rank": 4},
            {"operators": ["A", "B", "C"], "status": "declined", "reason": "loses"})
    marked = crosslayer_verified(rows, 0.02, 0.015)
    assert marked[0]["status"] == "not_kept" and "0.02 against 0.015" in marked[0]["reason"]
    assert marked[1] == rows[1] and rows[0]["status"] == "shared"  # a copy


def test_refining_the_basis_under_each_members_covariance_never_loses() -> None:
    """Members whose inputs vary along different directions: the pooled whitening is a
    compromise that the alternating refit improves on; it never makes a fit worse."""
    model = _chain(trained_matrix(D, D), trained_matrix(D, D)[::-1])
    ops = _ops(model)
    members = [ops["A"], ops["B"]]
    scales = np.linspace(0.1, 3.0, D)
    inputs = [RNG.standard_normal((500, D)) * scales, RNG.standard_normal((500, D)) * scales[::-1]]
    stats = [_stats_of(rows) for rows in inputs]
    projection = pooled_projection(members, stats)
    for q in (3, 6, 9):
        pooled = shared_fit(members, stats, projection.factors(q)[0])
        refined = refine(members, stats, pooled)
        assert refined.errors.sum() <= pooled.errors.sum()
        assert refined.first.shape == (q, D) and refined.second.shape == (2 * D, q)
    assert refined.errors.sum() < 0.95 * pooled.errors.sum()  # a real gain, at least at 9

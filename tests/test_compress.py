"""``qmpass.compress`` end to end: every fixture, verification and rollback, awkward graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import helper, numpy_helper

import models
import qmpass
from qmpass import CompressConfig, QmpassInputError
from qmpass.compress.calibration import split_feeds
from qmpass.verify import Verifier, accuracy, compare, load_calib, run_model

TOLERANCE = 0.05


def _calib(name: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return load_calib(models.MODELS_DIR / f"{name}_calib.npz", model)


@pytest.mark.parametrize("name", models.FIXTURES)
def test_every_fixture_at_keep_half_is_smaller_valid_and_within_tolerance(name: str) -> None:
    original = onnx.load(str(fixture_path(name)))
    calib = _calib(name, original)
    model, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib))
    doc = report.to_dict()

    assert doc["params_after"] < doc["params_before"]
    assert doc["flops_after"] < doc["flops_before"]
    onnx.checker.check_model(model, full_check=True)
    assert [i.SerializeToString() for i in model.graph.input] == \
        [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in model.graph.output] == \
        [o.SerializeToString() for o in original.graph.output]
    assert model.ir_version == original.ir_version
    assert list(model.opset_import) == list(original.opset_import)

    # the report's verification is what onnxruntime measures independently, on the
    # held-out part of the calibration inputs (and, separately, on the part that fitted)
    split = split_feeds(original, calib, CompressConfig.holdout, 0)
    assert split.samples[0] + split.samples[1] == len(calib["input"]) and split.samples[1] > 0
    for key, feeds in (("verification", split.held_out), ("verification_fit", split.fit)):
        measured = compare(run_model(original, feeds), run_model(model, feeds),
                           len(feeds["input"]))
        assert doc[key]["relative_error"] == pytest.approx(measured.relative_error,
                                                           rel=1e-4, abs=1e-7)
    assert doc["verification"]["inputs"] == split.samples[1]
    assert doc["budget_mode"] == "budget"  # --keep alone: every planned step is kept
    assert abs(doc["keep_achieved"] - 0.5) <= 0.03
    kept = [r for r in doc["rewrites"] if r["status"] == "kept"]
    assert kept and all({"kind", "operators", "rank", "certificate"} <= set(r) for r in kept)
    assert all(r["certificate"]["op_norm"] >= 0 for r in kept)
    # the held-out split, which neither planning nor verification saw
    x, y = models.load_test_split(name)
    before = accuracy(original, {"input": x}, y)
    assert accuracy(model, {"input": x}, y) >= before - 0.05


def test_the_plan_round_trips_through_json() -> None:
    original = onnx.load(str(fixture_path("transformer_digits")))
    _, report = qmpass.compress(original, CompressConfig(keep=0.5,
                                                         calib=_calib("transformer_digits",
                                                                      original)))
    plan = report.plan
    assert type(plan).from_json(plan.to_json()) == plan
    assert {s.kind for s in plan.steps} == {"shared_basis", "lowrank"}


def test_a_broken_tolerance_rolls_everything_back() -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    model, report = qmpass.compress(original, CompressConfig(keep=0.3, tolerance=0.0))
    statuses = {o.status for o in report.outcomes}
    assert statuses == {"rolled_back"}
    assert all("exceeds the tolerance 0" in (o.reason or "") for o in report.outcomes)
    assert report.verification.relative_error == 0.0
    feeds = {"input": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(model, feeds)[0], run_model(original, feeds)[0])


def _rolled_back_in_part():
    """The transformer at ``--keep 0.3 --tolerance 0.02``: some units kept, some rolled
    back (checked here)."""
    original = onnx.load(str(fixture_path("transformer_digits")))
    calib = _calib("transformer_digits", original)
    model, report = qmpass.compress(original, CompressConfig(keep=0.3, tolerance=0.02,
                                                             calib=calib))
    statuses = {o.status for o in report.outcomes}
    assert "rolled_back" in statuses and "kept" in statuses
    return original, calib, model, report


def test_each_kept_rewrite_respects_an_intermediate_tolerance() -> None:
    original, calib, model, report = _rolled_back_in_part()
    assert report.verification.relative_error <= 0.02
    doc = report.to_dict()
    assert 0.3 < doc["keep_achieved"] < 1.0  # backed off from the budget, not all the way
    measured = compare(run_model(original, calib), run_model(model, calib), 64)
    assert measured.relative_error <= 0.02


def test_weights_in_constant_nodes_are_rewritten() -> None:
    w1, w2 = trained_matrix(64, 64), trained_matrix(32, 64)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1.T, "w1")),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="second"),
    ]
    original = make_model(nodes, [tensor("x", ["batch", 64])], [tensor("y", ["batch", 32])],
                          [const("w2", w2.T)])
    model, report = qmpass.compress(original, CompressConfig(method="svd", keep=0.6,
                                                             tolerance=1.0))
    changed = {name for o in report.kept for name in o.step.operators}
    assert "first" in changed
    assert not any(n.op_type == "Constant" for n in model.graph.node)  # w1 replaced
    onnx.checker.check_model(model, full_check=True)


def test_operators_inside_subgraphs_are_left_untouched_and_say_so() -> None:
    w = trained_matrix(64, 64)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"], name="inner")], "then", [],
        [tensor("z", ["batch", 64])])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z2"])], "else", [], [tensor("z2", ["batch", 64])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other),
    ]
    original = make_model(nodes, [tensor("x", ["batch", 64])], [tensor("y", ["batch", 64])],
                          [const("w", w.T), numpy_helper.from_array(np.float32(0), "zero")])
    _, report = qmpass.compress(original, CompressConfig(keep=0.5))
    reasons = dict(report.plan.declined)
    assert "subgraph" in reasons["inner"]
    assert not report.outcomes


def test_bad_configuration_and_calibration_raise_input_errors() -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    for kwargs in ({"keep": 0.0}, {"keep": 1.5}, {"delta": -1.0}, {"keep": 0.5, "delta": 0.1},
                   {"tolerance": -1.0}, {"method": "nope"}, {"align": 0}):
        with pytest.raises(QmpassInputError):
            CompressConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(QmpassInputError, match="input"):
        qmpass.compress(original, CompressConfig(keep=0.5, calib={"wrong": np.zeros((2, 64))}))


def test_external_data_models_are_compressed_and_written_whole(tmp_path) -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    path = tmp_path / "external.onnx"
    onnx.save_model(original, str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    model, report = qmpass.compress(path, CompressConfig(keep=0.5, tolerance=1.0))
    assert report.kept
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)


def test_calibrated_qmfrg_keeps_the_better_treatment_of_convolutions() -> None:
    original = onnx.load(str(fixture_path("resnet_digits")))
    calib = _calib("resnet_digits", original)
    kinds = {}
    for keep in (0.3, 0.9):
        _, report = qmpass.compress(original, CompressConfig(keep=keep, calib=calib,
                                                             tolerance=float("inf")))
        errors = report.to_dict()["conv_alternatives"]
        assert set(errors) == {"prune", "factorise"}
        everything = report.to_dict()["alternatives"]  # with the refitted variants
        assert set(everything) >= set(errors)
        assert report.verification.relative_error == pytest.approx(min(everything.values()))
        kinds[keep] = {o.step.kind for o in report.outcomes}
        chosen = min(everything, key=everything.__getitem__).removesuffix("+refit")
        assert kinds[keep] == {"prune": {"prune_channels"}, "factorise": {"lowrank"}}[chosen]
    # many parameters left: factorising loses less on the held-out inputs (at 0.3 which
    # wins depends on the split: measured, not assumed)
    assert kinds[0.9] == {"lowrank"}


def test_when_the_tolerance_binds_the_treatment_that_ends_smaller_wins() -> None:
    original = onnx.load(str(fixture_path("resnet_digits")))
    calib = _calib("resnet_digits", original)
    sizes = {}
    for convs in ("auto", "prune", "factorise"):
        _, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib, convs=convs,
                                                             tolerance=TOLERANCE))
        assert report.verification.relative_error <= TOLERANCE
        sizes[convs] = report.to_dict()["params_after"]
    assert sizes["auto"] == min(sizes["prune"], sizes["factorise"])
    assert sizes["auto"] < sizes["prune"] or sizes["auto"] < sizes["factorise"]


def test_metadata_of_graph_inputs_and_outputs_survives() -> None:
    """The dynamo exporter (IR 10) annotates inputs and outputs; onnx-graphsurgeon drops
    the annotations, so the rewritten model must take them back from the original."""
    original = onnx.load(str(fixture_path("mlp_digits")))
    original.ir_version = 10
    for value in (*original.graph.input, *original.graph.output):
        value.metadata_props.add(key="pkg.torch.onnx.original_node_name", value=value.name)
    original.graph.metadata_props.add(key="exporter", value="test")
    model, report = qmpass.compress(original, CompressConfig(keep=0.5, tolerance=1.0))
    assert report.kept
    assert list(model.graph.input) == list(original.graph.input)
    assert list(model.graph.output) == list(original.graph.output)
    assert list(model.graph.metadata_props) == list(original.graph.metadata_props)


def test_rolled_back_steps_get_one_row_each_with_their_attempts() -> None:
    """One report row per planned step, not one per verification: the attempts (the
    planned variant, then milder ones) are listed in the row."""
    original = onnx.load(str(fixture_path("mlp_digits")))
    _, report = qmpass.compress(original, CompressConfig(keep=0.3, tolerance=0.0))
    planned = report.plan.steps
    assert len(planned) >= 2
    assert len(report.outcomes) == len(planned)
    assert sorted(o.step.operators for o in report.outcomes) == \
        sorted(s.operators for s in planned)
    assert all(o.step in planned for o in report.outcomes)
    rows = report.to_dict()["rewrites"]
    assert len(rows) == len(planned)
    for outcome, row in zip(report.outcomes, rows, strict=True):
        assert outcome.status == "rolled_back"
        assert outcome.attempts and outcome.attempts[0].steps == (outcome.step,)
        assert all(a.relative_error > 0.0 for a in outcome.attempts)
        assert len(row["attempts"]) == len(outcome.attempts)
        assert row["attempts"][0] == {"kind": "lowrank", "rank": outcome.step.rank,
                                      "relative_error": outcome.attempts[0].relative_error}
        # milder variants: higher ranks of the same operator
        ranks = [a["rank"] for a in row["attempts"]]
        assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert any(len(o.attempts) > 1 for o in report.outcomes)
    assert report.plan.notes == ()  # the planner met its budget; the tolerance did not:
    assert any(n.startswith("--keep 0.3 was not met") for n in report.to_dict()["notes"])


def test_identical_conv_plans_are_verified_once(monkeypatch) -> None:
    """Without convolutions, pruning and factorising them plan the same: the plan is
    verified once, not twice and then compared."""
    original = onnx.load(str(fixture_path("mlp_digits")))
    calib = _calib("mlp_digits", original)
    runs = []
    check = Verifier.check

    def counted(self, model):
        runs.append(model)
        return check(self, model)

    monkeypatch.setattr(Verifier, "check", counted)
    _, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib, refit="off",
                                                         tolerance=float("inf"),
                                                         pricing="layer"))  # no probes
    assert CompressConfig(calib=calib).conv_choices() == ("prune", "factorise")
    assert report.to_dict()["conv_alternatives"] == {}
    assert len(runs) == 2  # the plan on the held-out inputs; the result on the fitting ones
    assert all(len(o.attempts) == 1 for o in report.outcomes)


def test_a_plan_of_many_units_is_bisected_to_a_passing_prefix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``BISECT_UNITS`` units, rollback costs about 2 log2(units) model runs at most:
    the units of least predicted error are kept up to a prefix that verifies."""
    from qmpass.compress import rollback
    from qmpass.verify import Verifier

    monkeypatch.setattr(rollback, "BISECT_UNITS", 0)
    calls: list[list[int]] = []  # per search: its unit count, its verifications
    original_check, original_search = Verifier.check, rollback._search

    def check(self, model):
        if calls:
            calls[-1][1] += 1
        return original_check(self, model)

    def search(applier, verifier, planned, units, *rest):
        calls.append([len(units), 0])
        try:
            return original_search(applier, verifier, planned, units, *rest)
        finally:
            calls.append([0, 0])  # checks after it are not its own

    monkeypatch.setattr(Verifier, "check", check)
    monkeypatch.setattr(rollback, "_search", search)
    original, calib, model, report = _rolled_back_in_part()
    statuses = [o.status for o in report.outcomes]
    assert statuses == sorted(statuses)  # "kept" (a prefix) before "rolled_back"
    assert report.verification.relative_error <= 0.02
    rolled = [o for o in report.outcomes if o.status == "rolled_back"]
    assert all("bisected" in (o.reason or "") and o.attempts[0].relative_error > 0.02
               for o in rolled)
    kept = [o for o in report.outcomes if o.status == "kept"]
    assert max(o.step.predicted_error for o in kept) <= max(
        o.step.predicted_error for o in rolled)
    searches = [(units, runs) for units, runs in calls if units]
    assert searches
    for units, runs in searches:  # doubling the prefix, then halving
        assert runs <= 2 * math.ceil(math.log2(units)) + 2
    measured = compare(run_model(original, calib), run_model(model, calib), 64)
    assert measured.relative_error <= 0.02

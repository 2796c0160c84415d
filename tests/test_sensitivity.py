"""Pricing units by what the model's output feels (qmpass.compress.sensitivity), the
uniform baselines, and spending what the Lagrangian leaves of a budget."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from qmpass import CompressConfig, compress
from qmpass.compress import pipeline
from qmpass.compress.sensitivity import Gain
from qmpass.extract import extract_operators
from qmpass.extract.channels import channel_groups
from qmpass.modelio import stored_values
from qmpass.plan.allocation import exact_cost
from qmpass.plan.budget import lower_hull
from qmpass.plan.planner import PlanConfig, make_plan
from qmpass.plan.resource import PARAMS
from qmpass.rewrite.base import name_nodes
from qmpass.verify import compare, run_model

DIM = 32


def _matrix(rng: np.random.Generator, decay: float) -> np.ndarray:
    """A DIM x DIM matrix with singular values decaying as ``decay ** i``."""
    u, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    v, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    return ((u * decay ** np.arange(DIM)) @ v.T).astype(np.float32)


def _damped_branch_model() -> onnx.ModelProto:
    """``out = h + 0.01 * (h @ W2)`` with ``h = x @ W1``: W2's errors reach the output
    damped a hundredfold, which its own relative error cannot tell."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w2"], ["g"], name="second"),
        helper.make_node("Mul", ["g", "damp"], ["gd"], name="damp"),
        helper.make_node("Add", ["h", "gd"], ["out"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "damped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(_matrix(rng, 0.9), "w1"),
         numpy_helper.from_array(_matrix(rng, 0.9), "w2"),
         numpy_helper.from_array(np.array(0.01, np.float32), "damp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inputs(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.normal(size=(count, DIM)) * np.linspace(2.0, 0.2, DIM))
            .astype(np.float32)}


def test_the_damped_unit_has_the_smaller_gain_and_gives_up_more_rank() -> None:
    model = _damped_branch_model()
    calib, unseen = _inputs(128, 1), _inputs(256, 2)
    reference = run_model(model, unseen)
    results = {}
    for pricing in ("output", "layer"):
        out, report = compress(model, CompressConfig(keep=0.5, calib=calib, align=1,
                                                     pricing=pricing))  # type: ignore[arg-type]
        ranks = {s.operators[0]: s.rank for s in report.plan.steps}
        error = compare(reference, run_model(out, unseen), 256).relative_error
        results[pricing] = (ranks, error, report)
    ranks, error, report = results["output"]
    gains = {g["unit"]: g["gain"] for g in report.to_dict()["gains"]}
    assert report.to_dict()["pricing"] == "output"
    assert gains["lowrank:second"] < 0.01 * gains["lowrank:first"]
    assert ranks.get("first", DIM) > ranks["second"]
    layer_ranks, layer_error, _ = results["layer"]
    assert ranks["second"] < layer_ranks["second"]  # the layer pricing cannot tell
    assert error < 0.8 * layer_error  # on inputs the plan never saw


def test_auto_pricing_falls_back_to_layer_pricing_when_probes_are_projected_too_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = _damped_branch_model(), _inputs(128, 1)
    config = CompressConfig(keep=0.5, calib=calib, align=1)
    assert config.pricing == "auto"
    _, fast = compress(model, config)
    assert fast.to_dict()["pricing"] == "output"
    monkeypatch.setattr(pipeline, "PROBE_SECONDS", 0.0)  # any projection passes it
    _, slow = compress(model, config)
    _, layer = compress(model, replace(config, pricing="layer"))
    assert slow.to_dict()["pricing"] == "layer"
    assert any("--pricing auto priced the units by their own error" in n
               for n in slow.notes)
    assert [s.rank for s in slow.plan.steps] == [s.rank for s in layer.plan.steps]
    _, forced = compress(model, replace(config, pricing="output"))  # no limit
    assert forced.to_dict()["pricing"] == "output"


def test_a_gain_is_the_squared_output_error_per_predicted_error() -> None:
    gain = Gain("u", 8, predicted=0.04, output_error=0.1)
    assert gain.value == pytest.approx(0.25)
    assert Gain("u", 8, 0.04, float("nan")).to_dict()["output_error"] is None


def _planned(name: str, config: PlanConfig):
    model = name_nodes(onnx.load(str(models.fixture_path(name))))
    extraction = extract_operators(model)
    groups = channel_groups(model)
    return make_plan(extraction, groups, stored_values(model), None, config), {
        op.name: op for op in extraction.operators}


def test_the_low_rank_baselines_keep_the_same_fraction_of_every_operator() -> None:
    planned, _ = _planned("transformer_digits", PlanConfig("svd", keep=0.5))
    fractions = [s.after.params / s.before.params for s in planned.plan.steps]
    square = [f for s, f in zip(planned.plan.steps, fractions, strict=True)
              if min(s.before.params, 4096) == 4096]
    assert square and max(square) - min(square) < 0.15
    lagrangian, _ = _planned("transformer_digits",
                             PlanConfig("svd", keep=0.5, allocation="lagrangian"))
    assert lagrangian.plan.steps != planned.plan.steps


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_no_milder_option_fits_in_what_the_plan_leaves(keep: float) -> None:
    """After the Lagrangian and the fill, no unit can move one step milder within the
    budget: what was left of it is less than any such step costs."""
    planned, ops = _planned("transformer_digits", PlanConfig("qmfrg", keep=keep, align=8))
    candidates = planned.candidates
    chosen = {c.key: 0 for c in candidates}
    chosen.update({u.candidate.key: u.chosen for u in planned.units})
    full = exact_cost(candidates, ops, dict.fromkeys(chosen, 0), PARAMS)
    spent = exact_cost(candidates, ops, chosen, PARAMS)
    assert spent <= keep * full + 0.5
    for c in candidates:
        now = c.variants[chosen[c.key]]
        for option in lower_hull(c.unit.options):
            if option.cost > now.cost and option.error < now.error:
                assert spent - now.cost + option.cost > keep * full + 0.5


def test_fixture_compress_reports_gains_on_fit_data_only() -> None:
    original = onnx.load(str(models.fixture_path("mlp_digits")))
    calib = models.load_calib("mlp_digits")
    _, report = compress(original, CompressConfig(keep=0.5, calib=calib))
    doc = report.to_dict()
    assert doc["pricing"] == "output" and doc["gains"]
    assert all(g["gain"] > 0 for g in doc["gains"])
    assert "sensitivity" in doc["seconds"]
    _, plain = compress(original, CompressConfig(keep=0.5))  # no data: nothing to measure
    assert plain.to_dict()["pricing"] == "layer"

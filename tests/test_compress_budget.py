"""Budgets that mean what they say, verified on inputs the plan never saw (issue 12).

``--keep`` alone is met; ``--tolerance`` alone finds the smallest model within it by a
search over the budget; both: the tolerance holds and the report says how far from the
budget it stopped (``--strict-budget`` makes that exit 2). The calibration inputs are
split: the tolerance applies to the held-out part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conformance import run_cli
from conftest import fixture_path

import models
import qmpass
from qmpass import CompressConfig, QmpassInputError
from qmpass.compress.calibration import split_feeds
from qmpass.compress.report import model_params
from qmpass.verify import compare, load_calib, run_model


def _calib(name: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return load_calib(models.MODELS_DIR / f"{name}_calib.npz", model)


@pytest.mark.parametrize("name", models.FIXTURES)
def test_keep_alone_is_met_on_every_fixture(name: str) -> None:
    original = onnx.load(str(fixture_path(name)))
    calib = _calib(name, original)
    for keep in (0.25, 0.75):
        _, report = qmpass.compress(original, CompressConfig(keep=keep, calib=calib))
        doc = report.to_dict()
        assert doc["budget_mode"] == "budget"
        assert abs(doc["keep_achieved"] - keep) <= 0.03, (keep, doc["keep_achieved"])
        assert all(r["status"] != "rolled_back" for r in doc["rewrites"])
        assert doc["verification"]["relative_error"] > 0.0  # the error it cost, reported


def test_tolerance_alone_finds_a_smaller_model_within_it_on_held_out_data() -> None:
    name, tolerance = "transformer_digits", 0.05
    original = onnx.load(str(fixture_path(name)))
    calib = _calib(name, original)
    searched, report = qmpass.compress(original, CompressConfig(tolerance=tolerance,
                                                                calib=calib))
    assert report.to_dict()["budget_mode"] == "search"
    # the tolerance holds on the held-out part, measured here independently
    held = split_feeds(original, calib, CompressConfig.holdout, 0).held_out
    measured = compare(run_model(original, held), run_model(searched, held),
                       len(held["input"]))
    assert measured.relative_error <= tolerance
    # smaller than the rollback-only path at the same tolerance (the default delta budget)
    rolled, _ = qmpass.compress(original, CompressConfig(delta=0.05, tolerance=tolerance,
                                                         calib=calib))
    assert model_params(searched) < model_params(rolled)


def test_both_given_the_tolerance_holds_and_the_shortfall_is_said(tmp_path: Path) -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    calib = _calib("mlp_digits", original)
    _, report = qmpass.compress(original, CompressConfig(keep=0.2, tolerance=0.01,
                                                         calib=calib))
    doc = report.to_dict()
    assert doc["verification"]["relative_error"] <= 0.01
    assert doc["keep_achieved"] > 0.2 + 0.03
    assert any(n.startswith("--keep 0.2 was not met") for n in doc["notes"])
    with pytest.raises(QmpassInputError, match="--strict-budget"):
        qmpass.compress(original, CompressConfig(keep=0.2, tolerance=0.01, calib=calib,
                                                 strict_budget=True))
    # on the command line: exit 2, one line, nothing written
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(original, str(path))
    npz = tmp_path / "c.npz"
    np.savez(npz, **calib)
    code, err = run_cli(["compress", str(path), "-o", str(out), "--keep", "0.2",
                         "--tolerance", "0.01", "--calib", str(npz), "--strict-budget"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_split_is_seeded_disjoint_and_reported() -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    calib = _calib("mlp_digits", original)
    n = len(calib["input"])
    split = split_feeds(original, calib, 0.25, 0)
    assert split.samples == (n - round(n * 0.25), round(n * 0.25))
    rows = {tuple(r) for r in split.fit["input"]}
    assert not rows & {tuple(r) for r in split.held_out["input"]}
    again = split_feeds(original, calib, 0.25, 0)
    np.testing.assert_array_equal(again.held_out["input"], split.held_out["input"])
    _, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib))
    doc = report.to_dict()
    assert doc["calibration_samples"] == {"fit": split.samples[0],
                                          "held_out": split.samples[1]}
    assert doc["verification_fit"] is not None


def test_inputs_that_cannot_be_split_or_are_synthesised_say_so() -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    one = {"input": _calib("mlp_digits", original)["input"][:1]}
    _, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=one))
    assert any("cannot be split" in n for n in report.to_dict()["notes"])
    _, report = qmpass.compress(original, CompressConfig(keep=0.5))
    assert any(n.startswith("no --calib") for n in report.to_dict()["notes"])


def test_refit_is_an_alternative_kept_only_where_it_verifies_better() -> None:
    """``--refit auto``: the plain and the refitted plan are both verified on the held-out
    inputs; the report keeps the better and lists both (``off``, the default: neither)."""
    original = onnx.load(str(fixture_path("resnet_digits")))
    calib = _calib("resnet_digits", original)
    _, report = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib,
                                                         convs="factorise", refit="auto"))
    alternatives = report.to_dict()["alternatives"]
    assert set(alternatives) == {"factorise", "factorise+refit"}
    assert report.verification.relative_error == pytest.approx(min(alternatives.values()))
    _, off = qmpass.compress(original, CompressConfig(keep=0.5, calib=calib,
                                                      convs="factorise"))
    assert off.to_dict()["alternatives"] == {}
    assert report.verification.relative_error <= off.verification.relative_error + 1e-12

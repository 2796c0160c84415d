"""Local verification (:mod:`qmpass.verify.local`): each rewrite's error alone, measured
on captured inputs, against the same figure taken from whole models by hand."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from conftest import fixture_path

import models
import qmpass
from qmpass import CompressConfig
from qmpass.compress import rollback
from qmpass.compress.calibration import split_feeds
from qmpass.extract import extract_operators
from qmpass.extract.channels import channel_groups
from qmpass.modelio import caller_form
from qmpass.rewrite.base import name_nodes
from qmpass.verify import load_calib
from qmpass.verify.local import boundaries, local_errors
from qmpass.verify.runner import session_with_tensors


def _case(name: str, keep: float, **options: object):
    original = onnx.load(str(fixture_path(name)))
    calib = load_calib(models.MODELS_DIR / f"{name}_calib.npz", original)
    model, report = qmpass.compress(original, CompressConfig(keep=keep, calib=calib,
                                                             **options))  # type: ignore[arg-type]
    named = name_nodes(caller_form(original))
    held_out = split_feeds(named, calib, 0.25, 0).held_out
    return named, calib, held_out, model, report


def test_a_first_layer_s_local_error_is_its_output_error_in_the_whole_models() -> None:
    """The MLP's first Gemm reads the graph input, so nothing upstream changes its input:
    its local error is the error of its output tensor between the two whole models."""
    named, _, held_out, model, report = _case("mlp_digits", 0.5)
    extraction = extract_operators(named)
    first = extraction.operators[0]
    kept = [o for o in report.outcomes if o.status == "kept"]
    assert kept and all(o.local_error is not None for o in kept)
    outcome = next(o for o in kept if o.step.operators == (first.name,))
    before = session_with_tensors(named, [first.output]).run([first.output], held_out)[0]
    after = session_with_tensors(model, [first.output]).run([first.output], held_out)[0]
    expected = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert outcome.local_error == pytest.approx(expected, rel=1e-4)
    assert 0 < expected < 1


def test_an_unrewritten_model_has_no_local_error() -> None:
    named, _, held_out, _, report = _case("transformer_digits", 0.5)
    steps = [o.step for o in report.outcomes]
    measured = boundaries(steps, extract_operators(named), channel_groups(named))
    assert measured
    errors = local_errors(named, named, measured, held_out)
    assert set(errors) == set(measured)
    assert max(errors.values()) == 0.0


def test_pruned_channels_are_measured_from_producer_to_consumers() -> None:
    named, _, held_out, model, report = _case("resnet_digits_bn", 0.5, convs="prune")
    pruned = [o for o in report.outcomes if o.status == "kept"
              and o.step.kind == "prune_channels"]
    assert pruned
    groups = channel_groups(named)
    measured = boundaries([o.step for o in pruned], extract_operators(named), groups)
    assert set(measured) == set(range(len(pruned)))
    errors = local_errors(named, model, measured, held_out)
    for index, outcome in enumerate(pruned):
        assert outcome.local_error == pytest.approx(errors[index])
        assert 0 < errors[index] < math.inf


def test_captures_are_batched_to_their_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound of one sample's captures gives the same errors, a sample at a time."""
    from qmpass.verify import local

    named, _, held_out, model, report = _case("transformer_digits", 0.5)
    steps = [o.step for o in report.outcomes if o.status == "kept"]
    measured = boundaries(steps, extract_operators(named), channel_groups(named))
    whole = local_errors(named, model, measured, held_out)
    monkeypatch.setattr(local, "CAPTURE_BYTES", 1)
    sizes: list[int] = []
    original_run = local.run_batched

    def run_batched(sess, feeds, *args, **kwargs):
        sizes.append(len(next(iter(feeds.values()))))
        return original_run(sess, feeds, *args, **kwargs)

    monkeypatch.setattr(local, "run_batched", run_batched)
    assert local_errors(named, model, measured, held_out) == pytest.approx(whole, rel=1e-6)
    assert set(sizes) == {1}


def test_no_calibration_no_local_errors() -> None:
    original = onnx.load(str(fixture_path("mlp_digits")))
    _, report = qmpass.compress(original, CompressConfig(keep=0.5))
    assert all(o.local_error is None for o in report.outcomes)
    assert all("local_error" not in row for row in report.to_dict()["rewrites"])


def test_a_bisection_takes_units_by_their_local_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the local measure, a bisection orders units by it (here reversed from the
    predicted order by a stand-in measure); tolerance 0 rolls every unit back, and the
    reasons number them in that order."""
    monkeypatch.setattr(rollback, "BISECT_UNITS", 0)
    calls: list[int] = []

    def measured_locally(outcomes, model, local):
        return list(outcomes)

    original_apply = rollback.apply_verified

    def apply_verified(applier, verifier, planned, tolerance, first, local=None):
        def reversed_local(model, steps):
            calls.append(len(steps))
            return {i: 1.0 - step.predicted_error for i, step in enumerate(steps)}
        return original_apply(applier, verifier, planned, tolerance, first,
                              reversed_local if local is not None else None)

    from qmpass.compress import pipeline
    monkeypatch.setattr(pipeline, "apply_verified", apply_verified)
    monkeypatch.setattr(pipeline, "measured_locally", measured_locally)
    *_, report = _case("transformer_digits", 0.5, tolerance=0.0)
    assert calls
    rolled = [o for o in report.outcomes if o.status == "rolled_back"]
    assert rolled
    least: dict[int, float] = {}  # unit number -> its steps' least predicted error
    for outcome in rolled:
        number = int(re.search(r"this is unit (\d+)", outcome.reason or "")[1])
        least[number] = min(least.get(number, math.inf), outcome.step.predicted_error)
    in_order = [least[number] for number in sorted(least)]
    assert len(in_order) > 2 and in_order == sorted(in_order, reverse=True)


def test_a_boundary_that_cannot_run_is_left_out_and_the_others_measured() -> None:
    """A boundary whose feeds do not fit (here: a narrowing to a channel that does not
    exist) fails the model of them all; each is then measured alone, and only it is
    left out (no traceback for the user)."""
    from dataclasses import replace

    named, _, held_out, model, report = _case("transformer_digits", 0.5)
    steps = [o.step for o in report.outcomes if o.status == "kept"]
    measured = boundaries(steps, extract_operators(named), channel_groups(named))
    first = min(measured)
    broken = dict(measured)
    broken[first] = replace(measured[first], narrowed=(
        (measured[first].inputs[0], -1, (10**6,)),))
    errors = local_errors(named, model, broken, held_out)
    assert first not in errors
    assert errors == pytest.approx(
        {k: v for k, v in local_errors(named, model, measured, held_out).items()
         if k != first})

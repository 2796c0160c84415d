"""The calibration statistics' memory budget (``qmpass.compress.calibration``): half the
model's float32 weights, within a floor and a ceiling."""

from __future__ import annotations

import importlib

import onnx
import pytest
from conftest import fixture_path

from qmpass.extract import extract_operators

calibration = importlib.import_module("qmpass.compress.calibration")


def test_the_statistics_budget_follows_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    extraction = extract_operators(onnx.load(str(fixture_path("mlp_digits"))))
    weights = 4 * sum(op.params for op in extraction.operators)
    assert 0 < weights // 2 < calibration.STATS_MIN_BYTES
    assert calibration.stats_bytes(extraction) == calibration.STATS_MIN_BYTES
    monkeypatch.setattr(calibration, "STATS_MIN_BYTES", 1)
    assert calibration.stats_bytes(extraction) == weights // 2
    monkeypatch.setattr(calibration, "STATS_BYTES", 100)
    assert calibration.stats_bytes(extraction) == 100

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


def test_a_pass_counts_a_convolution_s_receptive_fields_by_its_channels() -> None:
    """A pass's budget counts ``(C k k)^2`` sums for a Conv's patches: C is axis 1 of
    its (N, C, H, W) input. Reading the last axis (W) put all of densenet121's
    statistics (0.94 GB of sums) in one pass whatever the budget."""
    from qmpass.extract.operator import ConvGeometry
    from qmpass.verify import StatsRequest, stats

    geometry = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    patches = StatsRequest("x", "patches", geometry=geometry)
    assert stats._width((1, 128, 56, 56), patches) == 128 * 9
    assert stats._width((1, 56, 128), StatsRequest("x", "vectors")) == 128
    shapes = {"a": (1, 128, 56, 56), "b": (1, 128, 56, 56)}
    requests = {k: StatsRequest(k, "patches", geometry=geometry) for k in shapes}
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["a"], ["b"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, shapes["a"])],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, shapes["b"])]))
    one = 8 * (128 * 9) ** 2
    assert len(stats._passes(model, requests, one)) == 2
    assert len(stats._passes(model, requests, 2 * one)) == 1

"""Trained ONNX fixtures for qmpass tests and benchmarks, and how to load them.

Each fixture `<name>` is stored here as `<name>.onnx` (weights embedded), `<name>.json`
(metadata: test accuracy, exporter, opset...), `<name>_test.npz` (held-out split,
keys `x` float32 in the model's input layout and `y` int64) and `<name>_calib.npz`
(training samples keyed by the graph input name). The builder scripts beside this
file regenerate them (`python models/build_all.py`).

This module imports only numpy and pathlib so that tests can load fixtures in an
environment without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["FIXTURES", "fixture_path", "load_calib", "load_test_split"]

MODELS_DIR = Path(__file__).resolve().parent

FIXTURES: list[str] = [
    "mlp_digits",
    "resnet_digits",
    "resnet_digits_bn",
    "transformer_digits",
]


def _check(name: str) -> None:
    if name not in FIXTURES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")


def fixture_path(name: str) -> Path:
    """Return the path of the fixture's .onnx file."""
    _check(name)
    return MODELS_DIR / f"{name}.onnx"


def load_test_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the held-out digits (x float32, y int64) in the fixture's input layout."""
    _check(name)
    with np.load(MODELS_DIR / f"{name}_test.npz") as data:
        return data["x"], data["y"]


def load_calib(name: str) -> dict[str, np.ndarray]:
    """Return calibration inputs as a feed dict {graph input name: float32 array}."""
    _check(name)
    with np.load(MODELS_DIR / f"{name}_calib.npz") as data:
        return {key: data[key] for key in data.files}

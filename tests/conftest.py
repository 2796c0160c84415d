"""Shared fixtures: the trained models in models/ and a builder for small graphs.

Hand-built graphs take their weights from the trained fixtures (``trained_matrix``), so
extraction tests run on matrices with real spectra, written the way exporters write them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One BLAS thread for the suite and the CLI runs it starts: its matrices are small, and on
# a 2-core machine OpenBLAS's threads fought each other (a 13 s test took 111 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # after the thread count it reads
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the models/ package lives in the checkout, beside qmpass/

import models  # noqa: E402  (needs the path above)

OPSET = 17
IR_VERSION = 8  # what onnxruntime 1.31 loads (it stops at IR 13); onnx 1.23 writes 14


@pytest.fixture(scope="session")
def fixture_names() -> list[str]:
    return list(models.FIXTURES)


def fixture_path(name: str) -> Path:
    return models.fixture_path(name)


def trained_matrix(d_out: int, d_in: int) -> np.ndarray:
    """A ``d_out x d_in`` block of the trained transformer's first MLP weight (64 -> 128)."""
    model = onnx.load(str(models.fixture_path("transformer_digits")))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.shape == (64, 128):  # MatMul weights are stored d_in x d_out
            big = array.T.astype(np.float32)
            return np.ascontiguousarray(np.tile(big, (2, 2))[:d_out, :d_in])
    raise AssertionError("transformer fixture has no 64x128 weight")


def trained_conv(c_out: int, c_in: int, k: int) -> np.ndarray:
    """A conv weight ``(c_out, c_in, k, k)`` cut from the trained ResNet (3x3 kernels)."""
    model = onnx.load(str(models.fixture_path("resnet_digits")))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 4 and array.shape[0] >= c_out and array.shape[1] >= c_in and \
                array.shape[2] >= k:
            return np.ascontiguousarray(array[:c_out, :c_in, :k, :k])
    raise AssertionError("resnet fixture has no conv weight that large")


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    if check:  # bad-input tests build models the checker rejects
        onnx.checker.check_model(model)
    return model


def tensor(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

"""Budgets in parameters or in a target's cycles (qmpass.plan.resource, --target)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fixture_path

import hw_targets
from qmpass import CompressConfig, QmpassInputError, compress
from qmpass.cli import main
from qmpass.extract import extract_operators
from qmpass.extract.shapes import infer_shapes
from qmpass.plan.resource import PARAMS, Cycles, Scale, lowrank_cost


def _ops(name: str) -> tuple[onnx.ModelProto, list]:
    model = onnx.load(str(fixture_path(name)))
    return model, list(extract_operators(model).operators)


def test_params_prices_operators_as_extraction_counts_them() -> None:
    _, ops = _ops("mlp_digits")
    for op in ops:
        assert PARAMS.operators([op]) == op.params
        assert PARAMS.scaled(op, Scale()) == op.params
        assert PARAMS.factorised([op], 8) == lowrank_cost([op], 8).params
    # halving the outputs of a Gemm halves its weights and its bias
    op = ops[0]
    assert PARAMS.scaled(op, Scale(output=0.5)) == pytest.approx(op.params / 2, abs=1)


def test_cycles_are_the_cost_model_of_the_kernels_each_form_lowers_to() -> None:
    model, ops = _ops("mlp_digits")
    cycles = Cycles("cpu", infer_shapes(model))
    cpu = hw_targets.get_target("cpu")
    op = ops[0]
    d_out, d_in = op.shape
    rows = op.flops // (2 * d_out * d_in)
    whole = hw_targets.lower_matmul(cpu, cpu.TARGET, "g", rows, d_in, d_out, True).cycles()
    assert cycles.operators([op]) == whole
    pair = (hw_targets.lower_matmul(cpu, cpu.TARGET, "g", rows, d_in, 16, False).cycles()
            + hw_targets.lower_matmul(cpu, cpu.TARGET, "g", rows, 16, d_out, True).cycles())
    assert cycles.factorised([op], 16) == pair


def test_a_dynamic_batch_is_priced_at_the_batch_given() -> None:
    model, ops = _ops("mlp_digits")
    cpu = hw_targets.get_target("cpu")
    op = ops[0]
    d_out, d_in = op.shape
    at_64 = Cycles("cpu", infer_shapes(model), batch=64).operators([op])
    assert at_64 == hw_targets.lower_matmul(cpu, cpu.TARGET, "g", 64, d_in, d_out, True).cycles()
    assert at_64 > Cycles("cpu", infer_shapes(model)).operators([op])


def test_cycles_of_a_conv_and_its_factorisation() -> None:
    model, ops = _ops("resnet_digits")
    cycles = Cycles("ascend", infer_shapes(model))
    conv = next(op for op in ops if op.op_type == "Conv" and op.geometry is not None
                and op.geometry.kernel_shape == (3, 3) and op.geometry.groups == 1)
    full = cycles.operators([conv])
    assert full > 0
    assert cycles.factorised([conv], 8) != full
    # fewer kept channels never cost more cycles
    assert cycles.scaled(conv, Scale(output=0.5, input=0.5)) <= full


def test_keep_budgets_target_cycles(tmp_path: Path) -> None:
    with np.load(fixture_path("mlp_digits").with_name("mlp_digits_calib.npz")) as data:
        calib = {"input": data["input"]}
    config = CompressConfig(keep=0.5, calib=calib, tolerance=1e9, target="cpu")
    _, report = compress(fixture_path("mlp_digits"), config)
    doc = report.to_dict()
    assert report.plan.resource == "cycles:cpu"
    before, after = doc["target"]["cycles_before"], doc["target"]["cycles_after"]
    assert doc["target"]["name"] == "cpu"
    # every weight operator of the MLP is compressible: the plan spends half its cycles
    assert after <= 0.5 * before + 1
    assert after > 0.3 * before  # and not far less: the budget binds, it is not ignored


def test_unknown_target_is_refused() -> None:
    with pytest.raises(QmpassInputError, match="unknown target 'tpu'"):
        CompressConfig(keep=0.5, target="tpu")


def test_cli_report_has_the_target_cycles(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code = main(["compress", str(fixture_path("mlp_digits")), "-o", str(tmp_path / "o.onnx"),
                 "--keep", "0.6", "--target", "cpu", "--report", str(report)])
    assert code == 0
    target = json.loads(report.read_text())["target"]
    assert target["name"] == "cpu"
    assert target["cycles_after"] < target["cycles_before"]


def test_units_that_save_no_target_cycles_are_declined_with_the_reason() -> None:
    # one sample of the small MLP on the MLU style: a kernel's fill, drain and barriers
    # (4 iterations x 64 cycles) outweigh its work, so a pair of thin kernels costs more
    # than the one it replaces
    config = CompressConfig(keep=0.6, tolerance=1e9, target="mlu")
    _, report = compress(fixture_path("mlp_digits"), config)
    doc = report.to_dict()
    reasons = {d["reason"] for d in doc["declined_operators"]}
    assert reasons == {"no variant saves cycles:mlu"}
    assert doc["target"]["cycles_after"] == doc["target"]["cycles_before"]

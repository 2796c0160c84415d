"""What every target's cost model must respect, whatever its details: the roofline is a
lower bound on its predictions, no kernel moves less than its compulsory traffic, and an
unknown target name is refused with the names that exist."""

from __future__ import annotations

import pytest

import hw_targets
from hw_targets.spec import GemmSpec, Im2colSpec

SHAPES = [(1, 64, 10), (8, 64, 192), (33, 100, 70), (256, 256, 256), (128, 768, 3072)]


@pytest.mark.parametrize("name", hw_targets.TARGET_NAMES)
def test_predictions_respect_the_roofline_and_the_compulsory_traffic(name: str) -> None:
    module = hw_targets.get_target(name)
    target = module.TARGET
    for m, k, n in SHAPES:
        spec = GemmSpec("g", m, k, n, bias="col")
        cost = module.cost(spec, module.tiling(spec, target), target)
        assert cost.cycles >= hw_targets.roofline(spec, target), (m, k, n)
        assert cost.dram_bytes >= spec.compulsory_bytes(target.in_bytes), (m, k, n)
        assert cost.padded_macs >= cost.macs == m * k * n
    im2col = Im2colSpec("i", 1, 8, 12, 12, (3, 3), pads=(1, 1, 1, 1))
    cost = module.cost(im2col, None, target)
    assert cost.cycles >= hw_targets.roofline(im2col, target)
    assert cost.macs == 0 and cost.cycles > 0


def test_every_declared_number_says_where_it_comes_from() -> None:
    for name in hw_targets.TARGET_NAMES:
        for row in hw_targets.get_target(name).TARGET.table():
            assert row["tag"] in ("V", "S", "U"), (name, row)
            assert str(row["source"]).strip(), (name, row)


def test_an_unknown_target_is_refused_with_the_choices() -> None:
    with pytest.raises(hw_targets.UnknownTarget, match="ascend, mlu, kunlunxin, cpu"):
        hw_targets.get_target("tpu")


@pytest.mark.parametrize("name", hw_targets.TARGET_NAMES)
def test_op_type_weights_are_what_the_cost_model_implies(name: str) -> None:
    module = hw_targets.get_target(name)
    weights = hw_targets.op_type_weights(module)
    assert weights["MatMul"] == weights["Gemm"] == 1.0
    assert weights["Conv"] > 1.0  # a 3x3 conv pays for its im2col
    pointwise = hw_targets.ConvLayer((1, 64, 28, 28), 128, 1)
    # no im2col: the same GEMM (only the bias runs along rows instead of columns)
    assert hw_targets.conv_weight(module, module.TARGET, pointwise) == pytest.approx(1, abs=0.02)

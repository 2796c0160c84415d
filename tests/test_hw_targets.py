"""What every target must do, whatever its details: its emitted kernels compile, run and
match onnxruntime (aligned and unaligned GEMMs with trained weights, with and without
bias; a padded 3x3, a strided depthwise and a grouped pointwise conv) within the rounding
bound of its arithmetic, and the simulation counts exactly the cycles, stages and
per-pipe totals its cost model predicts; the roofline is a lower bound on its
predictions, no kernel moves less than its compulsory traffic, and an unknown target name
is refused with the names that exist. Target-specific behaviour (buffer overflows,
padding to the native unit, alignment) is in ``tests/test_hw_<target>.py``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import trained_conv, trained_matrix
from hw_helpers import gemm_tolerance, ort_conv, ort_matmul

import hw_targets
from hw_targets.spec import GemmSpec, Im2colSpec

#: rows x k x n and bias: aligned to every native unit, nothing aligned, K split in chunks
#: with a ragged last one, several tiles over the cores
MATMULS = [(64, 64, 128, True), (5, 7, 3, False), (33, 100, 70, True), (96, 128, 192, False)]
#: input NCHW, output channels, kernel, strides, pads (top, left, bottom, right), groups
CONVS = [
    ((2, 4, 9, 9), 6, 3, (1, 1), (1, 1, 1, 1), 1),  # padded 3x3
    ((1, 8, 8, 8), 8, 3, (2, 2), (1, 0, 1, 0), 8),  # strided depthwise, asymmetric pads
    ((2, 6, 5, 5), 4, 1, (1, 1), (0, 0, 0, 0), 2),  # grouped pointwise: no im2col
]
RNG = np.random.default_rng(5)


def _assert_counted_as_predicted(lowering: hw_targets.Lowering,
                                 counters: list[dict[str, object]]) -> None:
    costs = lowering.costs()
    assert [c["cycles"] for c in counters] == [c.cycles for c in costs]
    assert [c["stages"] for c in counters] == [c.stages for c in costs]
    assert [c["pipes"] for c in counters] == [dict(c.pipes) for c in costs]


@pytest.mark.parametrize("name", hw_targets.TARGET_NAMES)
def test_matmuls_match_onnxruntime_and_the_cost_model(name: str) -> None:
    module = hw_targets.get_target(name)
    lowerings, feeds = [], []
    for index, (rows, k, n, bias) in enumerate(MATMULS):
        lowerings.append(hw_targets.lower_matmul(module, module.TARGET, f"mm{index}", rows, k,
                                                 n, bias))
        feeds.append({
            "a": RNG.standard_normal((rows, k)).astype(np.float32),
            "b": trained_matrix(n, k).T.copy(),  # B is k x n
            "bias": trained_matrix(n, 1)[:, 0].copy() if bias else np.zeros(1, np.float32),
        })
    results = hw_targets.simulate_all(lowerings, feeds)  # one compile for all of them
    for shape, lowering, feed, (y, counters) in zip(MATMULS, lowerings, feeds, results,
                                                    strict=True):
        bias = feed["bias"] if shape[3] else None
        expected = ort_matmul(feed["a"], feed["b"], bias)
        tolerance = gemm_tolerance(feed["a"], feed["b"], bias, module.TARGET.in_dtype)
        assert np.all(np.abs(y - expected) <= tolerance + 1e-6), shape
        _assert_counted_as_predicted(lowering, counters)


@pytest.mark.parametrize("name", hw_targets.TARGET_NAMES)
def test_convs_match_onnxruntime_and_the_cost_model(name: str) -> None:
    module = hw_targets.get_target(name)
    lowerings, feeds = [], []
    for index, (x_shape, c_out, k, strides, pads, groups) in enumerate(CONVS):
        lowerings.append(hw_targets.lower_conv(module, module.TARGET, f"cv{index}", x_shape,
                                               c_out, (k, k), strides, pads, groups=groups))
        feeds.append({
            "a": trained_conv(c_out, x_shape[1] // groups, 3)[:, :, :k, :k].copy(),
            "x": RNG.standard_normal(x_shape).astype(np.float32),
            "bias": RNG.standard_normal(c_out).astype(np.float32),
        })
    results = hw_targets.simulate_all(lowerings, feeds)
    for conv, lowering, feed, (y, counters) in zip(CONVS, lowerings, feeds, results,
                                                   strict=True):
        _, _, k, strides, pads, groups = conv
        expected = ort_conv(feed["x"], feed["a"], feed["bias"], strides, pads, groups=groups)
        assert y.shape == expected.shape
        # the GEMM bound of W_g @ cols (cols built in numpy), plus the fp32 bias add's
        assert np.all(np.abs(y - expected) <= lowering.error_bound(feed) + 1e-6), conv
        assert len(counters) == (1 if k == 1 else 2)  # 1x1 needs no im2col kernel
        _assert_counted_as_predicted(lowering, counters)

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

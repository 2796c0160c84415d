"""The cpu target: emitted plain-C kernels compile, run, match onnxruntime, and cost what
the simulation counts; an oversized tile is caught by the bounds-checked L2 arena."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import trained_conv, trained_matrix
from hw_helpers import gemm_tolerance, ort_conv, ort_matmul

from hw_targets import SimulationFault, get_target, lower_conv, lower_matmul
from hw_targets.spec import GemmSpec

cpu = get_target("cpu")
TARGET = cpu.TARGET
RNG = np.random.default_rng(3)


def _activations(rows: int, k: int) -> np.ndarray:
    return RNG.standard_normal((rows, k)).astype(np.float32)


@pytest.mark.parametrize(
    ("rows", "k", "n", "bias"),
    [(64, 64, 64, True), (5, 7, 3, False), (33, 100, 70, True), (128, 96, 200, True)],
)
def test_matmul_matches_onnxruntime_and_cost_model(rows: int, k: int, n: int, bias: bool) -> None:
    w = trained_matrix(n, k).T.copy()  # B is k x n
    b = trained_matrix(n, 1)[:, 0].copy() if bias else None
    x = _activations(rows, k)
    lowering = lower_matmul(cpu, TARGET, "mm", rows, k, n, bias)
    y, result = lowering.simulate({"a": x, "b": w, "bias": b if b is not None else np.zeros(1)})
    expected = ort_matmul(x, w, b)
    assert np.all(np.abs(y - expected) <= gemm_tolerance(x, w, b, TARGET.in_dtype) + 1e-6)
    (predicted,) = lowering.costs()
    (counted,) = result.counters
    assert counted["cycles"] == predicted.cycles
    assert counted["pipes"] == dict(predicted.pipes)


@pytest.mark.parametrize(
    ("x_shape", "c_out", "k", "strides", "pads", "groups"),
    [
        ((2, 4, 9, 9), 6, 3, (1, 1), (1, 1, 1, 1), 1),  # padded 3x3
        ((1, 8, 8, 8), 8, 3, (2, 2), (1, 0, 1, 0), 8),  # strided depthwise, asymmetric pads
        ((2, 6, 5, 5), 4, 1, (1, 1), (0, 0, 0, 0), 2),  # grouped pointwise: no im2col
    ],
)
def test_conv_matches_onnxruntime(
    x_shape: tuple[int, int, int, int],
    c_out: int,
    k: int,
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    groups: int,
) -> None:
    w = trained_conv(c_out, x_shape[1] // groups, 3)[:, :, :k, :k].copy()
    bias = RNG.standard_normal(c_out).astype(np.float32)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    lowering = lower_conv(cpu, TARGET, "cv", x_shape, c_out, (k, k), strides, pads,
                          groups=groups)
    y, result = lowering.simulate({"a": w, "x": x, "bias": bias})
    expected = ort_conv(x, w, bias, strides, pads, groups=groups)
    assert y.shape == expected.shape
    assert np.abs(y - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    assert len(result.counters) == (1 if k == 1 else 2)  # 1x1 needs no im2col kernel
    assert [c["cycles"] for c in result.counters] == [c.cycles for c in lowering.costs()]


def test_oversized_tile_is_caught() -> None:
    lowering = lower_matmul(cpu, TARGET, "mm", 512, 512, 512, False)
    huge = dataclasses.replace(lowering.tilings[0], tile_m=512, tile_n=512, tile_k=512)
    bad = dataclasses.replace(lowering, tilings=(huge,))
    zeros = {"a": np.zeros((512, 512)), "b": np.zeros((512, 512)), "bias": np.zeros(1)}
    with pytest.raises(SimulationFault, match="L2"):
        bad.simulate(zeros)


def test_chosen_tilings_fit_l2() -> None:
    for m, k, n in [(1, 768, 3072), (256, 256, 256), (4096, 64, 10)]:
        tiling = cpu.tiling(GemmSpec("g", m, k, n), TARGET)
        assert tiling.buffers["L2"] <= TARGET.buffer("L2").bytes


def test_cost_is_monotone_in_every_dimension() -> None:
    def cycles(m: int, k: int, n: int) -> int:
        spec = GemmSpec("g", m, k, n)
        return cpu.cost(spec, cpu.tiling(spec, TARGET), TARGET).cycles

    base = cycles(64, 64, 64)
    assert cycles(128, 64, 64) > base
    assert cycles(64, 128, 64) > base
    assert cycles(64, 64, 128) > base


def test_partial_vectors_cost_a_whole_vector() -> None:
    from hw_targets.base import Tiling

    tiling = Tiling(16, 16, 64, 1)
    fma = {n: cpu.cost(GemmSpec("g", 16, 64, n), tiling, TARGET).pipes["fma"] for n in (9, 16)}
    assert fma[9] == fma[16]  # 9 columns occupy two 8-lane vectors, as 16 do
    assert cpu.cost(GemmSpec("g", 16, 64, 9), tiling, TARGET).padding_waste == pytest.approx(7 / 16)

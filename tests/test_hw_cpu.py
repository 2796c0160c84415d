"""The cpu target (matching onnxruntime and the cost model is tested for every target in
test_hw_targets.py): an oversized tile is caught by the bounds-checked L2 arena; tilings
fit L2; the cost is monotone and pays for partial SIMD vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hw_targets import SimulationFault, get_target, lower_matmul
from hw_targets.spec import GemmSpec

cpu = get_target("cpu")
TARGET = cpu.TARGET



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

"""The mlu target (matching onnxruntime and the cost model is tested for every target in
test_hw_targets.py): a tile past NRAM is caught; the cost model pays for the TFU's
native shape and GDRAM's 64 B units; the emitted source reads as BANG C."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hw_targets import SimulationFault, get_target, lower_matmul
from hw_targets.base import KernelCost, Tiling
from hw_targets.spec import GemmSpec

mlu = get_target("mlu")
TARGET = mlu.TARGET



def test_oversized_tile_is_caught_by_nram() -> None:
    lowering = lower_matmul(mlu, TARGET, "mm", 512, 512, 512, False)
    huge = dataclasses.replace(lowering.tilings[0], tile_m=512, tile_n=512, tile_k=512)
    bad = dataclasses.replace(lowering, tilings=(huge,))
    zeros = {"a": np.zeros((512, 512)), "b": np.zeros((512, 512)), "bias": np.zeros(1)}
    with pytest.raises(SimulationFault, match="overflows NRAM"):
        bad.simulate(zeros)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 768, 3072), (256, 256, 256), (4096, 64, 10),
                                           (128, 4608, 512)])
def test_chosen_tilings_fit_nram_and_wram(m: int, k: int, n: int) -> None:
    tiling = mlu.tiling(GemmSpec("g", m, k, n), TARGET)
    assert tiling.buffers["NRAM"] <= TARGET.buffer("NRAM").bytes
    assert tiling.buffers["WRAM"] <= TARGET.buffer("WRAM").bytes
    assert tiling.cores <= int(TARGET.cores.value)


def test_cost_is_monotone_in_every_dimension() -> None:
    def cycles(m: int, k: int, n: int) -> int:
        spec = GemmSpec("g", m, k, n)
        return mlu.cost(spec, mlu.tiling(spec, TARGET), TARGET).cycles

    base = cycles(128, 128, 128)
    assert cycles(256, 128, 128) > base
    assert cycles(128, 256, 128) > base
    assert cycles(128, 128, 256) > base


def test_k_pads_to_32_and_n_to_64_on_the_tfu() -> None:
    def tfu(k: int, n: int) -> int:  # the TFU's work: its pipe less the barriers (= ALU's)
        pipes = mlu.cost(GemmSpec("g", 16, k, n), Tiling(16, 128, 64, 1), TARGET).pipes
        return pipes["TFU"] - pipes["ALU"]

    assert tfu(33, 64) == tfu(64, 64)  # 33 values of K occupy two 32-wide slices
    assert tfu(32, 65) == tfu(32, 128)  # 65 output channels occupy two 64-lane groups
    assert tfu(32, 64) < tfu(33, 64)
    waste = mlu.cost(GemmSpec("g", 16, 33, 65), Tiling(16, 128, 64, 1), TARGET).padding_waste
    assert waste == pytest.approx(1 - (33 * 65) / (64 * 128))


def test_partial_gdram_units_cost_a_read_modify_write() -> None:
    def io(n: int) -> int:
        return mlu.cost(GemmSpec("g", 64, 32, n), Tiling(64, 64, 32, 1), TARGET).pipes["IO-DMA"]

    # 15 fp32 columns are 60 B a row: one 64 B unit read and written; 16 are exactly one unit
    assert io(15) > io(16)


def test_active_cores_share_the_dram_bandwidth_up_to_a_core_cap() -> None:
    spec = GemmSpec("g", 64, 64, 256)  # four tiles, each its own column: the same bytes
    one, four = (mlu.cost(spec, Tiling(64, 64, 64, p), TARGET) for p in (1, 4))
    d = mlu.defines(TARGET)
    share, cap = d["dram_millibytes_per_cycle"] // 4, d["core_dram_millibytes_per_cycle"]
    assert share < cap < d["dram_millibytes_per_cycle"]

    def io(cost: KernelCost) -> int:  # IO-DMA less the barriers (ALU: barriers and launch)
        return cost.pipes["IO-DMA"] - cost.pipes["ALU"] + d["launch_cycles"]

    # one core moves every byte at its DMA cap; four move a quarter each at a quarter of the
    # chip's bandwidth (up to the rounding of each copy)
    assert io(one) / io(four) == pytest.approx(4 * share / cap, rel=0.02)
    assert four.cycles < one.cycles


def test_a_resident_b_panel_is_loaded_once_per_column() -> None:
    # 4 x 2 tiles on one core: each column's B panel (K = 256, all four k-chunks) is loaded
    # with the column's first tile and kept in WRAM for the other three
    from hw_targets.mlu.cost import Rates, resident

    spec, e = GemmSpec("g", 256, 256, 128), TARGET.in_bytes
    tiling = Tiling(64, 64, 64, 1)
    assert resident(spec, 64, 64, Rates.of(TARGET, 1))
    cost = mlu.cost(spec, tiling, TARGET)
    a, b, c = e * 256 * 256, e * 256 * 128, 4 * 256 * 128
    assert cost.dram_bytes == a * 2 + b + c  # A once per column, B once, C once
    small = dataclasses.replace(TARGET, buffers=tuple(
        dataclasses.replace(buf, size=dataclasses.replace(buf.size, value=32 * 1024))
        if buf.name == "WRAM" else buf for buf in TARGET.buffers))
    assert not resident(spec, 64, 64, Rates.of(small, 1))
    assert mlu.cost(spec, tiling, small).dram_bytes == a * 2 + b * 4 + c  # B once per tile


def test_target_is_declared_with_sources() -> None:
    rows = {r["name"]: r for r in TARGET.table()}
    assert rows["NRAM bytes (core)"]["value"] == 640 * 1024
    assert rows["NRAM bytes (core)"]["tag"] == "V"
    assert rows["WRAM bytes (core)"]["tag"] == "S"
    assert rows["SRAM bytes (cluster)"]["value"] == 4 * 1024 * 1024
    assert rows["MACs/cycle (core)"]["tag"] == "U"
    assert rows["paper_c_conv"]["value"] == 1.5 and rows["paper_c_conv"]["tag"] == "U"
    assert all(r["tag"] in ("V", "S", "U") and r["source"] for r in rows.values())


def test_emitted_kernel_reads_as_bang_c() -> None:
    spec = GemmSpec("g", 64, 64, 64, bias="col")
    code = mlu.emit(spec, mlu.tiling(spec, TARGET), TARGET).code
    for name in ("__mlu_global__ void kernel(half* a, half* b, float* bias, float* c)",
                 "__nram__ int8_t nram_buffer[MAX_NRAM_SIZE]", "__wram__", "taskId",
                 "GDRAM2NRAM", "NRAM2WRAM", "NRAM2GDRAM", "__bang_conv(", "__bang_conv_partial(",
                 "__bang_cycle_add", "__sync_compute()"):
        assert name in code


def test_tiling_search_bound_never_exceeds_the_cost() -> None:
    # tiling() stops at the first candidate whose bound exceeds the best cost: exact only
    # if the bound is a true lower bound
    from hw_targets.mlu.cost import Rates, lower_bound

    rates = Rates.of(TARGET, 1)
    for m, k, n in [(33, 100, 70), (256, 512, 130)]:
        spec = GemmSpec("g", m, k, n)
        for tm, tn, tk, p in [(16, 64, 64, 1), (32, 128, 64, 4), (64, 64, 256, 8),
                              (128, 256, 512, 2)]:
            exact = mlu.cost(spec, Tiling(tm, tn, tk, p), TARGET).cycles
            assert lower_bound(spec, tm, tn, min(tk, k), p, rates) <= exact

"""The kunlunxin target (8 x 64 simulated cores; matching onnxruntime and the cost model
is tested for every target in test_hw_targets.py): an oversized tile is caught by the
bounds-checked LM arena; tilings fit LM and its alignment; the model pays for partial
SIMD vectors, per-call DMA latency and shared bandwidth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hw_targets import (
    SimulationFault,
    get_target,
    lower_matmul,
    roofline,
    simulate_all,
)
from hw_targets.base import Target, Tiling, UnsupportedKernel
from hw_targets.kunlunxin import library_cost
from hw_targets.spec import GemmSpec, Im2colSpec

kunlunxin = get_target("kunlunxin")
TARGET = kunlunxin.TARGET


def test_oversized_tile_is_caught() -> None:
    lowering = lower_matmul(kunlunxin, TARGET, "mm", 64, 64, 64, False)
    chosen = lowering.tilings[0]
    assert chosen is not None
    huge = dataclasses.replace(chosen, tile_m=64, tile_n=64, tile_k=64)
    bad = dataclasses.replace(lowering, tilings=(huge,))
    zeros = {"a": np.zeros((64, 64)), "b": np.zeros((64, 64)), "bias": np.zeros(1)}
    with pytest.raises(SimulationFault, match="LM"):
        bad.simulate(zeros)


def test_chosen_tilings_fit_lm_and_alignment() -> None:
    lm = TARGET.buffer("LM")
    specs = [GemmSpec("g", 1, 768, 3072, bias="col"), GemmSpec("g", 256, 256, 256),
             GemmSpec("g", 4096, 64, 10, bias="row")]
    for spec in specs:
        tiling = kunlunxin.tiling(spec, TARGET)
        assert tiling.buffers["LM"] <= lm.bytes
        assert tiling.tile_k % 16 == 0  # fp16 rows of A start 32-byte aligned in LM
        assert tiling.tile_n % 32 == 0  # whole fp16 vectors of B


def test_a_target_whose_lm_holds_no_tile_is_refused() -> None:
    tiny = dataclasses.replace(TARGET, buffers=(dataclasses.replace(
        TARGET.buffer("LM"), size=dataclasses.replace(TARGET.buffer("LM").size, value=512)),))
    with pytest.raises(UnsupportedKernel, match="LM"):
        kunlunxin.tiling(GemmSpec("g", 64, 64, 64), tiny)


def test_cost_is_monotone_in_every_dimension() -> None:
    def cycles(m: int, k: int, n: int) -> int:
        spec = GemmSpec("g", m, k, n)
        return kunlunxin.cost(spec, kunlunxin.tiling(spec, TARGET), TARGET).cycles

    for base in [(64, 64, 64), (512, 256, 512)]:
        here = cycles(*base)
        for axis in range(3):
            bigger = list(base)
            bigger[axis] *= 2
            assert cycles(*bigger) > here, (base, axis)


def test_partial_fp16_vectors_cost_a_whole_vector() -> None:
    tiling = Tiling(8, 64, 32, int(TARGET.cores.value))
    simd = {n: kunlunxin.cost(GemmSpec("g", 8, 64, n), tiling, TARGET).pipes["simd"]
            for n in (33, 64)}
    assert simd[33] == simd[64]  # 33 columns occupy two 32-lane fp16 vectors, as 64 do
    waste = kunlunxin.cost(GemmSpec("g", 8, 64, 33), tiling, TARGET).padding_waste
    assert waste == pytest.approx(31 / 64)
    aligned = kunlunxin.cost(GemmSpec("g", 8, 64, 64), tiling, TARGET)
    assert aligned.padding_waste == 0.0


def test_contiguous_slices_move_in_one_dma_call() -> None:
    # With TK == K the A slice (16 rows of 64 fp16) is one contiguous block: one call.
    # With TK = 80 its LM rows are 80 apart, so it takes 16 calls, 15 more latencies.
    spec = GemmSpec("g", 16, 64, 32)
    cores = int(TARGET.cores.value)
    whole = kunlunxin.cost(spec, Tiling(16, 32, 64, cores), TARGET).pipes["dma"]
    split = kunlunxin.cost(spec, Tiling(16, 32, 80, cores), TARGET).pipes["dma"]
    assert split - whole == 15 * kunlunxin.defines(TARGET)["dma_latency"]


def test_idle_cores_leave_their_bandwidth_to_the_busy_ones() -> None:
    # One tile: a single core streams at its engine's cap instead of a 1/512 share.
    one = kunlunxin.cost(GemmSpec("g", 1, 64, 32), Tiling(1, 32, 64, 512), TARGET)
    d = kunlunxin.defines(TARGET)
    a_bytes, b_bytes, c_bytes = 2 * 64, 2 * 64 * 32, 4 * 32
    cap = d["core_dma_bytes_per_kcycle"]
    assert one.pipes["dma"] == d["launch_cycles"] + sum(
        d["dma_latency"] + -(-nbytes * 1000 // cap) for nbytes in (a_bytes, b_bytes, c_bytes))


def test_a_small_grid_is_spread_over_the_simd_units() -> None:
    # 256 tiles on 512 cores: two busy cores per 4-core SIMD unit, not four on half the units
    from hw_targets.kunlunxin.cost import sharers

    d = kunlunxin.defines(TARGET)
    assert {sharers(d, 256, s) for s in range(256)} == {2}
    assert {sharers(d, 512, s) for s in range(512)} == {4}
    assert sharers(d, 129, 0) == 2 and sharers(d, 129, 1) == 1
    lowering = lower_matmul(kunlunxin, TARGET, "mm", 512, 64, 64, False)
    lowering = dataclasses.replace(lowering, tilings=(Tiling(4, 32, 32, 512),))  # 256 tiles
    rng = np.random.default_rng(0)
    ((_, counters),) = simulate_all([lowering], [{"a": rng.standard_normal((512, 64)),
                                                  "b": rng.standard_normal((64, 64)),
                                                  "bias": np.zeros(1)}])
    (cost,) = lowering.costs()
    assert counters[0]["pipes"] == dict(cost.pipes) and counters[0]["cycles"] == cost.cycles


def _one_core() -> Target:
    params = dict(TARGET.params)
    for name in ("clusters", "cores_per_cluster"):
        params[name] = dataclasses.replace(params[name], value=1)
    return dataclasses.replace(TARGET, cores=dataclasses.replace(TARGET.cores, value=1),
                               params=params)


def test_im2col_reads_only_input_rows_inside_the_image() -> None:
    # 3x3 taps over an 8x8 image padded by 1: the top tap row skips output row 0 and the
    # bottom one output row 7, so of 9 taps x 8 output rows, 6 x 1 read nothing.
    target = _one_core()
    spec = Im2colSpec("i", 1, 1, 8, 8, (3, 3), pads=(1, 1, 1, 1))
    d = kunlunxin.defines(target)
    row_read = d["dma_latency"] + -(-2 * 8 * 1000 // d["core_dma_bytes_per_kcycle"])
    store = d["dma_latency"] + -(-2 * 64 * 1000 // d["core_dma_bytes_per_kcycle"])
    assert kunlunxin.cost(spec, None, target).pipes["dma"] == \
        d["launch_cycles"] + (9 * 8 - 6) * row_read + 9 * store


def test_library_fc_path_and_roofline_are_reported_side_by_side() -> None:
    spec = GemmSpec("g", 1024, 1024, 1024)
    simulated = kunlunxin.cost(spec, kunlunxin.tiling(spec, TARGET), TARGET).cycles
    library = library_cost(spec, TARGET)
    # The SDNN (vendor fc) is far faster than SIMD cluster-core code, which stays above
    # its own roofline; the model says so rather than hiding it.
    assert library < roofline(spec, TARGET) <= simulated
    assert TARGET.params["paper_attention_fusion_speedup"].tag == "U"

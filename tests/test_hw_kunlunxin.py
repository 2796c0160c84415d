"""The kunlunxin target: emitted XPU C kernels compile, run on 8 x 64 simulated cores,
match onnxruntime within the fp16 rounding bound, and cost what the simulation counts;
an oversized tile is caught by the bounds-checked LM arena."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import trained_conv, trained_matrix
from hw_helpers import gemm_tolerance, ort_conv, ort_matmul

from hw_targets import (
    Lowering,
    SimulationFault,
    get_target,
    lower_conv,
    lower_matmul,
    roofline,
    simulate_all,
)
from hw_targets.base import Target, Tiling, UnsupportedKernel
from hw_targets.kunlunxin import library_cost
from hw_targets.spec import GemmSpec, Im2colSpec

kunlunxin = get_target("kunlunxin")
TARGET = kunlunxin.TARGET
RNG = np.random.default_rng(5)


MATMULS = [(64, 64, 64, True), (5, 7, 3, False), (33, 100, 70, True), (40, 96, 200, False)]
CONVS = [
    ((2, 4, 9, 9), 6, 3, (1, 1), (1, 1, 1, 1), 1),  # padded 3x3
    ((1, 8, 8, 8), 8, 3, (2, 2), (1, 0, 1, 0), 8),  # strided depthwise, asymmetric pads
    ((2, 6, 5, 5), 4, 1, (1, 1), (0, 0, 0, 0), 2),  # grouped pointwise: no im2col
]

Run = tuple[Lowering, dict[str, np.ndarray], np.ndarray, list[dict[str, object]]]


def _simulate(lowerings: list[Lowering], feeds: list[dict[str, np.ndarray]]) -> list[Run]:
    """All operators in one program: one compile for the lot."""
    done = simulate_all(lowerings, feeds)
    return [(low, feed, y, counters)
            for low, feed, (y, counters) in zip(lowerings, feeds, done, strict=True)]


@pytest.fixture(scope="module")
def matmuls() -> list[Run]:
    lowerings, feeds = [], []
    for index, (rows, k, n, bias) in enumerate(MATMULS):
        lowerings.append(lower_matmul(kunlunxin, TARGET, f"mm{index}", rows, k, n, bias))
        feeds.append({
            "a": RNG.standard_normal((rows, k)).astype(np.float32),
            "b": trained_matrix(n, k).T.copy(),  # B is k x n
            "bias": trained_matrix(n, 1)[:, 0].copy() if bias else np.zeros(1, np.float32),
        })
    return _simulate(lowerings, feeds)


@pytest.fixture(scope="module")
def convs() -> list[Run]:
    lowerings, feeds = [], []
    for index, (x_shape, c_out, k, strides, pads, groups) in enumerate(CONVS):
        lowerings.append(lower_conv(kunlunxin, TARGET, f"cv{index}", x_shape, c_out, (k, k),
                                    strides, pads, groups=groups))
        feeds.append({
            "a": trained_conv(c_out, x_shape[1] // groups, 3)[:, :, :k, :k].copy(),
            "x": RNG.standard_normal(x_shape).astype(np.float32),
            "bias": RNG.standard_normal(c_out).astype(np.float32),
        })
    return _simulate(lowerings, feeds)


@pytest.mark.parametrize("index", range(len(MATMULS)))
def test_matmul_matches_onnxruntime_and_cost_model(matmuls: list[Run], index: int) -> None:
    lowering, feed, y, counters = matmuls[index]
    bias = feed["bias"] if MATMULS[index][3] else None
    expected = ort_matmul(feed["a"], feed["b"], bias)
    assert np.all(np.abs(y - expected) <= gemm_tolerance(feed["a"], feed["b"], bias, "half"))
    (predicted,) = lowering.costs()
    (counted,) = counters
    assert counted["cycles"] == predicted.cycles
    assert counted["stages"] == predicted.stages
    assert counted["pipes"] == dict(predicted.pipes)


@pytest.mark.parametrize("index", range(len(CONVS)))
def test_conv_matches_onnxruntime_and_cost_model(convs: list[Run], index: int) -> None:
    lowering, feed, y, counters = convs[index]
    _, _, k, strides, pads, groups = CONVS[index]
    expected = ort_conv(feed["x"], feed["a"], feed["bias"], strides, pads, groups=groups)
    assert y.shape == expected.shape
    # The GEMM bound of W_g @ cols (cols built in numpy), plus the fp32 bias add's.
    assert np.all(np.abs(y - expected) <= lowering.error_bound(feed))
    assert len(counters) == (1 if k == 1 else 2)  # 1x1 needs no im2col kernel
    for count, predicted in zip(counters, lowering.costs(), strict=True):
        assert count["cycles"] == predicted.cycles
        assert count["pipes"] == dict(predicted.pipes)


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
    assert one.pipes["dma"] == sum(d["dma_latency"] + -(-nbytes * 1000 // cap)
                                   for nbytes in (a_bytes, b_bytes, c_bytes))


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
    assert kunlunxin.cost(spec, None, target).pipes["dma"] == (9 * 8 - 6) * row_read + 9 * store


def test_library_fc_path_and_roofline_are_reported_side_by_side() -> None:
    spec = GemmSpec("g", 1024, 1024, 1024)
    simulated = kunlunxin.cost(spec, kunlunxin.tiling(spec, TARGET), TARGET).cycles
    library = library_cost(spec, TARGET)
    # The SDNN (vendor fc) is far faster than SIMD cluster-core code, which stays above
    # its own roofline; the model says so rather than hiding it.
    assert library < roofline(spec, TARGET) <= simulated
    assert TARGET.params["paper_attention_fusion_speedup"].tag == "U"


def test_every_declared_number_has_a_tag_and_source() -> None:
    for row in TARGET.table():
        assert row["tag"] in ("V", "S", "U")
        assert row["source"]

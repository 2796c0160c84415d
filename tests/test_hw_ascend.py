"""The ascend target (matching onnxruntime and the cost model is tested for every target
in test_hw_targets.py): several tiles per core pipeline their write-back exactly as
predicted; a tile too large for L0A is caught when TPipe::InitBuffer carves its queue;
the cube pays for padding to 16."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import trained_matrix
from hw_helpers import gemm_tolerance, ort_matmul

from hw_targets import (
    Lowering,
    SimulationFault,
    get_target,
    lower_matmul,
    simulate_all,
)
from hw_targets.base import Param, Tiling, UnsupportedKernel
from hw_targets.spec import GemmSpec, Im2colSpec

ascend = get_target("ascend")
TARGET = ascend.TARGET
RNG = np.random.default_rng(5)


def _activations(rows: int, k: int) -> np.ndarray:
    return RNG.standard_normal((rows, k)).astype(np.float32)


def _check_matmuls(lowerings: list[Lowering], shapes: list[tuple[int, int, int, bool]]) -> None:
    feeds, references = [], []
    for rows, k, n, bias in shapes:
        w = trained_matrix(n, k).T.copy()  # B is k x n
        b = trained_matrix(n, 1)[:, 0].copy() if bias else None
        x = _activations(rows, k)
        feeds.append({"a": x, "b": w, "bias": b if b is not None else np.zeros(1)})
        references.append((x, w, b))
    results = simulate_all(lowerings, feeds)
    for lowering, (x, w, b), (y, (counted,)) in zip(lowerings, references, results, strict=True):
        assert np.all(np.abs(y - ort_matmul(x, w, b)) <= gemm_tolerance(x, w, b, "half") + 1e-6)
        (predicted,) = lowering.costs()
        assert counted["cycles"] == predicted.cycles
        assert counted["stages"] == predicted.stages
        assert counted["pipes"] == dict(predicted.pipes)


def test_several_tiles_per_core_pipeline_their_write_back() -> None:
    # 2 cores and 32^3 tiles: 3 x 3 tiles with ragged edges in M, N and K, so each core
    # drains a tile's C while it computes its next one.
    two = dataclasses.replace(TARGET, cores=Param(2, "cores", "U", "test: few cores"))
    shapes = [(70, 100, 90, True), (40, 50, 60, False)]
    lowerings = [dataclasses.replace(lower_matmul(ascend, two, f"mm{i}", rows, k, n, bias),
                                     tilings=(Tiling(32, 32, 32, 2),))
                 for i, (rows, k, n, bias) in enumerate(shapes)]
    _check_matmuls(lowerings, shapes)


def test_oversized_tile_is_caught_in_l0a() -> None:
    lowering = lower_matmul(ascend, TARGET, "mm", 256, 256, 256, False)
    huge = Tiling(256, 256, 256, int(TARGET.cores.value))  # A2: 2 x 128 KB > 64 KB of L0A
    bad = dataclasses.replace(lowering, tilings=(huge,))
    zeros = {"a": np.zeros((256, 256)), "b": np.zeros((256, 256)), "bias": np.zeros(1)}
    with pytest.raises(SimulationFault, match="L0A"):
        bad.simulate(zeros)


def test_chosen_tilings_fit_every_buffer_double_buffered() -> None:
    for m, k, n in [(1, 768, 3072), (256, 256, 256), (4096, 64, 10), (100, 1000, 17)]:
        tiling = ascend.tiling(GemmSpec("g", m, k, n, bias="col"), TARGET)
        assert min(tiling.tile_m, tiling.tile_n, tiling.tile_k) % 16 == 0
        for name, used in tiling.buffers.items():
            assert used <= TARGET.buffer(name).bytes, name
        assert tiling.buffers["L0A"] == 2 * 2 * tiling.tile_m * tiling.tile_k


def test_cost_is_monotone_in_every_dimension() -> None:
    def cycles(m: int, k: int, n: int) -> int:
        spec = GemmSpec("g", m, k, n)
        return ascend.cost(spec, ascend.tiling(spec, TARGET), TARGET).cycles

    base = cycles(256, 256, 256)
    assert cycles(512, 256, 256) > base
    assert cycles(256, 512, 256) > base
    assert cycles(256, 256, 512) > base


def test_cube_pays_for_padding_to_16() -> None:
    tiling = Tiling(16, 16, 64, 1)

    def cube(m: int, k: int, n: int) -> int:
        return ascend.cost(GemmSpec("g", m, k, n), tiling, TARGET).pipes["M"]

    assert cube(16, 64, 9) == cube(16, 64, 16)  # 9 columns fill one fractal, as 16 do
    assert cube(16, 49, 16) == cube(16, 64, 16)  # k = 49 runs 4 fractals deep
    assert cube(1, 64, 16) == cube(16, 64, 16)  # a GEMV row costs a whole fractal row
    assert cube(17, 64, 16) == 2 * cube(16, 64, 16)
    waste = ascend.cost(GemmSpec("g", 1, 64, 16), tiling, TARGET).padding_waste
    assert waste == pytest.approx(15 / 16)
    assert ascend.cost(GemmSpec("g", 32, 64, 48), tiling, TARGET).padding_waste == 0.0


def test_unaligned_shapes_cost_as_much_as_the_next_fractal() -> None:
    spec, padded = GemmSpec("g", 100, 100, 100), GemmSpec("g", 112, 112, 112)
    tiling = ascend.tiling(padded, TARGET)
    assert ascend.cost(spec, tiling, TARGET).pipes["M"] == ascend.cost(padded, tiling,
                                                                       TARGET).pipes["M"]


def test_im2col_that_does_not_fit_ub_is_refused() -> None:
    spec = Im2colSpec("big", 1, 1, 224, 224, (7, 7), (1, 1), (3, 3, 3, 3))
    with pytest.raises(UnsupportedKernel, match="UB"):
        ascend.cost(spec, None, TARGET)


def test_every_number_is_sourced() -> None:
    rows = TARGET.table()
    assert all(row["tag"] in ("V", "S", "U") and row["source"] for row in rows)
    assert TARGET.params["paper_c_conv"].tag == "U"
    assert {b.name for b in TARGET.buffers} == {"L1", "L0A", "L0B", "L0C", "UB"}


def test_emitted_kernel_reads_as_a2_ascend_c() -> None:
    spec = GemmSpec("g", 64, 64, 64, bias="col")
    code = ascend.emit(spec, ascend.tiling(spec, TARGET), TARGET).code
    for name in ('extern "C" __global__ __aicore__ void g_custom(GM_ADDR a', "GetBlockIdx()",
                 "TQue<QuePosition::A1, 2>", "TQue<QuePosition::CO1, 2>", "LoadData(", "Mmad(",
                 "Fixpipe<float, float, CFG_ROW_MAJOR>(", "KERNEL_TYPE_MIX_AIC_1_1",
                 "CrossCoreSetFlag<2, PIPE_FIX>(", "CrossCoreWaitFlag(", "DataCopyPad(",
                 "namespace g {"):
        assert name in code
    # no L0C -> UB copy (310P only), no qmsim extension in the kernel
    for name in ("BLOCK_MODE_MATRIX", "SetL2Reuse", "QM_END_STAGE"):
        assert name not in code
    plain = ascend.emit(GemmSpec("h", 64, 64, 64), ascend.tiling(spec, TARGET), TARGET).code
    assert "KERNEL_TYPE_AIC_ONLY" in plain and "CrossCore" not in plain

"""The cpu target's cost model and tiling search (numbers from :mod:`.target`).

Each core packs tiles of A and B (double-buffered) and an fp32 C tile into its L2,
modelled as an arena of ``L2`` bytes; the FMA units retire ``macs_per_cycle`` fp32 MACs
per cycle on ``lanes``-wide vectors (a partial vector costs a whole one); every move to
or from DRAM gets ``1/cores`` of the chip's bandwidth. Per k-step (a stage) the loads of
the next tiles overlap the FMAs, so the stage costs its slowest pipe; the bias and the
store of C ride on the tile's last stage. An im2col row is one stage: the row gathered
from DRAM and stored back, both on the dram pipe.
"""

from __future__ import annotations

import itertools

from hw_targets.base import (
    OUT_BYTES,
    KernelCost,
    Target,
    TileCost,
    Tiling,
    best_tiling,
    by_kind,
    ceil_div,
    grid_cost,
    round_up,
)
from hw_targets.cpu.target import PIPES, TARGET, defines
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["cost", "footprint", "tiling"]

#: Tile edges tried (a search space, not hardware): M and N in whole vectors, K in whole
#: cache lines of A's rows; bounded in practice by what fits L2.
_M_VECTORS = (1, 2, 4, 8, 16, 32)
_N_VECTORS = (1, 2, 4, 8, 16, 32, 64)
_K_LINES = (1, 2, 4, 8, 16, 32)


def footprint(tm: int, tn: int, tk: int, target: Target) -> int:
    """Bytes of L2 a tiling needs: A and B tiles twice (double buffering), one C tile."""
    return target.in_bytes * 2 * (tm * tk + tk * tn) + OUT_BYTES * tm * tn


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit L2 (ties: fewer stages)."""
    lanes = int(target.param("lanes"))
    line = target.buffer("L2").alignment // target.in_bytes
    budget = target.buffer("L2").bytes
    ms = [lanes * v for v in _M_VECTORS if lanes * v < spec.m] + [spec.m]
    ns = [lanes * v for v in _N_VECTORS if lanes * v < spec.n] + [round_up(spec.n, lanes)]
    ks = [line * v for v in _K_LINES if line * v < spec.k] + [spec.k]
    fitting = (Tiling(tm, tn, tk, int(target.cores.value), buffers={"L2": used})
               for tm, tn, tk in itertools.product(sorted(set(ms)), sorted(set(ns)),
                                                   sorted(set(ks)))
               if (used := footprint(tm, tn, tk, target)) <= budget)
    return best_tiling(fitting, lambda c: cost(spec, c, target),
                       f"no tiling of {spec.name} fits {budget} bytes of L2")


def _im2col_cost(spec: Im2colSpec, target: Target) -> KernelCost:
    rate, e = defines(target)["core_bytes_per_cycle"], target.in_bytes
    ho, wo = spec.out_hw
    move = ceil_div(e * ho * wo, rate)
    rows = spec.images * spec.groups * spec.k
    busiest = ceil_div(rows, int(target.cores.value))
    return KernelCost(2 * busiest * move, {"dram": 2 * busiest * move, "fma": 0},
                      busiest, 0, 0, 2 * rows * e * ho * wo)


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelCost:
    d = defines(target)
    rate, lanes, macs = d["core_bytes_per_cycle"], d["lanes"], d["macs_per_cycle"]
    e = target.in_bytes
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    kt = ceil_div(spec.k, tk)

    def tile(rows: int, cols: int) -> TileCost:
        total, pipes, moved = 0, dict.fromkeys(PIPES, 0), 0
        for s in range(kt):
            kk = min(tk, spec.k - s * tk)
            stage = {
                "dram": ceil_div(e * rows * kk, rate) + ceil_div(e * kk * cols, rate),
                "fma": ceil_div(rows * round_up(cols, lanes) * kk, macs),
            }
            moved += e * (rows * kk + kk * cols)
            if s == kt - 1:
                if spec.bias != "none":
                    bias = OUT_BYTES * (rows if spec.bias == "row" else cols)
                    stage["dram"] += ceil_div(bias, rate)
                    moved += bias
                stage["dram"] += ceil_div(OUT_BYTES * rows * cols, rate)
                moved += OUT_BYTES * rows * cols
            total += max(stage.values())
            for name, value in stage.items():
                pipes[name] += value
        return TileCost(total, kt, pipes, moved)

    padded = spec.batch * spec.m * round_up(spec.n, lanes) * spec.k
    return grid_cost(spec, tm, tn, int(target.cores.value), tile, padded)


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelCost:
    """Cycles of the kernel, stage by stage, as ``include/cpu_sim.h`` counts them."""
    return by_kind(spec, tiling, lambda g, t: _gemm_cost(g, t, target),
                   lambda i: _im2col_cost(i, target))

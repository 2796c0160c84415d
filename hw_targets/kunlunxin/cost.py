"""The kunlunxin target's cost model and tiling search (numbers from :mod:`.target`).

The matrix engine (SDNN) is reachable only through the vendor's fc/xblas libraries
(docs/TARGETS.md), so the kernels emitted here run on the cluster cores: ``__global__``
kernels launched ``<<<cluster_num, core_num>>>``, output tiles dealt round-robin over 512
slots (tile ``t`` to slot ``t % 512``, as :func:`hw_targets.base.grid_cost`), slot
``r * 128 + g`` on core ``4g + r`` so that a small grid is spread over the SIMD units
(:func:`sharers`).

A GEMM tile (``TM x TN`` of C, fp32, in LM) walks K in steps of ``TK``. Its first *stage*
loads slice 0 (and the bias) and waits (``mfence``); stage ``s`` then issues
``GM2LM_ASYNC`` of slice ``s + 1`` (the A slice in ``rows`` calls of ``kk`` fp16, one call
when it is contiguous; the B slice in ``kk`` calls of ``cols`` fp16) into the other half
of a double buffer, runs the SIMD on slice ``s`` and ends with ``mfence``. Pipes and their
charges:

* ``dma``: every GM2LM and LM2GM call (both directions share the core's engine and its
  bandwidth), ``dma_latency + ceil(bytes / rate)`` with
  ``rate = min(core_dma_bytes_per_cycle, GDDR6 / active)``: the cores that have work
  stream at once and share the chip's bandwidth evenly;
* ``simd``: ``simd_op_cycles`` per vector instruction times the busy cores that share
  the core's SIMD unit (``simd_sharers`` per unit); per k-step and 32-column fp16 vector
  of B two widenings to fp32 plus two ``svmac`` per row (``svmul`` for the tile's first
  product, which initialises C), so a partial vector costs a whole one (padding to 32
  columns); vector loads/stores and scalar code are free.

A stage costs its slowest pipe; the tile's last stage also adds the bias (two vector
adds per row and vector) and ``LM2GM_ASYNC``s C. LM holds two A and two B slices, C and
the bias slice as fixed ``__local__`` arrays, each starting LM-aligned, with ``TN32`` =
TN rounded up to 32 and ``TK`` a multiple of 32 (64-byte aligned fp16 rows). An im2col
is one stage per core of synchronous copies: ``GM2LM`` of each input row a (channel,
tap) row of cols reads, a scalar gather in LM, and ``LM2GM`` of output-row chunks that
fit LM.

Not modelled, on purpose: cluster shared memory (SM) is declared but unused (staging B
in SM would cut its GDDR6 traffic up to 64-fold, but its bandwidth is unpublished and the
simulation runs a cluster's cores one after another); the 64 MB L3 (all traffic is
charged at GDDR6 rates, a conservative choice). :func:`library_cost` gives the other
path, an fc call on the SDNN at peak x efficiency, as a number beside the simulated one.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import numpy as np

from hw_targets.base import (
    OUT_BYTES,
    KernelCost,
    Target,
    TileCost,
    Tiling,
    UnsupportedKernel,
    best_tiling,
    by_kind,
    ceil_div,
    grid_cost,
    launched,
    round_up,
)
from hw_targets.kunlunxin.target import PIPES, TARGET, defines, lanes, row_unit
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["active", "cost", "im2col_chunk", "im2col_lm_bytes", "library_cost", "lm_bytes",
           "sharers", "tiling"]

#: Tile edges tried (a search space, not hardware): M in rows, N in whole fp16 vectors,
#: K in LM alignment units (16 fp16 = 32 B); bounded in practice by what fits LM.
_M_TILES = (1, 2, 4, 8, 16, 32, 64)
_N_VECTORS = 8
_K_UNITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _rate(d: Mapping[str, int], busy: int) -> int:
    """Bytes per 1000 cycles of one core's DMA when ``busy`` cores share the GDDR6."""
    return max(1, min(d["core_dma_bytes_per_kcycle"], d["gm_bytes_per_kcycle"] // busy))


def _dma(nbytes: int, d: Mapping[str, int], rate: int) -> int:
    return d["dma_latency"] + ceil_div(nbytes * 1000, rate)


def _copy2d(rows: int, width: int, gm_ld: int, lm_ld: int, elem: int, d: Mapping[str, int],
            rate: int) -> int:
    """Cycles of a 2-D copy: one DMA call if both sides are contiguous, else one per row."""
    if gm_ld == width and lm_ld == width:
        return _dma(rows * width * elem, d, rate)
    return rows * _dma(width * elem, d, rate)


def active(spec: GemmSpec, tm: int, tn: int, cores: int) -> int:
    """Cores that get at least one output tile."""
    return min(cores, spec.batch * ceil_div(spec.m, tm) * ceil_div(spec.n, tn))


def lm_bytes(spec: GemmSpec, tm: int, tn: int, tk: int, target: Target) -> int:
    """LM a tiling's ``__local__`` arrays need, each starting LM-aligned, in emitted order."""
    e, tnp = target.in_bytes, round_up(tn, lanes(target)[1])
    sizes = [2 * e * tm * tk, 2 * e * tk * tnp, OUT_BYTES * tm * tnp]
    if spec.bias != "none":
        sizes.append(OUT_BYTES * (tm if spec.bias == "row" else tnp))
    align, used = target.buffer("LM").alignment, 0
    for size in sizes:
        used = round_up(used, align) + size
    return used


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit LM (ties: fewer stages).

    ``TK`` is a multiple of the LM alignment in fp16 (16: rows of A land 32-byte aligned
    in LM) and ``TN`` a multiple of the fp16 lanes, so every LM row starts aligned.
    """
    _, h_lanes = lanes(target)
    unit = row_unit(target)
    budget = target.buffer("LM").bytes
    m_cap = max(_M_TILES)
    ms = sorted({t for t in _M_TILES if t < spec.m} | {min(spec.m, m_cap)})
    n_full, n_cap = round_up(spec.n, h_lanes), _N_VECTORS * h_lanes
    ns = sorted({t for t in range(h_lanes, n_cap + 1, h_lanes) if t < n_full}
                | {min(n_full, n_cap)})
    k_full, k_cap = round_up(spec.k, unit), unit * max(_K_UNITS)
    ks = sorted({t for t in (unit * u for u in _K_UNITS) if t < k_full} | {min(k_full, k_cap)})
    fitting = (Tiling(tm, tn, tk, int(target.cores.value), buffers={"LM": used})
               for tm, tn, tk in itertools.product(ms, ns, ks)
               if (used := lm_bytes(spec, tm, tn, tk, target)) <= budget)
    return best_tiling(
        fitting, lambda c: _gemm_cost(spec, c, target),
        f"no tiling of {spec.name} fits {budget} bytes of LM (a 1 x {h_lanes} x {unit} tile "
        f"needs {lm_bytes(spec, 1, h_lanes, unit, target)})",
    )


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelCost:
    """Cycles of the kernel, stage by stage, as ``include/xpu_sim.h`` counts them."""
    return launched(by_kind(spec, tiling, lambda g, t: _gemm_cost(g, t, target),
                            lambda i: _im2col_cost(i, target)), target, PIPES[0])


def sharers(d: Mapping[str, int], busy: int, slot: int) -> int:
    """Busy cores that share the SIMD unit of the core running tile slot ``slot`` (the first
    ``busy`` slots have tiles). Slot ``r * G + g`` runs on core ``4g + r`` (``G`` units of
    ``simd_sharers`` cores), spreading a small grid over the units; when the cores do not
    split into whole units, slot = core."""
    s, cores = d["simd_sharers"], d["cores"]
    if cores % s:
        group = slot // s * s
        return max(1, min(s, busy - group))
    units = cores // s
    return max(1, sum(1 for r in range(s) if r * units + slot % units < busy))


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelCost:
    d = defines(target)
    f_lanes, h_lanes = lanes(target)
    halves = h_lanes // f_lanes  # fp32 vectors per fp16 vector: widenings and svmacs
    e = target.in_bytes
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    tnp = round_up(tn, h_lanes)
    kt = ceil_div(spec.k, tk)
    busy = active(spec, tm, tn, d["cores"])
    rate = _rate(d, busy)
    bias = 0 if spec.bias == "none" else OUT_BYTES
    last_k = spec.k - (kt - 1) * tk

    def load(rows: int, cols: int, kk: int) -> int:
        return (_copy2d(rows, kk, spec.k, tk, e, d, rate)
                + _copy2d(kk, cols, spec.n, tnp, e, d, rate))

    def tile_of(share: int, rows: int, cols: int) -> TileCost:
        op = d["simd_op_cycles"] * share
        vectors = ceil_div(cols, h_lanes)
        head = load(rows, cols, tk if kt > 1 else last_k)
        if spec.bias != "none":
            head += _dma(bias * (rows if spec.bias == "row" else cols), d, rate)
        stages: list[dict[str, int]] = [{"dma": head, "simd": 0}]
        for s in range(kt):
            kk = last_k if s == kt - 1 else tk
            nxt = 0 if s == kt - 1 else load(rows, cols, last_k if s + 2 == kt else tk)
            pipes = {"dma": nxt, "simd": vectors * kk * (halves + halves * rows) * op}
            if s == kt - 1:
                if spec.bias != "none":
                    pipes["simd"] += halves * rows * vectors * op
                pipes["dma"] += _copy2d(rows, cols, spec.n, tnp, OUT_BYTES, d, rate)
            stages.append(pipes)
        total = sum(max(p.values()) for p in stages)
        pipes = {name: sum(p[name] for p in stages) for name in PIPES}
        moved = (e * (rows * spec.k + spec.k * cols) + OUT_BYTES * rows * cols
                 + bias * (rows if spec.bias == "row" else cols))
        return TileCost(total, kt + 1, pipes, moved)

    by_share = {s: functools.partial(tile_of, s) for s in range(1, d["simd_sharers"] + 1)}
    padded = spec.batch * spec.m * round_up(spec.n, h_lanes) * spec.k
    return grid_cost(spec, tm, tn, d["cores"], by_share[1], padded,
                     core_class=lambda core: by_share[sharers(d, busy, core)])


def library_cost(spec: GemmSpec, target: Target = TARGET) -> int:
    """Cycles of the same GEMM as a vendor fc call on the SDNN (not simulated).

    The SDNN at ``sdnn_flops_fp16 x sdnn_efficiency``, or the compulsory traffic at the
    GDDR6 bandwidth, whichever is slower: the path Paddle takes (``fc_fusion``).
    """
    macs_per_cycle = target.param("sdnn_flops_fp16") / 2 / float(target.clock_hz)
    compute = spec.macs / (macs_per_cycle * target.param("sdnn_efficiency"))
    traffic = spec.compulsory_bytes(target.in_bytes) / float(target.dram_bytes_per_cycle)
    return math.ceil(max(compute, traffic))


def im2col_chunk(spec: Im2colSpec, target: Target) -> tuple[int, int]:
    """LM row buffer (fp16 elements) and output rows per LM2GM chunk of an im2col."""
    ho, wo = spec.out_hw
    e = target.in_bytes
    row = round_up(spec.width, row_unit(target))
    free = target.buffer("LM").bytes - e * row
    chunk = min(ho, free // (e * wo)) if free > 0 else 0
    if chunk < 1:
        raise UnsupportedKernel(
            f"{spec.name}: an input row of {spec.width} and an output row of {wo} fp16 "
            f"values do not fit {target.buffer('LM').bytes} bytes of LM"
        )
    return row, chunk


def im2col_lm_bytes(spec: Im2colSpec, target: Target) -> int:
    """LM of an im2col's two ``__local__`` arrays (input row, output chunk), each aligned."""
    row, chunk = im2col_chunk(spec, target)
    e, align = target.in_bytes, target.buffer("LM").alignment
    return round_up(e * row, align) + e * chunk * spec.out_hw[1]


def _im2col_cost(spec: Im2colSpec, target: Target) -> KernelCost:
    d = defines(target)
    cores = d["cores"]
    ho, wo = spec.out_hw
    (kh, kw), sh, dh = spec.kernel, spec.strides[0], spec.dilations[0]
    _, chunk = im2col_chunk(spec, target)
    e = target.in_bytes
    rows = spec.images * spec.groups * spec.k
    rate = _rate(d, min(cores, rows))
    oh = np.arange(ho)
    full, rest = divmod(ho, chunk)
    store = full * _dma(e * chunk * wo, d, rate) + (_dma(e * rest * wo, d, rate) if rest else 0)
    # An output row reads an input row unless its tap falls in the top/bottom padding.
    valid = np.array([int(np.count_nonzero((ih >= 0) & (ih < spec.height)))
                      for ih in (oh * sh - spec.pads[0] + tap * dh for tap in range(kh))],
                     dtype=np.int64)
    t = np.arange(rows)
    reads = valid[(t // kw) % kh]
    moved = reads * _dma(e * spec.width, d, rate) + store
    traffic = int((reads * e * spec.width + e * ho * wo).sum())
    core = t % cores
    per_core = np.bincount(core, weights=moved, minlength=cores)
    slowest = int(np.argmax(per_core))
    mine = core == slowest
    return KernelCost(
        cycles=int(per_core[slowest]),
        pipes={"dma": int(moved[mine].sum()), "simd": 0},
        stages=1 if np.any(mine) else 0,
        macs=0,
        padded_macs=0,
        dram_bytes=traffic,
    )

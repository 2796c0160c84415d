"""The mlu target's cost model and tiling search (numbers from :mod:`.target`).

Model. A GEMM's output tiles (``TM x TN``, taken in column-major order, ``i`` fastest,
each of the ``taskDim`` cores a contiguous run of them) are cut into k-chunks of ``TK``; a
*step* is one (tile, chunk). When two whole B panels (every chunk of a column) fit WRAM
(:func:`resident`), a core loads, lays out and moves its column's B chunks only with the
column's first tile and keeps them for the others; else every step brings its own. Each
core runs its steps through a software pipeline in the manner of
mlu-ops ``binary_op_3pipeline.h`` / the five-stage pipeline of its docs, with the
right-hand matrix's way to WRAM as two extra stages: iteration ``i`` loads step ``i`` (A
and B chunks GDRAM2NRAM, plus the tile's bias on its first chunk), lays the B chunk of step
``i-1`` out for WRAM (``__bang_transpose`` then ``__bang_reshape_filter``, as the BANG
header asks of a ``__bang_conv`` filter), moves step ``i-2``'s NRAM2WRAM, multiplies step
``i-3`` on the tensor unit as a 1x1 convolution (``__bang_conv`` on a tile's first chunk,
``__bang_conv_partial`` adding into the tile's fp32 accumulator on the others; the bias on
the last chunk), stores the tile whose last step was ``i-4`` and zeroes the K padding of step
``i+1``'s slots; it ends with ``__sync_io``, ``__sync_move`` and ``__sync_compute``, since
each engine's results are used by another engine in the next iteration. One iteration is
a stage; a core with ``S`` steps runs ``S + 4`` of them, plus a first one that zeroes step
0's padding when a tile's first chunk is padded (the fill and drain of the pipeline are
charged). Pipes (V): ALU, VFU, TFU,
IO-DMA, Move-DMA. Charges, per call, in integer cycles::

    IO-DMA   dma_issue_cycles per call + ceil(bytes' / min(dram_bytes_per_cycle / taskDim,
             core_dram_bytes_per_cycle)),
             bytes' = segments x size rounded up to 64 B units; a store leaving a partial
             unit adds one (RMW)
    Move     dma_issue_cycles + ceil(bytes / move_bytes_per_cycle)
    TFU      ceil(rows x round_up(k, 32) x round_up(n, 64) / macs_per_cycle)
    VFU      bytes / 128 (transpose, reshape, bias, zeroing of padded chunks)
    stage    max over pipes + sync_cycles (the barrier at the end of every iteration)

A core's cycles are the sum of its stages; a kernel's, its slowest core's. Using fewer
cores (``Tiling.cores`` = taskDim) gives each a larger share of the DRAM bandwidth, so the
tiling search picks the task count too. SRAM (shared by a cluster) is declared but not
used: each core reads its own operands from GDRAM.

The im2col kernel writes one row of ``cols`` per stage: IO-DMA gathers the valid input
pixels of each output row into a zeroed NRAM row (one segment when the stride is 1, one
2-byte segment per pixel otherwise, each costing a 64 B unit) and stores the row while VFU
zeroes the other row buffer for the next stage; a first stage zeroes the first buffer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hw_targets.base import (
    OUT_BYTES,
    KernelCost,
    Target,
    Tiling,
    best_tiling,
    by_kind,
    ceil_div,
    launched,
    round_up,
)
from hw_targets.mlu.target import PIPES, TARGET, defines
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = [
    "PIPELINE_DEPTH",
    "Rates",
    "bias_len",
    "cost",
    "first_padded",
    "im2col_tasks",
    "nram_layout",
    "resident",
    "row_len",
    "slot",
    "tiling",
    "wram_bytes",
]

PIPELINE_DEPTH = 4
"""Iterations between a step's load and its tile's store: the emitted kernel's software
pipeline (load, lay out for WRAM, move to WRAM, multiply, store), not a number of the
hardware."""

#: Tile edges and task counts tried (a search space, not hardware): M in rows (the TFU
#: has no M unit), N in multiples of ``n_align``, K in multiples of ``k_align``, task
#: counts in powers of two up to the cores.
_M_TILES = (16, 32, 64, 128, 256, 512)
_N_ALIGNS = (1, 2, 3, 4, 6, 8, 12, 16)
_K_ALIGNS = (2, 4, 8, 16, 32, 64)
_TASKS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Rates:
    """The integer constants of :func:`~hw_targets.mlu.target.defines` and the element
    sizes, with the charges of bang_sim.h (``tasks``: the kernel's taskDim)."""

    millibytes: int
    core_millibytes: int
    issue: int
    tasks: int
    macs: int
    move: int
    sync: int
    unit: int
    vector: int
    k_align: int
    n_align: int
    nram_align: int
    in_bytes: int
    wram: int

    @classmethod
    def of(cls, target: Target, tasks: int) -> Rates:
        d = defines(target)
        return cls(d["dram_millibytes_per_cycle"], d["core_dram_millibytes_per_cycle"],
                   d["dma_issue_cycles"], tasks, d["macs_per_cycle"],
                   d["move_bytes_per_cycle"], d["sync_cycles"], d["gdram_unit"],
                   d["vector_bytes"], d["k_align"], d["n_align"], d["nram_align"],
                   target.in_bytes, d["wram_bytes"])

    @property
    def line(self) -> int:
        """Input elements of one vector line (what ``__bang_write_zero`` works in)."""
        return self.vector // self.in_bytes

    @property
    def core_rate(self) -> int:
        """Bytes per 1000 cycles of one core's GDRAM DMA: its share, at most its cap."""
        return max(1, min(self.millibytes // self.tasks, self.core_millibytes))

    def io(self, nbytes: np.ndarray) -> np.ndarray:
        return -(-nbytes * 1000 // self.core_rate)

    def load(self, segments: np.ndarray, size: np.ndarray) -> np.ndarray:
        """One GDRAM2NRAM call: its issue cost and its whole units."""
        return self.issue + self.io(segments * (-(-size // self.unit) * self.unit))

    def store(self, segments: np.ndarray, size: np.ndarray) -> np.ndarray:
        rmw = np.where(size % self.unit != 0, self.unit, 0)
        return self.issue + self.io(segments * (-(-size // self.unit) * self.unit + rmw))

    def vec(self, nbytes: np.ndarray) -> np.ndarray:
        return -(-nbytes // self.vector)


def first_padded(spec: GemmSpec, tk: int, rates: Rates) -> bool:
    """Whether a tile's first k-chunk is padded to the TFU's K unit (then the kernel zeroes
    step 0's slots in a first stage of its own; later steps' in the iteration before)."""
    return min(tk, spec.k) % rates.k_align != 0


def slot(tm: int, tkp: int, rates: Rates) -> int:
    """Elements of one A slot: zeroed whole, so a multiple of a vector line."""
    return round_up(tm * tkp, rates.line)


def bias_len(spec: GemmSpec, tm: int, tnp: int, rates: Rates) -> int:
    """fp32 elements of one bias slot: a row bias's slot is padded to the NRAM alignment."""
    row = round_up(tm, rates.nram_align // OUT_BYTES)
    return {"none": 0, "row": row, "col": tnp}[spec.bias]


def nram_layout(spec: GemmSpec, tm: int, tn: int, tk: int, rates: Rates) -> dict[str, int]:
    """Byte offsets of the NRAM regions (each aligned to NRAM's alignment), ending with
    ``used``."""
    e = rates.in_bytes
    tkp, tnp = round_up(min(tk, spec.k), rates.k_align), round_up(tn, rates.n_align)
    depth = PIPELINE_DEPTH
    sizes = {
        "a": depth * e * slot(tm, tkp, rates),  # loaded at i, multiplied at i + 3
        "b_stage": 2 * e * tkp * tnp,  # loaded at i, laid out at i + 1
        "b_t": e * tnp * tkp,
        "b_r": 2 * e * tnp * tkp,  # laid out at i + 1, moved at i + 2
        "acc": 2 * OUT_BYTES * tm * tnp,  # one tile accumulates while the last is stored
        # lives from a tile's first load to its end
        "bias": depth * OUT_BYTES * bias_len(spec, tm, tnp, rates),
    }
    offsets, at = {}, 0
    for name, size in sizes.items():
        at = round_up(at, rates.nram_align)
        offsets[name] = at
        at += size
    offsets["used"] = at
    return offsets


def _chunk_bytes(spec: GemmSpec, tn: int, tk: int, rates: Rates) -> int:
    """One B chunk's WRAM slot, padded to the TFU's N and K units."""
    return rates.in_bytes * round_up(tn, rates.n_align) * round_up(min(tk, spec.k), rates.k_align)


def resident(spec: GemmSpec, tn: int, tk: int, rates: Rates) -> bool:
    """Whether two whole B panels (every k-chunk of a column of tiles) fit WRAM: then a core
    keeps its column's panel there across the column's tiles and loads it once."""
    return 2 * ceil_div(spec.k, min(tk, spec.k)) * _chunk_bytes(spec, tn, tk, rates) <= rates.wram


def wram_bytes(spec: GemmSpec, tn: int, tk: int, rates: Rates) -> int:
    """Two B panels when they fit (:func:`resident`), else two B chunks (double-buffered)."""
    chunks = ceil_div(spec.k, min(tk, spec.k)) if resident(spec, tn, tk, rates) else 1
    return 2 * chunks * _chunk_bytes(spec, tn, tk, rates)


def lower_bound(spec: GemmSpec, tm: int, tn: int, tk: int, p: int, rates: Rates) -> float:
    """Cycles the slowest core needs at least: the average over cores of the IO-DMA and
    TFU work (the per-copy rounding up and the VFU, Move and barriers left out)."""
    mt, nt, kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
    last_k, last_n = spec.k - (kt - 1) * tk, spec.n - (nt - 1) * tn
    unit, k_al, n_al, e = rates.unit, rates.k_align, rates.n_align, rates.in_bytes
    a_row = (kt - 1) * round_up(e * tk, unit) + round_up(e * last_k, unit)
    b_row = (nt - 1) * round_up(e * tn, unit) + round_up(e * last_n, unit)
    c_row = sum(count * (round_up(OUT_BYTES * cols, unit)
                         + (unit if OUT_BYTES * cols % unit else 0))
                for count, cols in ((nt - 1, tn), (1, last_n)))
    b_reads = 1 if resident(spec, tn, tk, rates) else mt  # a resident panel: once at least
    gdram = spec.batch * (spec.m * nt * a_row + b_reads * spec.k * b_row + spec.m * c_row)
    k_padded = (kt - 1) * round_up(tk, k_al) + round_up(last_k, k_al)
    n_padded = (nt - 1) * round_up(tn, n_al) + round_up(last_n, n_al)
    tfu = spec.batch * spec.m * k_padded * n_padded / rates.macs / p
    io = gdram * 1000 / min(rates.millibytes, p * rates.core_millibytes)  # averaged over cores
    return max(io, tfu)


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling (and task count) of least predicted cycles among those that fit NRAM and
    WRAM with every pipeline buffer (ties: fewer stages).

    Candidates are costed in the order of a lower bound on their cycles, and the search
    stops once that bound exceeds the best cost found (exact, not a heuristic)."""
    rates = Rates.of(target, 1)
    nram, wram = target.buffer("NRAM").bytes, target.buffer("WRAM").bytes
    cores = int(target.cores.value)
    ms = [t for t in _M_TILES if t < spec.m] + [spec.m]
    ns = [t for t in (rates.n_align * a for a in _N_ALIGNS) if t < spec.n] + [spec.n]
    ks = [t for t in (rates.k_align * a for a in _K_ALIGNS) if t < spec.k] + [spec.k]
    tasks = [p for p in _TASKS if p <= cores]
    candidates: list[Tiling] = []
    for tm, tn, tk in itertools.product(ms, ns, ks):
        used = nram_layout(spec, tm, tn, tk, rates)["used"]
        wused = wram_bytes(spec, tn, tk, rates)
        if used > nram or wused > wram:
            continue
        tiles = spec.batch * ceil_div(spec.m, tm) * ceil_div(spec.n, tn)
        for p in tasks:
            if p > 1 and p > tiles:
                break
            candidates.append(Tiling(tm, tn, tk, p, buffers={"NRAM": used, "WRAM": wused}))
    return best_tiling(
        candidates, lambda c: _gemm_cost(spec, c, target),
        f"no tiling of {spec.name} ({spec.m}x{spec.k}x{spec.n}) fits {nram} bytes of NRAM "
        f"and {wram} of WRAM",
        bound=lambda c: lower_bound(spec, c.tile_m, c.tile_n, c.tile_k, c.cores, rates),
    )


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelCost:
    """Cycles of the kernel, stage by stage, as ``include/bang_sim.h`` counts them."""
    return launched(by_kind(spec, tiling, lambda g, t: _gemm_cost(g, t, target),
                            lambda i: _im2col_cost(i, target)), target, PIPES[0])


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelCost:
    tm, tn, tk, p = tiling.tile_m, tiling.tile_n, min(tiling.tile_k, spec.k), tiling.cores
    r = Rates.of(target, p)
    e = r.in_bytes
    mt, nt, kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
    tiles = spec.batch * mt * nt
    per_core = ceil_div(tiles, p)
    # [core, local tile] -> global tile (column-major: i fastest; a contiguous run per core);
    # then [core, step] with step = local tile x kt + chunk
    tile = np.arange(p)[:, None] * per_core + np.arange(per_core)[None, :]
    valid = tile < tiles
    i, j = tile % mt, (tile // mt) % nt
    column = tile // mt
    new_column = np.ones_like(valid)
    new_column[:, 1:] = column[:, 1:] != column[:, :-1]
    load_b = np.repeat(new_column | (not resident(spec, tn, tk, r)), kt, axis=1)
    rows = np.where(valid, np.where(i == mt - 1, spec.m - (mt - 1) * tm, tm), 0)
    cols = np.where(valid, np.where(j == nt - 1, spec.n - (nt - 1) * tn, tn), 0)
    rows, cols = np.repeat(rows, kt, axis=1), np.repeat(cols, kt, axis=1)
    chunk = np.tile(np.arange(kt), per_core)[None, :]
    kk = np.where(chunk == kt - 1, spec.k - (kt - 1) * tk, tk) * (rows > 0)
    kp, np_ = -(-kk // r.k_align) * r.k_align, -(-cols // r.n_align) * r.n_align
    first, last = (chunk == 0) & (rows > 0), (chunk == kt - 1) & (rows > 0)
    has_bias = spec.bias != "none"
    bias_elems = rows if spec.bias == "row" else cols

    load_b &= rows > 0
    load_io = r.load(rows, e * kk) + np.where(load_b, r.load(kk, e * cols), 0)
    if has_bias:
        load_io += np.where(first, r.load(np.ones_like(rows), OUT_BYTES * bias_elems), 0)
    padded_k = kk < kp
    zero_vfu = np.where(padded_k, r.vec(e * (-(-rows * kp // r.line) * r.line))
                        + np.where(load_b, r.vec(e * kp * np_), 0), 0)
    layout_vfu = np.where(load_b, 2 * r.vec(e * kp * np_), 0)  # transpose, reshape_filter
    move = np.where(load_b, r.issue + -(-e * kp * np_ // r.move), 0)
    tfu = -(-rows * kp * np_ // r.macs)
    comp_vfu = np.zeros_like(tfu)  # the partial sums are added by __bang_conv_partial
    if spec.bias == "col":
        comp_vfu += np.where(last, r.vec(OUT_BYTES * rows * np_), 0)
    elif spec.bias == "row":
        comp_vfu += np.where(last, rows * r.vec(OUT_BYTES * np_), 0)
    store_io = np.where(last, r.store(rows, OUT_BYTES * cols), 0)

    head = 1 if first_padded(spec, tk, r) else 0  # the stage zeroing step 0's padding

    def at(x: np.ndarray, delay: int) -> np.ndarray:
        """The per-step array as charged in stage ``step + delay + head`` (iteration i of
        the loop is stage i + head)."""
        return np.pad(x, ((0, 0), (delay + head, PIPELINE_DEPTH - delay)))

    steps = valid.sum(axis=1) * kt
    iteration = np.arange(steps.max(initial=0) + PIPELINE_DEPTH + head)[None, :]
    live = (iteration < (steps + PIPELINE_DEPTH + head)[:, None]) & (steps > 0)[:, None]
    sync = np.where(live, r.sync, 0)
    # step j's padding is zeroed in the iteration before its load (step 0's in the head)
    zero_at = (at(zero_vfu, -1) if head
               else np.pad(zero_vfu[:, 1:], ((0, 0), (0, PIPELINE_DEPTH + 1))))
    pipes = {
        "ALU": sync,
        "VFU": zero_at + at(layout_vfu, 1) + at(comp_vfu, 3) + sync,
        "TFU": at(tfu, 3) + sync,
        "IO-DMA": at(load_io, 0) + at(store_io, 4) + sync,
        "Move-DMA": at(move, 2) + sync,
    }
    stage = np.max(np.stack(list(pipes.values())), axis=0)
    per_core_cycles = stage.sum(axis=1)
    slowest = int(np.argmax(per_core_cycles))
    # GDRAM bytes all cores move, in whole units (the RMW reads of partial stores excluded)
    gdram = (
        rows * -(-e * kk // r.unit) * r.unit
        + np.where(load_b, kk * -(-e * cols // r.unit) * r.unit, 0)
        + np.where(last, rows * -(-OUT_BYTES * cols // r.unit) * r.unit, 0)
    )
    if has_bias:
        gdram += np.where(first, -(-OUT_BYTES * bias_elems // r.unit) * r.unit, 0)
    return KernelCost(
        cycles=int(per_core_cycles[slowest]),
        pipes={name: int(v[slowest].sum()) for name, v in pipes.items()},
        stages=int(np.count_nonzero(stage[slowest])),
        macs=spec.macs,
        padded_macs=int((rows * kp * np_).sum()),
        dram_bytes=int(gdram.sum()),
    )


def _im2col_taps(spec: Im2colSpec) -> tuple[list[int], list[int]]:
    """Per kernel tap (ki, kj): valid output rows, and valid output columns per row."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left = spec.pads[0], spec.pads[1]
    ho, wo = spec.out_hw
    oh_valid, ow_valid = [], []
    for ki, kj in itertools.product(range(kh), range(kw)):
        oh_valid.append(sum(0 <= o * sh - top + ki * dh < spec.height for o in range(ho)))
        ow_valid.append(sum(0 <= o * sw - left + kj * dw < spec.width for o in range(wo)))
    return oh_valid, ow_valid


def im2col_tasks(spec: Im2colSpec, target: Target) -> int:
    """taskDim of an im2col: one row of cols per task at a time, at most the cores."""
    return min(int(target.cores.value), spec.images * spec.groups * spec.k)


def _im2col_cost(spec: Im2colSpec, target: Target) -> KernelCost:
    p = im2col_tasks(spec, target)
    r = Rates.of(target, p)
    e = r.in_bytes
    ho, wo = spec.out_hw
    oh_valid, ow_valid = (np.array(v, dtype=np.int64) for v in _im2col_taps(spec))
    sw = spec.strides[1]
    if sw == 1:
        gather = oh_valid * np.where(ow_valid > 0, r.load(np.ones_like(ow_valid), e * ow_valid), 0)
    else:
        gather = oh_valid * np.where(ow_valid > 0, r.load(ow_valid, e * np.ones_like(ow_valid)), 0)
    taps = len(oh_valid)
    io = gather + int(r.store(np.array(1), np.array(e * ho * wo))) + r.sync
    zero = int(r.vec(np.array(e * row_len(ho * wo, r))))
    rows = spec.images * spec.groups * spec.k
    tap_of_row = np.arange(rows) % taps
    core = np.arange(rows) % p
    # a row's stage: its gathers and store, and the zeroing of the next row's buffer
    has_next = np.arange(rows) + p < rows
    per_row = np.maximum(io[tap_of_row], np.where(has_next, zero, 0) + r.sync)
    per_core = np.bincount(core, weights=per_row, minlength=p).astype(np.int64)
    per_core += np.where(np.bincount(core, minlength=p) > 0, zero + r.sync, 0)  # first stage
    slowest = int(np.argmax(per_core))
    mine = core == slowest
    count = int(np.count_nonzero(mine))
    stages = count + 1
    pipes = {
        "ALU": r.sync * stages,
        "VFU": zero * (1 + int(np.count_nonzero(has_next & mine))) + r.sync * stages,
        "TFU": r.sync * stages,
        "IO-DMA": int(io[tap_of_row[mine]].sum()) + r.sync,
        "Move-DMA": r.sync * stages,
    }
    return KernelCost(int(per_core[slowest]), pipes, stages, 0, 0, spec.compulsory_bytes(e))


def row_len(hw: int, rates: Rates) -> int:
    """Elements of the NRAM row buffer: whole vector lines."""
    return round_up(hw, rates.line)



"""The mlu target: a Cambricon MLU370-style chip programmed in BANG C (TARGETS.md).

Model. A GEMM's output tiles (``TM x TN``, dealt round-robin to ``taskDim`` cores in the
order of :func:`hw_targets.base.grid_cost`) are cut into k-chunks of ``TK``; a *step* is one
(tile, chunk). Each core runs its steps through a software pipeline in the manner of
mlu-ops ``binary_op_3pipeline.h``, with the right-hand matrix's move to WRAM as an extra
stage: iteration ``i`` loads step ``i`` (A and B chunks GDRAM2NRAM, plus the tile's bias on
its first chunk), transposes the B chunk of step ``i-1`` into the layout WRAM expects and
moves it NRAM2WRAM, multiplies step ``i-2`` on the tensor unit (and adds it to the tile's
fp32 accumulator, and the bias on the last chunk), and stores the tile whose last step
was ``i-3``. One iteration is a stage; a core with ``S`` steps runs ``S + 3`` of them
(the fill and drain of the pipeline are charged). Pipes (V): ALU, VFU, TFU, IO-DMA,
Move-DMA. Charges, per call, in integer cycles::

    IO-DMA   ceil(bytes' * taskDim / dram_bytes_per_cycle), bytes' = segments x size
             rounded up to 64 B units; a store leaving a partial unit adds one (RMW)
    Move     ceil(bytes / move_bytes_per_cycle)
    TFU      ceil(rows x round_up(k, 32) x round_up(n, 64) / macs_per_cycle)
    VFU      bytes / 128 (transpose, accumulate, bias, zeroing of padded chunks)
    stage    max over pipes + sync_cycles (the barrier at the end of every iteration)

A core's cycles are the sum of its stages; a kernel's, its slowest core's. Using fewer
cores (``Tiling.cores`` = taskDim) gives each a larger share of the DRAM bandwidth, so the
tiling search picks the task count too. SRAM (shared by a cluster) is declared but not
used: each core reads its own operands from GDRAM.

The im2col kernel writes one row of ``cols`` per stage: VFU zeroes the row in NRAM, IO-DMA
gathers the valid input pixels of each output row (one segment when the stride is 1, one
2-byte segment per pixel otherwise, each costing a 64 B unit) and stores the row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hw_targets.base import (
    Buffer,
    Cost,
    KernelSource,
    Param,
    Target,
    Tiling,
    UnsupportedKernel,
    ceil_div,
    round_up,
)
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["HEADER", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

HEADER = "bang_sim.h"
PIPES = ("ALU", "VFU", "TFU", "IO-DMA", "Move-DMA")

_CLOCK = 1.3e9
_CLUSTERS = 8
_CORES_PER_CLUSTER = 4
_FP16_FLOPS = 96e12
_DRAM_BYTES_PER_S = 614.4e9
_KB = 1024

TARGET = Target(
    name="mlu",
    dialect="BANG C",
    summary="Cambricon MLU370-X8 style: NRAM/WRAM per core, TFU matmul, 5 pipes per core",
    clock_hz=Param(_CLOCK, "Hz", "V", "MLU370-X8 clock (TARGETS.md: Cambricon)"),
    cores=Param(
        _CLUSTERS * _CORES_PER_CLUSTER, "cores", "U",
        "clusters (U) x 4 compute cores per cluster (V, mlu-ops kernel.h)",
    ),
    buffers=(
        Buffer("NRAM", Param(640 * _KB, "bytes", "V",
                             "768 KB NRAM per core, 640 KB usable (mlu-ops kernel.h)"), 64),
        Buffer("WRAM", Param(1024 * _KB, "bytes", "S", "1024 KB WRAM per core (TARGETS.md)"), 64),
        Buffer("SRAM", Param(4096 * _KB, "bytes", "V", "4 MB SRAM per cluster (mlu-ops docs)"),
               64, scope="cluster"),
    ),
    dram_bytes_per_cycle=Param(
        _DRAM_BYTES_PER_S / _CLOCK, "B/cycle", "S",
        "614.4 GB/s LPDDR5 of the MLU370-X8 (S) at 1.3 GHz (V), shared by the active cores",
    ),
    macs_per_cycle=Param(
        round(_FP16_FLOPS / 2 / _CLOCK / (_CLUSTERS * _CORES_PER_CLUSTER)), "MAC/cycle", "U",
        "unpublished per-core TFU rate: 96 TFLOPS fp16 (S) / 2 / 1.3 GHz / 32 cores",
    ),
    in_dtype="half",
    params={
        "clusters": Param(_CLUSTERS, "clusters", "U",
                          "MLU370-X8: 2 chips x 2 dies (S); 2 clusters per die assumed"),
        "cores_per_cluster": Param(_CORES_PER_CLUSTER, "cores", "V",
                                   "4 compute + 1 memory core per cluster (mlu-ops docs)"),
        "nram_physical": Param(768 * _KB, "bytes", "V", "NRAM per core before the stack"),
        "fp16_flops": Param(_FP16_FLOPS, "FLOP/s", "S", "MLU370-X8 fp16 peak"),
        "dram_bytes_per_s": Param(_DRAM_BYTES_PER_S, "B/s", "S", "MLU370-X8 memory bandwidth"),
        "gdram_unit": Param(64, "bytes", "V", "GDRAM accessed in 64 B aligned units (mlu-ops)"),
        "vector_bytes": Param(128, "bytes", "V", "vector work costs ceil(bytes/128) cycles"),
        "k_align": Param(32, "fp16", "V", "matmul K padded to 64 B / sizeof(half)"),
        "n_align": Param(64, "channels", "V", "output channels padded to 64 (WRAM lanes)"),
        "move_bytes_per_cycle": Param(128, "B/cycle", "U",
                                      "NRAM2WRAM/NRAM2NRAM rate, assumed one vector line"),
        "sync_cycles": Param(64, "cycles", "U", "barrier at the end of a pipeline iteration"),
        "paper_c_conv": Param(1.5, "ratio", "U",
                              "claimed by the paper, eq. 9; not a measurement"),
    },
)

_PIPELINE_DEPTH = 3  # iterations between a step's load and its tile's store


def defines(target: Target) -> dict[str, int]:
    return {
        "nram_bytes": target.buffer("NRAM").bytes,
        "wram_bytes": target.buffer("WRAM").bytes,
        "cores_per_cluster": int(target.param("cores_per_cluster")),
        "dram_millibytes_per_cycle": round(1000 * float(target.dram_bytes_per_cycle)),
        "macs_per_cycle": int(target.macs_per_cycle),
        "move_bytes_per_cycle": int(target.param("move_bytes_per_cycle")),
        "sync_cycles": int(target.param("sync_cycles")),
        "gdram_unit": int(target.param("gdram_unit")),
        "vector_bytes": int(target.param("vector_bytes")),
        "k_align": int(target.param("k_align")),
        "n_align": int(target.param("n_align")),
    }


@dataclass(frozen=True)
class _Rates:
    """The integer constants of :func:`defines`, with the charges of bang_sim.h."""

    millibytes: int
    tasks: int
    macs: int
    move: int
    sync: int
    unit: int
    vector: int
    k_align: int
    n_align: int

    @classmethod
    def of(cls, target: Target, tasks: int) -> _Rates:
        d = defines(target)
        return cls(d["dram_millibytes_per_cycle"], tasks, d["macs_per_cycle"],
                   d["move_bytes_per_cycle"], d["sync_cycles"], d["gdram_unit"],
                   d["vector_bytes"], d["k_align"], d["n_align"])

    def io(self, nbytes: np.ndarray) -> np.ndarray:
        return -(-nbytes * self.tasks * 1000 // self.millibytes)

    def load(self, segments: np.ndarray, size: np.ndarray) -> np.ndarray:
        return self.io(segments * (-(-size // self.unit) * self.unit))

    def store(self, segments: np.ndarray, size: np.ndarray) -> np.ndarray:
        rmw = np.where(size % self.unit != 0, self.unit, 0)
        return self.io(segments * (-(-size // self.unit) * self.unit + rmw))

    def vec(self, nbytes: np.ndarray) -> np.ndarray:
        return -(-nbytes // self.vector)


def _slot(tm: int, tkp: int, rates: _Rates) -> int:
    """Elements of one A slot: zeroed whole, so a multiple of a vector line of fp16."""
    return round_up(tm * tkp, rates.vector // 2)


def _bias_len(spec: GemmSpec, tm: int, tnp: int) -> int:
    return {"none": 0, "row": round_up(tm, 16), "col": tnp}[spec.bias]


def _nram_layout(spec: GemmSpec, tm: int, tn: int, tk: int, rates: _Rates) -> dict[str, int]:
    """Byte offsets of the NRAM regions (each a multiple of 64 B), ending with ``used``."""
    tkp, tnp = round_up(min(tk, spec.k), rates.k_align), round_up(tn, rates.n_align)
    sizes = {
        "a": 3 * 2 * _slot(tm, tkp, rates),  # loaded at i, multiplied at i + 2
        "b_stage": 2 * 2 * tkp * tnp,  # loaded at i, moved at i + 1
        "b_t": 2 * tnp * tkp,
        "acc": 2 * 4 * tm * tnp,  # one tile accumulates while the previous one is stored
        "part": 4 * tm * tnp,
        "bias": 3 * 4 * _bias_len(spec, tm, tnp),  # lives from a tile's first load to its end
    }
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = at
        at += size
    offsets["used"] = at
    return offsets


def _wram_bytes(spec: GemmSpec, tn: int, tk: int, rates: _Rates) -> int:
    return 2 * 2 * round_up(tn, rates.n_align) * round_up(min(tk, spec.k), rates.k_align)


def _lower_bound(spec: GemmSpec, tm: int, tn: int, tk: int, p: int, rates: _Rates) -> float:
    """Cycles the slowest core needs at least: the average over cores of the IO-DMA and
    TFU work (the per-copy rounding up and the VFU, Move and barriers left out)."""
    mt, nt, kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
    last_k, last_n = spec.k - (kt - 1) * tk, spec.n - (nt - 1) * tn
    unit, k_al, n_al = rates.unit, rates.k_align, rates.n_align
    a_row = (kt - 1) * round_up(2 * tk, unit) + round_up(2 * last_k, unit)
    b_row = (nt - 1) * round_up(2 * tn, unit) + round_up(2 * last_n, unit)
    c_row = sum(count * (round_up(4 * cols, unit) + (unit if 4 * cols % unit else 0))
                for count, cols in ((nt - 1, tn), (1, last_n)))
    gdram = spec.batch * (spec.m * nt * a_row + mt * spec.k * b_row + spec.m * c_row)
    k_padded = (kt - 1) * round_up(tk, k_al) + round_up(last_k, k_al)
    n_padded = (nt - 1) * round_up(tn, n_al) + round_up(last_n, n_al)
    tfu = spec.batch * spec.m * k_padded * n_padded / rates.macs / p
    io = gdram * 1000 / rates.millibytes  # summed over cores: x taskDim, averaged: / taskDim
    return max(io, tfu)


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling (and task count) of least predicted cycles among those that fit NRAM and
    WRAM with every pipeline buffer (ties: fewer stages).

    Candidates are costed in the order of a lower bound on their cycles, and the search
    stops once that bound exceeds the best cost found (exact, not a heuristic)."""
    rates = _Rates.of(target, 1)
    nram, wram = target.buffer("NRAM").bytes, target.buffer("WRAM").bytes
    cores = int(target.cores.value)
    ms = [t for t in (16, 32, 64, 128, 256, 512) if t < spec.m] + [spec.m]
    ns = [t for t in (64, 128, 256, 512, 1024) if t < spec.n] + [spec.n]
    ks = [t for t in (64, 128, 256, 512, 1024, 2048) if t < spec.k] + [spec.k]
    tasks = [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= cores]
    candidates: list[tuple[float, Tiling]] = []
    for tm, tn, tk in itertools.product(ms, ns, ks):
        used = _nram_layout(spec, tm, tn, tk, rates)["used"]
        wused = _wram_bytes(spec, tn, tk, rates)
        if used > nram or wused > wram:
            continue
        tiles = spec.batch * ceil_div(spec.m, tm) * ceil_div(spec.n, tn)
        for p in tasks:
            if p > 1 and p > tiles:
                break
            bound = _lower_bound(spec, tm, tn, tk, p, rates)
            candidates.append((bound, Tiling(tm, tn, tk, p, buffers={"NRAM": used,
                                                                     "WRAM": wused})))
    if not candidates:
        raise UnsupportedKernel(
            f"no tiling of {spec.name} ({spec.m}x{spec.k}x{spec.n}) fits {nram} bytes of NRAM "
            f"and {wram} of WRAM"
        )
    best: tuple[int, int, Tiling] | None = None
    for bound, candidate in sorted(candidates, key=lambda c: c[0]):
        if best is not None and bound > best[0]:
            break
        c = cost(spec, candidate, target)
        if best is None or (c.cycles, c.stages) < best[:2]:
            best = (c.cycles, c.stages, candidate)
    assert best is not None
    return best[2]


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> Cost:
    if isinstance(spec, Im2colSpec):
        return _im2col_cost(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    return _gemm_cost(spec, tiling, target)


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> Cost:
    tm, tn, tk, p = tiling.tile_m, tiling.tile_n, min(tiling.tile_k, spec.k), tiling.cores
    r = _Rates.of(target, p)
    mt, nt, kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
    tiles = spec.batch * mt * nt
    per_core = ceil_div(tiles, p)
    # [core, local tile] -> global tile; then [core, step] with step = local tile x kt + chunk
    tile = np.arange(per_core)[None, :] * p + np.arange(p)[:, None]
    valid = tile < tiles
    i, j = (tile // nt) % mt, tile % nt
    rows = np.where(valid, np.where(i == mt - 1, spec.m - (mt - 1) * tm, tm), 0)
    cols = np.where(valid, np.where(j == nt - 1, spec.n - (nt - 1) * tn, tn), 0)
    rows, cols = np.repeat(rows, kt, axis=1), np.repeat(cols, kt, axis=1)
    chunk = np.tile(np.arange(kt), per_core)[None, :]
    kk = np.where(chunk == kt - 1, spec.k - (kt - 1) * tk, tk) * (rows > 0)
    kp, np_ = -(-kk // r.k_align) * r.k_align, -(-cols // r.n_align) * r.n_align
    first, last = (chunk == 0) & (rows > 0), (chunk == kt - 1) & (rows > 0)
    has_bias = spec.bias != "none"
    bias_len = rows if spec.bias == "row" else cols

    load_io = r.load(rows, 2 * kk) + r.load(kk, 2 * cols)
    if has_bias:
        load_io += np.where(first, r.load(np.ones_like(rows), 4 * bias_len), 0)
    padded_k = kk < kp
    load_vfu = np.where(padded_k, r.vec(2 * (-(-rows * kp // (r.vector // 2)) * (r.vector // 2)))
                        + r.vec(2 * kp * np_), 0)
    move_vfu = r.vec(2 * kp * np_)
    move = -(-2 * kp * np_ // r.move)
    tfu = -(-rows * kp * np_ // r.macs)
    comp_vfu = np.where(chunk > 0, r.vec(4 * rows * np_), 0)
    if spec.bias == "col":
        comp_vfu += np.where(last, r.vec(4 * rows * np_), 0)
    elif spec.bias == "row":
        comp_vfu += np.where(last, rows * r.vec(4 * np_), 0)
    store_io = np.where(last, r.store(rows, 4 * cols), 0)

    def at(x: np.ndarray, delay: int) -> np.ndarray:
        """The per-step array as charged in iteration ``step + delay``."""
        return np.pad(x, ((0, 0), (delay, _PIPELINE_DEPTH - delay)))

    steps = valid.sum(axis=1) * kt
    iteration = np.arange(steps.max(initial=0) + _PIPELINE_DEPTH)[None, :]
    live = (iteration < (steps + _PIPELINE_DEPTH)[:, None]) & (steps > 0)[:, None]
    sync = np.where(live, r.sync, 0)
    pipes = {
        "ALU": sync,
        "VFU": at(load_vfu, 0) + at(move_vfu, 1) + at(comp_vfu, 2) + sync,
        "TFU": at(tfu, 2) + sync,
        "IO-DMA": at(load_io, 0) + at(store_io, 3) + sync,
        "Move-DMA": at(move, 1) + sync,
    }
    stage = np.max(np.stack(list(pipes.values())), axis=0)
    per_core_cycles = stage.sum(axis=1)
    slowest = int(np.argmax(per_core_cycles))
    # GDRAM bytes all cores move, in 64 B units (the RMW reads of partial stores excluded)
    gdram = (
        rows * -(-2 * kk // r.unit) * r.unit
        + kk * -(-2 * cols // r.unit) * r.unit
        + np.where(last, rows * -(-4 * cols // r.unit) * r.unit, 0)
    )
    if has_bias:
        gdram += np.where(first, -(-4 * bias_len // r.unit) * r.unit, 0)
    return Cost(
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


def _im2col_tasks(spec: Im2colSpec, target: Target) -> int:
    return min(int(target.cores.value), spec.images * spec.groups * spec.k)


def _im2col_cost(spec: Im2colSpec, target: Target) -> Cost:
    p = _im2col_tasks(spec, target)
    r = _Rates.of(target, p)
    ho, wo = spec.out_hw
    oh_valid, ow_valid = (np.array(v, dtype=np.int64) for v in _im2col_taps(spec))
    sw = spec.strides[1]
    if sw == 1:
        gather = oh_valid * np.where(ow_valid > 0, r.load(np.ones_like(ow_valid), 2 * ow_valid), 0)
    else:
        gather = oh_valid * np.where(ow_valid > 0, r.load(ow_valid, 2 * np.ones_like(ow_valid)), 0)
    taps = len(oh_valid)
    io = gather + int(r.store(np.array(1), np.array(2 * ho * wo))) + r.sync
    vfu = int(r.vec(np.array(2 * _row_len(ho * wo, r)))) + r.sync
    per_tap = np.maximum(np.maximum(io, vfu), r.sync)
    rows = spec.images * spec.groups * spec.k
    tap_of_row = np.arange(rows) % taps
    core = np.arange(rows) % p
    per_core = np.bincount(core, weights=per_tap[tap_of_row], minlength=p).astype(np.int64)
    slowest = int(np.argmax(per_core))
    mine = tap_of_row[core == slowest]
    count = len(mine)
    pipes = {
        "ALU": r.sync * count,
        "VFU": (vfu) * count,
        "TFU": r.sync * count,
        "IO-DMA": int(io[mine].sum()),
        "Move-DMA": r.sync * count,
    }
    return Cost(int(per_core[slowest]), pipes, count, 0, 0, spec.compulsory_bytes(2))


def _row_len(hw: int, rates: _Rates) -> int:
    """Elements of the NRAM row buffer: whole vector lines of fp16."""
    return round_up(hw, rates.vector // 2)


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    if isinstance(spec, Im2colSpec):
        return _emit_im2col(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    return _emit_gemm(spec, tiling, target)


def _emit_gemm(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelSource:
    r = _Rates.of(target, tiling.cores)
    tm, tn, tk = tiling.tile_m, tiling.tile_n, min(tiling.tile_k, spec.k)
    layout = _nram_layout(spec, tm, tn, tk, r)
    bias_len = _bias_len(spec, tm, round_up(tn, r.n_align))
    load_bias = {
        "none": "",
        "row": """
      if (st.s == 0)
        __memcpy_async(bias_nram[st.lt % 3], bias + st.bias_off + st.ti * TM, st.rows * 4,
                       GDRAM2NRAM);""",
        "col": """
      if (st.s == 0)
        __memcpy_async(bias_nram[st.lt % 3], bias + st.bias_off + st.tj * TN, st.cols * 4,
                       GDRAM2NRAM);""",
    }[spec.bias]
    add_bias = {
        "none": "",
        "row": """
      if (st.s == KT - 1)
        for (int r = 0; r < st.rows; ++r)
          __bang_add_scalar(acc + r * st.np, acc + r * st.np, bias_nram[st.lt % 3][r], st.np);""",
        "col": """
      if (st.s == KT - 1)
        __bang_cycle_add(acc, acc, bias_nram[st.lt % 3], st.rows * st.np, st.np);""",
    }[spec.bias]
    bias_note = {"none": "", "row": " + bias[row]", "col": " + bias[col]"}[spec.bias]
    shape = f"{spec.batch} x {spec.m}x{spec.k}x{spec.n}"
    code = f"""/* {spec.name}: C[b] = A[b] @ B[b]{bias_note}, {shape} (A, B half; C float), BANG C.
   Tiles {tm}x{tn} of C, k-chunks of {tk}, dealt round-robin to taskDim = {tiling.cores} cores.
   A step is (tile, k-chunk); iteration i of the pipeline loads step i (GDRAM2NRAM), moves
   the B chunk of step i-1 to WRAM (transposed: WRAM holds N lanes of K), multiplies step
   i-2 on the TFU into the fp32 accumulator, and stores the tile whose last step was i-3.
   NRAM: {layout["used"]} of MAX_NRAM_SIZE bytes; WRAM: {_wram_bytes(spec, tn, tk, r)} bytes. */
namespace {spec.name} {{
constexpr int kTaskDim = {tiling.cores};
constexpr long M = {spec.m}, K = {spec.k}, N = {spec.n}, BATCH = {spec.batch};
constexpr long TM = {tm}, TN = {tn}, TK = {tk};
constexpr long TKP = (TK + {r.k_align - 1}) / {r.k_align} * {r.k_align};
constexpr long TNP = (TN + {r.n_align - 1}) / {r.n_align} * {r.n_align};
constexpr long MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK;
constexpr long TILES = BATCH * MT * NT;
constexpr long A_SLOT = {_slot(tm, round_up(tk, r.k_align), r)}, BIAS_SLOT = {bias_len};

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];
__wram__ int8_t wram_buffer[MAX_WRAM_SIZE];

struct Step {{
  long lt, s, bb, ti, tj, bias_off;
  int rows, cols, kk, kp, np;
}};

// Step j of this task: local tile j / KT (global tile taskId + lt * taskDim), chunk j % KT.
__mlu_func__ Step step(long j) {{
  Step st;
  st.lt = j / KT;
  st.s = j % KT;
  const long t = taskId + st.lt * taskDim;
  st.bb = t / (MT * NT);
  st.ti = (t / NT) % MT;
  st.tj = t % NT;
  st.bias_off = (st.bb % {spec.bias_operand.period}) * {spec.bias_operand.stride}L;
  st.rows = (int)(st.ti == MT - 1 ? M - st.ti * TM : TM);
  st.cols = (int)(st.tj == NT - 1 ? N - st.tj * TN : TN);
  st.kk = (int)(st.s == KT - 1 ? K - st.s * TK : TK);
  st.kp = (st.kk + {r.k_align - 1}) / {r.k_align} * {r.k_align};
  st.np = (st.cols + {r.n_align - 1}) / {r.n_align} * {r.n_align};
  return st;
}}

__mlu_global__ void kernel(half* a, half* b, float* bias, float* c) {{
  half* a_nram[3];
  for (int q = 0; q < 3; ++q) a_nram[q] = (half*)(nram_buffer + {layout["a"]}) + q * A_SLOT;
  half* b_stage[2] = {{(half*)(nram_buffer + {layout["b_stage"]}),
                      (half*)(nram_buffer + {layout["b_stage"]}) + TKP * TNP}};
  half* b_t = (half*)(nram_buffer + {layout["b_t"]});
  float* acc_nram[2] = {{(float*)(nram_buffer + {layout["acc"]}),
                        (float*)(nram_buffer + {layout["acc"]}) + TM * TNP}};
  float* part = (float*)(nram_buffer + {layout["part"]});
  float* bias_nram[3];
  for (int q = 0; q < 3; ++q)
    bias_nram[q] = (float*)(nram_buffer + {layout["bias"]}) + q * BIAS_SLOT;
  half* b_wram[2] = {{(half*)wram_buffer, (half*)wram_buffer + TKP * TNP}};

  const long tiles = taskId < TILES ? (TILES - taskId + taskDim - 1) / taskDim : 0;
  const long steps = tiles * KT;
  for (long i = 0; steps > 0 && i < steps + 3; ++i) {{
    if (i < steps) {{  // load step i
      const Step st = step(i);
      half* an = a_nram[i % 3];
      half* bn = b_stage[i % 2];
      if (st.kk < st.kp) {{  // the TFU multiplies the padded K: zero it
        __bang_write_zero(an, (st.rows * st.kp + {r.vector // 2 - 1}) / {r.vector // 2} * \
{r.vector // 2});
        __bang_write_zero(bn, st.kp * st.np);
      }}
      __memcpy_async(an, a + (st.bb % {spec.a.period}) * {spec.a.stride}L + st.ti * TM * K \
+ st.s * TK,
                     st.kk * 2, GDRAM2NRAM, st.kp * 2, K * 2, st.rows - 1);
      __memcpy_async(bn, b + (st.bb % {spec.b.period}) * {spec.b.stride}L + st.s * TK * N \
+ st.tj * TN,
                     st.cols * 2, GDRAM2NRAM, st.np * 2, N * 2, st.kk - 1);{load_bias}
    }}
    if (i >= 1 && i - 1 < steps) {{  // right-hand matrix of step i-1 to WRAM
      const Step st = step(i - 1);
      __bang_transpose(b_t, b_stage[(i - 1) % 2], st.kp, st.np);
      __memcpy_async(b_wram[(i - 1) % 2], b_t, st.np * st.kp * 2, NRAM2WRAM);
    }}
    if (i >= 2 && i - 2 < steps) {{  // multiply step i-2
      const Step st = step(i - 2);
      float* acc = acc_nram[st.lt % 2];
      if (st.s == 0) {{
        __bang_matmul(acc, a_nram[(i - 2) % 3], b_wram[(i - 2) % 2], st.rows, st.kp, st.np);
      }} else {{
        __bang_matmul(part, a_nram[(i - 2) % 3], b_wram[(i - 2) % 2], st.rows, st.kp, st.np);
        __bang_add(acc, acc, part, st.rows * st.np);
      }}{add_bias}
    }}
    if (i >= 3 && (i - 3) % KT == KT - 1) {{  // store the tile whose last step was i-3
      const Step st = step(i - 3);
      __memcpy_async(c + (st.bb % {spec.c.period}) * {spec.c.stride}L + st.ti * TM * N \
+ st.tj * TN,
                     acc_nram[st.lt % 2], st.cols * 4, NRAM2GDRAM, N * 4, st.np * 4, \
st.rows - 1);
    }}
    __sync_io();
    __sync_compute();
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    r = _Rates.of(target, _im2col_tasks(spec, target))
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left = spec.pads[0], spec.pads[1]
    if sw == 1:
        gather = """__memcpy_async(row + oh * WO + ow0, plane + ih * W + iw0, (ow1 - ow0) * 2,
                     GDRAM2NRAM);"""
    else:
        gather = """__memcpy_async(row + oh * WO + ow0, plane + ih * W + iw0, 2, GDRAM2NRAM, 2,
                     SW * 2, ow1 - ow0 - 1);"""
    code = f"""/* {spec.name}: im2col of {spec.images}x{spec.channels}x{spec.height}x{spec.width} \
(half) for a {kh}x{kw} kernel, {spec.groups} group(s): cols[img][g] is K x (Ho*Wo) = \
{spec.k} x {ho * wo}.
   One row of cols per iteration, rows dealt round-robin to taskDim cores: zero the row in
   NRAM, gather the valid pixels of each output row (GDRAM2NRAM on IO-DMA), store it. */
namespace {spec.name} {{
constexpr int kTaskDim = {_im2col_tasks(spec, target)};
constexpr long C = {spec.channels}, H = {spec.height}, W = {spec.width}, HO = {ho}, WO = {wo};
constexpr long G = {spec.groups}, CPG = C / G, KH = {kh}, KW = {kw}, KR = CPG * KH * KW;
constexpr long ROWS = {spec.images} * G * KR, ROW_LEN = {_row_len(ho * wo, r)};
constexpr long SH = {sh}, SW = {sw}, DH = {dh}, DW = {dw}, PT = {top}, PL = {left};

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];

__mlu_global__ void kernel(half* x, half* cols) {{
  half* row = (half*)nram_buffer;
  for (long t = taskId; t < ROWS; t += taskDim) {{
    const long img = t / (G * KR), g = (t / KR) % G, q = t % KR;
    const long ch = g * CPG + q / (KH * KW), ki = (q / KW) % KH, kj = q % KW;
    const half* plane = x + (img * C + ch) * H * W;
    __bang_write_zero(row, ROW_LEN);
    // output columns ow0 <= ow < ow1 read input columns inside the image
    long ow0 = 0, ow1 = WO;
    while (ow0 < WO && ow0 * SW - PL + kj * DW < 0) ++ow0;
    while (ow1 > ow0 && (ow1 - 1) * SW - PL + kj * DW >= W) --ow1;
    const long iw0 = ow0 * SW - PL + kj * DW;
    for (long oh = 0; oh < HO && ow1 > ow0; ++oh) {{
      const long ih = oh * SH - PT + ki * DH;
      if (ih < 0 || ih >= H) continue;
      {gather}
    }}
    __memcpy_async(cols + t * HO * WO, row, HO * WO * 2, NRAM2GDRAM);
    __sync_io();
    __sync_compute();
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    names = ", ".join(f'"{p}"' for p in PIPES)
    ns = kernel.name
    wram = (f"{ns}::wram_buffer, sizeof({ns}::wram_buffer)" if "b" in kernel.args
            else "nullptr, 0")
    return f"""qmsim::begin_kernel({{{names}}});
bang::bind({ns}::nram_buffer, sizeof({ns}::nram_buffer), {wram});
for (int task = 0; task < {ns}::kTaskDim; ++task) {{
  bang::start_task(task, {ns}::kTaskDim);
  qmsim::core_begin(task);
  {ns}::kernel({", ".join(args)});
  qmsim::core_end();
}}"""

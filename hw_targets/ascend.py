"""The ascend target: one Da Vinci AI Core of an Ascend 910, programmed in Ascend C style.

Description (TARGETS.md): per core L1 1 MB, L0A 64 KB, L0B 64 KB, L0C 256 KB, Unified
Buffer 256 KB, 32 cores, a 32 MB L2 shared by the chip; a cube unit of 16 x 16 x 16 fp16
MACs per cycle accumulating in fp32; fractals of 16 x 16 (512 B of fp16).

GEMM kernel. Output tiles of ``baseM x baseN`` are dealt round-robin to the cores (tile
``t = (b * mt + i) * nt + j`` runs on core ``t % cores``). A tile walks K in steps of
``baseK``; one step is a *stage*, in which queues of depth 2 let the pipes overlap, so
the stage costs its slowest pipe:

* MTE2: ``DataCopy`` A and B tiles GM -> L1 (ND -> NZ), ``bytes / l2_rate``: the reads are
  served by the L2, which holds the operands when they fit in it;
* HBM: the core's share of the chip's HBM (``dram_bytes_per_cycle / cores``, capped by
  ``ddr_rate``): an element is fetched once into L2 and read by ``reuse`` tiles (``nt``
  for A, ``mt`` for B, times the batches that share the operand), so a read is charged
  ``bytes / (reuse x rate)``; with operands larger than L2 every read goes to HBM;
* MTE1: ``LoadData`` L1 -> L0A (zZ) and L0B (zN), ``512 B per fractal / l1_to_l0_{a,b}_rate``
  per call (one call per fractal row of A, per fractal row of B);
* M: ``Mmad``, ``ceil(m/16) ceil(n/16) ceil(k/16)`` cycles: padding to 16 is the waste.

The epilogue of a tile overlaps the core's next tile, since L0C holds two C tiles: in its
first k-step, L0C -> UB ``DataCopy`` (V, ``l0_c_to_ub_rate``) and the bias (read by MTE2,
added by the vector unit at one cycle per repeat); then fractal column ``fj`` of C goes
UB -> GM by ``DataCopyPad`` in k-step ``fj % kt`` (MTE3 at ``ub_to_ddr_rate``, and HBM).
The core's last tile's epilogue is a stage of its own. A core
costs the sum of its stages, the kernel its slowest core; ``cost`` predicts exactly what
``include/ascend_sim.h`` counts.

Tiles are multiples of 16 that fit double-buffered: ``2 baseM baseK 2 B <= L0A``,
``2 baseK baseN 2 B <= L0B``, ``2 baseM baseN 4 B <= L0C`` (C of the next tile accumulates
while the previous one drains), the A1/B1 queues twice in L1, CO2 and the bias in UB.

im2col kernel. The 910 does img2col in hardware (``Load3D`` from L1 into L0A, fused into
the convolution), which avoids writing the cols matrix to GM and reading it back. Our
lowering has a separate im2col kernel, written here as a vector kernel: per (image,
channel) stage, ``DataCopyPad`` the plane GM -> UB (MTE2, HBM), ``Gather`` every tap's
row with byte offsets computed once per core (taps in the padding read a zeroed slot; the
scalar pipe is not modelled), and ``DataCopyPad`` the rows UB -> GM (MTE3, HBM).

Numbers are tagged ``V``/``S``/``U`` (see :mod:`hw_targets.base`); the rates of the paths are
field names read in CANN code with values from secondary sources.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

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

__all__ = ["HEADER", "PIPES", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

HEADER = "ascend_sim.h"
PIPES = ("MTE2", "MTE1", "M", "V", "MTE3", "HBM")
FRACTAL = 16  # elements along each side of a fractal (and of the cube)

_CCECONF = "mindspore-ai/akg src/contrib/cce_parm/cceconf.cc (cloud = Ascend 910)"
_FIXTURE = "CANN op-tiling test fixtures (hardware_info of an Ascend stub), via TARGETS.md"

TARGET = Target(
    name="ascend",
    dialect="Ascend C",
    summary="Ascend 910 Da Vinci AI Core: 16x16x16 fp16 cube, L1/L0A/L0B/L0C/UB, 32 cores",
    clock_hz=Param(1.0e9, "Hz", "U",
                   "256 TFLOPS fp16 [S] / (32 cores x 4096 MAC x 2) = 0.98 GHz, rounded"),
    cores=Param(32, "cores", "V", _CCECONF + " Core_num"),
    buffers=(
        Buffer("L1", Param(1 << 20, "bytes", "V", _CCECONF), 32),
        Buffer("L0A", Param(64 << 10, "bytes", "V", _CCECONF), 512),
        Buffer("L0B", Param(64 << 10, "bytes", "V", _CCECONF), 512),
        Buffer("L0C", Param(256 << 10, "bytes", "V", _CCECONF), 512),
        Buffer("UB", Param(256 << 10, "bytes", "V", _CCECONF + " Unified_Buffer"), 32),
    ),
    dram_bytes_per_cycle=Param(1200, "B/cycle", "U",
                               "1.2 TB/s HBM [S, TARGETS.md] at the 1 GHz clock [U]"),
    macs_per_cycle=Param(4096, "MAC/cycle", "S", "cube 16x16x16 fp16, Hot Chips 2019"),
    in_dtype="half",
    params={
        "cube_edge": Param(FRACTAL, "elements", "S", "16x16x16 cube, Hot Chips 2019"),
        "fractal_bytes": Param(512, "bytes", "V", "Ascend C Mmad doc: 16x16 fp16 fractal"),
        "l0_align": Param(512, "bytes", "V", "Ascend C Mmad doc: A/B start 512-byte aligned"),
        "l1_align": Param(32, "bytes", "U", "Ascend C's 32-byte DataCopy unit (not in TARGETS.md)"),
        "ub_align": Param(32, "bytes", "U", "Ascend C's 32-byte DataCopy unit (not in TARGETS.md)"),
        "l2_bytes": Param(32 << 20, "bytes", "V", _CCECONF + " L2_Buffer"),
        "hbm_bandwidth": Param(1.2e12, "B/s", "S", "Ascend 910 1.2 TB/s, TARGETS.md"),
        "l2_rate": Param(128, "B/cycle", "S", _FIXTURE + ": l2_rate 128 (field name V)"),
        "ddr_rate": Param(64, "B/cycle", "S",
                          _FIXTURE + ": ddr_write_rate 64 / ddr_read_rate 67 (field name V)"),
        "l1_to_l0_a_rate": Param(512, "B/cycle", "S", "TARGETS.md 512 (field name V)"),
        "l1_to_l0_b_rate": Param(256, "B/cycle", "S", "TARGETS.md 256 (field name V)"),
        "l0_c_to_ub_rate": Param(256, "B/cycle", "S", "TARGETS.md 256 (field name V)"),
        "ub_to_ddr_rate": Param(64, "B/cycle", "S", "TARGETS.md 64 (field name V)"),
        "vector_bytes_per_repeat": Param(256, "bytes", "S", "TARGETS.md: 128 fp16 / 64 fp32"),
        "vector_cycles_per_repeat": Param(1, "cycles", "U", "one repeat issued per cycle"),
        "paper_c_conv": Param(1.2, "ratio", "U",
                              "claimed by the paper, eq. 9; not a measurement"),
    },
)


def defines(target: Target) -> dict[str, int]:
    cores = int(target.cores.value)
    hbm_share = int(target.dram_bytes_per_cycle.value) // cores
    return {
        "l1_bytes": target.buffer("L1").bytes,
        "l0a_bytes": target.buffer("L0A").bytes,
        "l0b_bytes": target.buffer("L0B").bytes,
        "l0c_bytes": target.buffer("L0C").bytes,
        "ub_bytes": target.buffer("UB").bytes,
        "l1_align": int(target.param("l1_align")),
        "l0_align": int(target.param("l0_align")),
        "ub_align": int(target.param("ub_align")),
        "l2_rate": int(target.param("l2_rate")),
        "hbm_core_rate": max(1, min(int(target.param("ddr_rate")), hbm_share)),
        "l1_to_l0a_rate": int(target.param("l1_to_l0_a_rate")),
        "l1_to_l0b_rate": int(target.param("l1_to_l0_b_rate")),
        "l0c_to_ub_rate": int(target.param("l0_c_to_ub_rate")),
        "ub_to_ddr_rate": int(target.param("ub_to_ddr_rate")),
        "vector_bytes": int(target.param("vector_bytes_per_repeat")),
        "vector_repeat_cycles": int(target.param("vector_cycles_per_repeat")),
    }


# ---------------------------------------------------------------------------- GEMM model

Pipes = dict[str, int]


def _add(*parts: Mapping[str, int]) -> Pipes:
    total = dict.fromkeys(PIPES, 0)
    for part in parts:
        for name, value in part.items():
            total[name] += value
    return total


def _reuse(spec: GemmSpec, mt: int, nt: int, target: Target) -> tuple[int, int, int]:
    """Tiles that read each element of A, B and bias from L2 (1 when L2 cannot hold them)."""
    if spec.compulsory_bytes(2) > int(target.param("l2_bytes")):
        return 1, 1, 1
    shared = {name: max(1, spec.batch // op.period)
              for name, op in (("a", spec.a), ("b", spec.b), ("bias", spec.bias_operand))}
    bias_tiles = mt if spec.bias == "col" else nt
    return nt * shared["a"], mt * shared["b"], bias_tiles * shared["bias"]


def _buffers(spec: GemmSpec, tm: int, tn: int, tk: int) -> dict[str, int]:
    """Bytes each memory gives the kernel's queues (A1/B1/A2/B2/CO1 have depth 2)."""
    bias = {"none": 0, "row": tm, "col": tn}[spec.bias] * 4
    return {
        "L1": 2 * 2 * (tm * tk + tk * tn),
        "L0A": 2 * 2 * tm * tk,
        "L0B": 2 * 2 * tk * tn,
        "L0C": 2 * 4 * tm * tn,
        "UB": 4 * tm * tn + round_up(bias, 32),
    }


class _Model:
    """Per-stage pipe charges of one GEMM tiling, as the header's intrinsics charge them."""

    def __init__(self, spec: GemmSpec, tm: int, tn: int, tk: int, target: Target) -> None:
        self.spec, self.tm, self.tn, self.tk = spec, tm, tn, tk
        self.d = defines(target)
        self.mt, self.nt, self.kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
        self.reuse_a, self.reuse_b, self.reuse_bias = _reuse(spec, self.mt, self.nt, target)

    def _read(self, nbytes: int, reuse: int) -> Pipes:
        d = self.d
        return {"MTE2": ceil_div(nbytes, d["l2_rate"]),
                "HBM": ceil_div(nbytes, reuse * d["hbm_core_rate"])}

    def stage(self, rows: int, cols: int, kk: int) -> Pipes:
        """One k-step: DataCopy A and B to L1, LoadData them to L0A/L0B, Mmad."""
        d = self.d
        mf, nf, kf = ceil_div(rows, FRACTAL), ceil_div(cols, FRACTAL), ceil_div(kk, FRACTAL)
        mte1 = (mf * ceil_div(512 * kf, d["l1_to_l0a_rate"])
                + kf * ceil_div(512 * nf, d["l1_to_l0b_rate"]))
        return _add(self._read(2 * rows * kk, self.reuse_a),
                    self._read(2 * kk * cols, self.reuse_b),
                    {"MTE1": mte1, "M": mf * nf * kf})

    def head(self, rows: int, cols: int) -> Pipes:
        """Start of an epilogue: L0C -> UB, then the bias read and added by the vector unit."""
        d = self.d
        mf, nf = ceil_div(rows, FRACTAL), ceil_div(cols, FRACTAL)
        parts: list[Mapping[str, int]] = [{"V": ceil_div(1024 * mf * nf, d["l0c_to_ub_rate"])}]
        if self.spec.bias != "none":
            length = cols if self.spec.bias == "col" else rows
            parts.append(self._read(4 * length, self.reuse_bias))
            parts.append({"V": rows * nf * d["vector_repeat_cycles"]})
        return _add(*parts)

    def column(self, rows: int, cols: int, fj: int) -> Pipes:
        """DataCopyPad of fractal column ``fj`` of C, UB -> GM."""
        d = self.d
        nf = ceil_div(cols, FRACTAL)
        nbytes = 4 * rows * (cols - fj * FRACTAL if fj == nf - 1 else FRACTAL)
        return {"MTE3": ceil_div(nbytes, d["ub_to_ddr_rate"]),
                "HBM": ceil_div(nbytes, d["hbm_core_rate"])}

    def epilogue(self, rows: int, cols: int) -> Pipes:
        nf = ceil_div(cols, FRACTAL)
        return _add(self.head(rows, cols), *(self.column(rows, cols, fj) for fj in range(nf)))


def _pipes_max(p: Mapping[str, int]) -> int:
    return max(p.values())


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> Cost:
    tm, tn, tk, cores = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.cores
    model = _Model(spec, tm, tn, tk, target)
    mt, nt, kt = model.mt, model.nt, model.kt
    edge_m, edge_n, edge_k = spec.m - (mt - 1) * tm, spec.n - (nt - 1) * tn, spec.k - (kt - 1) * tk
    # Tile kinds: 2 * (last row block) + (last column block).
    shapes = [(tm, tn), (tm, edge_n), (edge_m, tn), (edge_m, edge_n)]
    full = [model.stage(r, c, tk) for r, c in shapes]
    last = [model.stage(r, c, edge_k) for r, c in shapes]
    total = [_add(*([full[k]] * (kt - 1) + [last[k]])) for k in range(4)]
    epi = [model.epilogue(r, c) for r, c in shapes]

    def tile(k: int, p: int | None) -> int:
        """Cycles of a tile of kind k; the epilogue of the core's previous tile (kind p)
        starts in its first k-step and writes fractal column fj in k-step fj % kt."""
        nf_prev = 0 if p is None else ceil_div(shapes[p][1], FRACTAL)
        explicit = set(range(min(kt, nf_prev))) | {0, kt - 1}
        cycles = (kt - len(explicit)) * _pipes_max(full[k])
        for s in explicit:
            parts: list[Mapping[str, int]] = [last[k] if s == kt - 1 else full[k]]
            if p is not None:
                rows, cols = shapes[p]
                if s == 0:
                    parts.append(model.head(rows, cols))
                parts += [model.column(rows, cols, fj) for fj in range(s, nf_prev, kt)]
            cycles += _pipes_max(_add(*parts))
        return cycles

    tiles = spec.batch * mt * nt
    t = np.arange(tiles)
    kind = 2 * (((t // nt) % mt) == mt - 1) + ((t % nt) == nt - 1)
    core = t % cores
    present = set(kind.tolist())
    after = np.zeros((4, 4), dtype=np.int64)
    for k, p in itertools.product(present, present):
        after[k, p] = tile(k, p)
    alone = np.array([tile(k, None) if k in present else 0 for k in range(4)])
    prev = kind[np.maximum(t - cores, 0)]
    per_tile = np.where(t >= cores, after[kind, prev], alone[kind])
    per_core = np.bincount(core, weights=per_tile, minlength=cores).astype(np.int64)
    busy = np.arange(cores) < tiles
    final_tile = np.arange(cores) + cores * ((tiles - 1 - np.arange(cores)) // cores)
    final = np.array([_pipes_max(e) for e in epi])
    per_core[busy] += final[kind[final_tile[busy]]]
    slowest = int(np.argmax(per_core))
    counts = np.bincount(kind[core == slowest], minlength=4)
    pipes = _add(*[{n: int(c) * (total[k][n] + epi[k][n]) for n in PIPES}
                   for k, c in enumerate(counts)])
    stages = int(counts.sum()) * kt + (1 if counts.sum() else 0)
    padded = spec.batch * round_up(spec.m, FRACTAL) * round_up(spec.n, FRACTAL) * round_up(
        spec.k, FRACTAL)
    sizes = spec.sizes()
    bias_reads = {"none": 0, "row": spec.batch * spec.m * nt, "col": spec.batch * spec.n * mt}
    hbm = (2 * spec.batch * spec.m * spec.k * nt // model.reuse_a
           + 2 * spec.batch * spec.k * spec.n * mt // model.reuse_b
           + 4 * bias_reads[spec.bias] // model.reuse_bias + 4 * sizes["c"])
    return Cost(int(per_core[slowest]), pipes, stages, spec.macs, padded, hbm)


def _candidates(extent: int, sizes: tuple[int, ...]) -> list[int]:
    full = round_up(extent, FRACTAL)
    return sorted({s for s in sizes if s < full} | ({full} if full <= max(sizes) else set()))


def _fits(buffers: Mapping[str, int], target: Target) -> bool:
    return all(used <= target.buffer(name).bytes for name, used in buffers.items())


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit double-buffered."""
    cores = int(target.cores.value)
    ms = _candidates(spec.m, (16, 32, 48, 64, 96, 128, 192, 256))
    ns = _candidates(spec.n, (16, 32, 48, 64, 96, 128, 192, 256))
    ks = _candidates(spec.k, (16, 32, 64, 128, 256, 512, 1024))
    best: tuple[int, int, Tiling] | None = None
    for tm, tn, tk in itertools.product(ms, ns, ks):
        buffers = _buffers(spec, tm, tn, tk)
        if not _fits(buffers, target):
            continue
        candidate = Tiling(tm, tn, tk, cores, buffers=buffers)
        c = _gemm_cost(spec, candidate, target)
        if best is None or (c.cycles, c.stages) < best[:2]:
            best = (c.cycles, c.stages, candidate)
    if best is None:
        raise UnsupportedKernel(f"no tiling of {spec.name} fits the L0/L1/UB buffers of "
                                f"{target.name}")
    return best[2]


# ---------------------------------------------------------------------------- im2col model

def _im2col_shape(spec: Im2colSpec) -> tuple[int, int, int]:
    """Elements of a plane, of its UB buffer (plane padded to 16, then a zero slot), of cols."""
    ho, wo = spec.out_hw
    plane = spec.height * spec.width
    return plane, round_up(plane, FRACTAL) + FRACTAL, spec.kernel[0] * spec.kernel[1] * ho * wo


def _im2col_ub(spec: Im2colSpec) -> int:
    _, buffer, cols = _im2col_shape(spec)
    return 2 * round_up(2 * buffer, 32) + 2 * round_up(2 * cols, 32) + round_up(4 * cols, 32)


def _check_im2col(spec: Im2colSpec, target: Target) -> None:
    need, have = _im2col_ub(spec), target.buffer("UB").bytes
    if need > have:
        raise UnsupportedKernel(
            f"{spec.name}: one channel's plane and cols rows need {need} bytes of UB, more "
            f"than its {have}; a fused Load3D convolution would tile them through L1")


def _im2col_cost(spec: Im2colSpec, target: Target) -> Cost:
    _check_im2col(spec, target)
    d = defines(target)
    plane, _, cols = _im2col_shape(spec)
    vector = ceil_div(2 * FRACTAL, d["vector_bytes"]) + ceil_div(2 * cols, d["vector_bytes"])
    stage = _add(
        {"MTE2": ceil_div(2 * plane, d["l2_rate"]), "HBM": ceil_div(2 * plane, d["hbm_core_rate"])},
        {"V": vector * d["vector_repeat_cycles"]},
        {"MTE3": ceil_div(2 * cols, d["ub_to_ddr_rate"]),
         "HBM": ceil_div(2 * cols, d["hbm_core_rate"])},
    )
    busiest = ceil_div(spec.images * spec.channels, int(target.cores.value))
    return Cost(busiest * max(stage.values()), {n: busiest * v for n, v in stage.items()},
                busiest, 0, 0, spec.compulsory_bytes(2))


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> Cost:
    if isinstance(spec, Im2colSpec):
        return _im2col_cost(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    return _gemm_cost(spec, tiling, target)


# ---------------------------------------------------------------------------- emission

def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    if isinstance(spec, Im2colSpec):
        return _emit_im2col(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    return _emit_gemm(spec, tiling, target)


def _emit_bias(spec: GemmSpec) -> str:
    if spec.bias == "col":
        return """
    // bias[j * BASE_N + c] added to column c: one 16-float row per repeat, bias repeated.
    LocalTensor<float> biasLocal = inQueueBias.AllocTensor<float>();
    DataCopyExtParams bp;
    bp.blockLen = cols * sizeof(float);
    DataCopyPad(biasLocal, biasGM[(bb % PBIAS) * SBIAS + j * BASE_N], bp,
                DataCopyPadExtParams<float>{});
    BinaryRepeatParams rp;
    rp.dstRepStride = 2;
    rp.src0RepStride = 2;
    rp.src1RepStride = 0;
    for (int32_t fj = 0; fj < nf; ++fj) {
      for (int32_t r0 = 0; r0 < rows; r0 += 255) {
        LocalTensor<float> part = c2Local[fj * mf * 256 + r0 * 16];
        Add(part, part, biasLocal[fj * 16], 16, (uint8_t)std::min(255, rows - r0), rp);
      }
    }
    inQueueBias.FreeTensor(biasLocal);"""
    return """
    // bias[i * BASE_M + r] added to row r of every fractal column.
    LocalTensor<float> biasLocal = inQueueBias.AllocTensor<float>();
    DataCopyExtParams bp;
    bp.blockLen = rows * sizeof(float);
    DataCopyPad(biasLocal, biasGM[(bb % PBIAS) * SBIAS + i * BASE_M], bp,
                DataCopyPadExtParams<float>{});
    UnaryRepeatParams up;
    for (int32_t r = 0; r < rows; ++r) {
      const float value = biasLocal.GetValue(r);
      for (int32_t fj = 0; fj < nf; ++fj) {
        LocalTensor<float> row = c2Local[fj * mf * 256 + r * 16];
        Adds(row, row, value, 16, 1, up);
      }
    }
    inQueueBias.FreeTensor(biasLocal);"""


def _emit_gemm(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelSource:
    tm, tn, tk, cores = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.cores
    if tm % FRACTAL or tn % FRACTAL or tk % FRACTAL:
        raise UnsupportedKernel(f"{spec.name}: tiles {tm}x{tn}x{tk} are not multiples of 16")
    model = _Model(spec, tm, tn, tk, target)
    sizes = spec.sizes()
    has_bias = spec.bias != "none"
    bias_len = tn if spec.bias == "col" else tm
    bias_decl = "\n  TQue<QuePosition::VECIN, 1> inQueueBias;" if has_bias else ""
    bias_init = (
        f"""
    biasGM.SetGlobalBuffer((__gm__ float*)bias, {sizes["bias"]});
    biasGM.SetL2Reuse(REUSE_BIAS);
    pipe.InitBuffer(inQueueBias, 1, {round_up(4 * bias_len, 32)});"""
        if has_bias else ""
    )
    plus_bias = " + bias" if has_bias else ""
    name = spec.name
    code = f"""/* {name}: C[b] = A[b] @ B[b]{plus_bias} for b < {spec.batch}, M x K x N = \
{spec.m} x {spec.k} x {spec.n}; Ascend C for the Da Vinci AI Core.
   A, B fp16 in GM, C and bias fp32. baseM x baseN x baseK = {tm} x {tn} x {tk} \
({model.mt} x {model.nt} tiles x {model.kt} k-steps, on {cores} cores round-robin).
   Per k-step: DataCopy GM -> L1 (A1/B1, ND -> NZ), LoadData L1 -> L0A zZ / L0B zN (A2/B2),
   Mmad into L0C (CO1); depth-2 queues double-buffer every level. A tile's epilogue (CO1 ->
   CO2 in UB and the bias on the vector unit, then DataCopyPad to GM of fractal column fj in
   k-step fj % KT) overlaps the core's next tile. */
namespace {name} {{
using namespace AscendC;

constexpr int32_t M = {spec.m}, K = {spec.k}, N = {spec.n}, BATCH = {spec.batch};
constexpr int32_t BASE_M = {tm}, BASE_N = {tn}, BASE_K = {tk};
constexpr int32_t MT = {model.mt}, NT = {model.nt}, KT = {model.kt}, TILES = BATCH * MT * NT;
constexpr int64_t PA = {spec.a.period}, SA = {spec.a.stride}, PB = {spec.b.period}, \
SB = {spec.b.stride};
constexpr int64_t PC = {spec.c.period}, SC = {spec.c.stride}, PBIAS = \
{spec.bias_operand.period}, SBIAS = {spec.bias_operand.stride};
constexpr uint32_t REUSE_A = {model.reuse_a}, REUSE_B = {model.reuse_b}, \
REUSE_BIAS = {model.reuse_bias};  // tiles per L2 line

__aicore__ inline int32_t Fractals(int32_t x) {{ return (x + 15) / 16; }}

class KernelMatmul {{
 public:
  __aicore__ inline void Init(GM_ADDR a, GM_ADDR b, GM_ADDR bias, GM_ADDR c) {{
    aGM.SetGlobalBuffer((__gm__ half*)a, {sizes["a"]});
    aGM.SetL2Reuse(REUSE_A);
    bGM.SetGlobalBuffer((__gm__ half*)b, {sizes["b"]});
    bGM.SetL2Reuse(REUSE_B);
    cGM.SetGlobalBuffer((__gm__ float*)c, {sizes["c"]});
    pipe.InitBuffer(inQueueA1, 2, BASE_M * BASE_K * sizeof(half));
    pipe.InitBuffer(inQueueB1, 2, BASE_K * BASE_N * sizeof(half));
    pipe.InitBuffer(inQueueA2, 2, BASE_M * BASE_K * sizeof(half));
    pipe.InitBuffer(inQueueB2, 2, BASE_K * BASE_N * sizeof(half));
    pipe.InitBuffer(outQueueCO1, 2, BASE_M * BASE_N * sizeof(float));
    pipe.InitBuffer(outQueueCO2, 1, BASE_M * BASE_N * sizeof(float));{bias_init}
  }}

  __aicore__ inline void Process() {{
    int32_t pending = -1;  // the tile whose C waits in L0C
    for (int32_t t = GetBlockIdx(); t < TILES; t += GetBlockNum()) {{
      const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
      const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
      const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
      LocalTensor<float> c1Local = outQueueCO1.AllocTensor<float>();
      for (int32_t s = 0; s < KT; ++s) {{
        const int32_t kk = s == KT - 1 ? K - s * BASE_K : BASE_K;
        CopyIn(bb, i, j, s, rows, cols, kk);
        SplitA(rows, kk);
        SplitB(kk, cols);
        Compute(c1Local, rows, cols, kk, s == 0);
        if (pending >= 0) {{  // the previous tile drains while this one computes
          if (s == 0) Aggregate(pending);
          CopyOut(pending, s, KT);
          if (s == KT - 1) outQueueCO2.FreeTensor(c2Local);
        }}
        QM_END_STAGE();
      }}
      outQueueCO1.EnQue(c1Local);
      pending = t;
    }}
    if (pending >= 0) {{
      Aggregate(pending);
      CopyOut(pending, 0, 1);
      outQueueCO2.FreeTensor(c2Local);
      QM_END_STAGE();
    }}
  }}

 private:
  __aicore__ inline void CopyIn(int32_t bb, int32_t i, int32_t j, int32_t s, int32_t rows,
                                int32_t cols, int32_t kk) {{
    LocalTensor<half> a1Local = inQueueA1.AllocTensor<half>();
    LocalTensor<half> b1Local = inQueueB1.AllocTensor<half>();
    Nd2NzParams pa;
    pa.nValue = rows;
    pa.dValue = kk;
    pa.srcDValue = K;
    pa.dstNzC0Stride = Fractals(rows) * 16;
    DataCopy(a1Local, aGM[(bb % PA) * SA + (int64_t)i * BASE_M * K + s * BASE_K], pa);
    Nd2NzParams pb;
    pb.nValue = kk;
    pb.dValue = cols;
    pb.srcDValue = N;
    pb.dstNzC0Stride = Fractals(kk) * 16;
    DataCopy(b1Local, bGM[(bb % PB) * SB + (int64_t)s * BASE_K * N + j * BASE_N], pb);
    inQueueA1.EnQue(a1Local);
    inQueueB1.EnQue(b1Local);
  }}

  // A: L1 NZ -> L0A zZ, one LoadData per fractal row.
  __aicore__ inline void SplitA(int32_t rows, int32_t kk) {{
    LocalTensor<half> a1Local = inQueueA1.DeQue<half>();
    LocalTensor<half> a2Local = inQueueA2.AllocTensor<half>();
    const int32_t mf = Fractals(rows), kf = Fractals(kk);
    for (int32_t fi = 0; fi < mf; ++fi) {{
      LoadData2dParams p;
      p.startIndex = fi;
      p.repeatTimes = kf;
      p.srcStride = mf;
      p.ifTranspose = false;
      LoadData(a2Local[fi * kf * 256], a1Local, p);
    }}
    inQueueA2.EnQue(a2Local);
    inQueueA1.FreeTensor(a1Local);
  }}

  // B: L1 NZ -> L0B zN (each fractal transposed), one LoadData per fractal row.
  __aicore__ inline void SplitB(int32_t kk, int32_t cols) {{
    LocalTensor<half> b1Local = inQueueB1.DeQue<half>();
    LocalTensor<half> b2Local = inQueueB2.AllocTensor<half>();
    const int32_t kf = Fractals(kk), nf = Fractals(cols);
    for (int32_t fk = 0; fk < kf; ++fk) {{
      LoadData2dParams p;
      p.startIndex = fk;
      p.repeatTimes = nf;
      p.srcStride = kf;
      p.ifTranspose = true;
      LoadData(b2Local[fk * nf * 256], b1Local, p);
    }}
    inQueueB2.EnQue(b2Local);
    inQueueB1.FreeTensor(b1Local);
  }}

  __aicore__ inline void Compute(LocalTensor<float>& c1Local, int32_t rows, int32_t cols,
                                 int32_t kk, bool first) {{
    LocalTensor<half> a2Local = inQueueA2.DeQue<half>();
    LocalTensor<half> b2Local = inQueueB2.DeQue<half>();
    MmadParams p;
    p.m = rows;
    p.n = cols;
    p.k = kk;
    p.cmatrixInitVal = first;
    Mmad(c1Local, a2Local, b2Local, p);
    inQueueA2.FreeTensor(a2Local);
    inQueueB2.FreeTensor(b2Local);
  }}

  // L0C -> UB (NZ kept: fractal column fj is rows x 16 floats), then the bias.
  __aicore__ inline void Aggregate(int32_t t) {{
    const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
    const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
    const int32_t mf = Fractals(rows), nf = Fractals(cols);
    LocalTensor<float> c1Local = outQueueCO1.DeQue<float>();
    c2Local = outQueueCO2.AllocTensor<float>();
    DataCopyParams dp;
    dp.blockLen = mf * nf;
    DataCopyEnhancedParams ep;
    ep.blockMode = BlockMode::BLOCK_MODE_MATRIX;
    DataCopy(c2Local, c1Local, dp, ep);
    outQueueCO1.FreeTensor(c1Local);{_emit_bias(spec) if has_bias else ""}
  }}

  // UB -> GM row-major: fractal columns first, first + step, ... of tile t.
  __aicore__ inline void CopyOut(int32_t t, int32_t first, int32_t step) {{
    const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
    const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
    const int32_t mf = Fractals(rows), nf = Fractals(cols);
    for (int32_t fj = first; fj < nf; fj += step) {{
      const int32_t width = fj == nf - 1 ? cols - fj * 16 : 16;
      DataCopyExtParams op;
      op.blockCount = rows;
      op.blockLen = width * sizeof(float);
      op.srcStride = 2 - (width + 7) / 8;  // 32-byte blocks left in the 64-byte UB row
      op.dstStride = (N - width) * sizeof(float);
      DataCopyPad(cGM[(bb % PC) * SC + (int64_t)i * BASE_M * N + j * BASE_N + fj * 16],
                  c2Local[fj * mf * 256], op);
    }}
  }}

  TPipe pipe;
  TQue<QuePosition::A1, 2> inQueueA1;
  TQue<QuePosition::B1, 2> inQueueB1;
  TQue<QuePosition::A2, 2> inQueueA2;
  TQue<QuePosition::B2, 2> inQueueB2;
  TQue<QuePosition::CO1, 2> outQueueCO1;
  TQue<QuePosition::CO2, 1> outQueueCO2;{bias_decl}
  GlobalTensor<half> aGM, bGM;
  GlobalTensor<float> biasGM, cGM;
  LocalTensor<float> c2Local;  // C of the tile being written back
}};

extern "C" __global__ __aicore__ void {name}_custom(GM_ADDR a, GM_ADDR b, GM_ADDR bias,
                                                   GM_ADDR c) {{
  KernelMatmul op;
  op.Init(a, b, bias, c);
  op.Process();
}}
}}  // namespace {name}
"""
    return KernelSource(name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    _check_im2col(spec, target)
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left = spec.pads[0], spec.pads[1]
    plane, buffer, cols = _im2col_shape(spec)
    name = spec.name
    code = f"""/* {name}: im2col of x {spec.images} x {spec.channels} x {spec.height} x \
{spec.width} (NCHW, fp16) for a {kh} x {kw} kernel, stride {sh} x {sw}, pads top/left \
{top}/{left}, {spec.groups} group(s): cols[img][g] is {spec.k} x {ho * wo}.
   A vector kernel: per (image, channel), DataCopyPad the plane GM -> UB, Gather the \
{kh * kw} rows of its taps (offsets computed once; taps in the padding read a zero slot),
   DataCopyPad them UB -> GM. On the 910 a fused Load3D (L1 -> L0A) avoids this GM round \
trip. */
namespace {name} {{
using namespace AscendC;

constexpr int32_t IMAGES = {spec.images}, C = {spec.channels}, H = {spec.height}, \
W = {spec.width}, HO = {ho}, WO = {wo};
constexpr int32_t KH = {kh}, KW = {kw}, SH = {sh}, SW = {sw}, DH = {dh}, DW = {dw}, \
PT = {top}, PL = {left};
constexpr int32_t PLANE = {plane}, ZERO = {buffer - FRACTAL}, ROWS = KH * KW * HO * WO;

class KernelIm2col {{
 public:
  __aicore__ inline void Init(GM_ADDR x, GM_ADDR cols) {{
    xGM.SetGlobalBuffer((__gm__ half*)x, (int64_t)IMAGES * C * PLANE);
    colsGM.SetGlobalBuffer((__gm__ half*)cols, (int64_t)IMAGES * C * ROWS);
    pipe.InitBuffer(inQueueX, 2, {round_up(2 * buffer, 32)});
    pipe.InitBuffer(outQueueCols, 2, {round_up(2 * cols, 32)});
    pipe.InitBuffer(offsetBuf, {round_up(4 * cols, 32)});
    LocalTensor<uint32_t> offsets = offsetBuf.Get<uint32_t>();
    for (int32_t tap = 0; tap < KH * KW; ++tap) {{
      for (int32_t oh = 0; oh < HO; ++oh) {{
        for (int32_t ow = 0; ow < WO; ++ow) {{
          const int32_t ih = oh * SH - PT + (tap / KW) * DH, iw = ow * SW - PL + (tap % KW) * DW;
          const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
          offsets.SetValue((tap * HO + oh) * WO + ow,
                           (inside ? ih * W + iw : ZERO) * sizeof(half));
        }}
      }}
    }}
  }}

  __aicore__ inline void Process() {{
    for (int32_t t = GetBlockIdx(); t < IMAGES * C; t += GetBlockNum()) {{
      CopyIn(t);
      Compute();
      CopyOut(t);
      QM_END_STAGE();
    }}
  }}

 private:
  __aicore__ inline void CopyIn(int32_t t) {{
    LocalTensor<half> xLocal = inQueueX.AllocTensor<half>();
    DataCopyExtParams p;
    p.blockLen = PLANE * sizeof(half);
    DataCopyPad(xLocal, xGM[(int64_t)t * PLANE], p, DataCopyPadExtParams<half>{{}});
    Duplicate(xLocal[ZERO], (half)0, 16);
    inQueueX.EnQue(xLocal);
  }}

  __aicore__ inline void Compute() {{
    LocalTensor<half> xLocal = inQueueX.DeQue<half>();
    LocalTensor<half> colsLocal = outQueueCols.AllocTensor<half>();
    Gather(colsLocal, xLocal, offsetBuf.Get<uint32_t>(), 0, ROWS);
    outQueueCols.EnQue(colsLocal);
    inQueueX.FreeTensor(xLocal);
  }}

  // Channel t of image img is rows [ch_in_group * KH * KW, ...) of cols[img][group]: the
  // block at t * ROWS.
  __aicore__ inline void CopyOut(int32_t t) {{
    LocalTensor<half> colsLocal = outQueueCols.DeQue<half>();
    DataCopyExtParams p;
    p.blockLen = ROWS * sizeof(half);
    DataCopyPad(colsGM[(int64_t)t * ROWS], colsLocal, p);
    outQueueCols.FreeTensor(colsLocal);
  }}

  TPipe pipe;
  TQue<QuePosition::VECIN, 2> inQueueX;
  TQue<QuePosition::VECOUT, 2> outQueueCols;
  TBuf<TPosition::VECCALC> offsetBuf;
  GlobalTensor<half> xGM, colsGM;
}};

extern "C" __global__ __aicore__ void {name}_custom(GM_ADDR x, GM_ADDR cols) {{
  KernelIm2col op;
  op.Init(x, cols);
  op.Process();
}}
}}  // namespace {name}
"""
    return KernelSource(name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    cores = int(target.cores.value)
    names = ", ".join(f'"{p}"' for p in PIPES)
    pointers = ", ".join(f"(GM_ADDR)({a})" for a in args)
    return f"""qmsim::begin_kernel({{{names}}});
for (int core = 0; core < {cores}; ++core) {{
  AscendC::qm_begin_core(core, {cores});
  qmsim::core_begin(core);
  {kernel.name}::{kernel.name}_custom({pointers});
  qmsim::core_end();
}}"""

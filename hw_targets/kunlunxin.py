"""The kunlunxin target: a Kunlun 2 (R200) style XPU programmed in XPU C/C++.

The device is 8 clusters x 64 cores, each core a scalar unit with a 512-bit SIMD unit
and a few KB of local memory (LM). The matrix engine (SDNN) is reachable only through
the vendor's fc/xblas libraries (TARGETS.md), so the kernels emitted here run on the
cluster cores: ``__global__`` kernels launched ``<<<cluster_num, core_num>>>``, output
tiles dealt round-robin over all 512 cores (tile ``t`` to core
``cluster_id * core_num + core_id == t % 512``, as :func:`hw_targets.base.grid_cost`).

A GEMM tile (``TM x TN`` of C, fp32, in LM) walks K in steps of ``TK``; a *stage* is one
step: ``GM2LM_ASYNC`` the A slice (``rows`` calls of ``kk`` fp16, one call when the
slice is contiguous) and the B slice (``kk`` calls of ``cols`` fp16) into the other half
of a double buffer, and run the SIMD on this half. Pipes and their charges:

* ``dma``: every GM2LM and LM2GM call (both directions share the core's engine and its
  bandwidth), ``dma_latency + ceil(bytes / rate)`` with
  ``rate = min(core_dma_bytes_per_cycle, GDDR6 / active)``: the cores that have work
  stream at once and share the chip's bandwidth evenly;
* ``simd``: one cycle per vector instruction; per k-step and 32-column fp16 vector of B
  two widenings to fp32 plus two ``svmac`` per row, so a partial vector costs a whole
  one (padding to 32 columns); vector loads/stores and scalar code are free.

A stage costs its slowest pipe; the tile's last stage also loads the bias slice, adds it
(two vector adds per row and vector) and ``LM2GM``s C. LM holds two A and two B slices,
C and the bias slice, ``2 (2 TM TK + 2 TK TN32) + 4 TM TN32 + 4 |bias|`` bytes, with
``TN32`` = TN rounded up to 32 and ``TK`` a multiple of 16 (32-byte aligned fp16 rows).
An im2col row (one channel and kernel tap) is a stage: ``GM2LM`` of each input row it
reads, a scalar gather in LM, and ``LM2GM`` of output-row chunks that fit LM.

Not modelled, on purpose: cluster shared memory (SM) is declared but unused (staging B
in SM would cut its GDDR6 traffic up to 64-fold, but its bandwidth is unpublished and the
simulation runs a cluster's cores one after another); the 64 MB L3 (all traffic is
charged at GDDR6 rates, a conservative choice). :func:`library_cost` gives the other
path, an fc call on the SDNN at peak x efficiency, as a number beside the simulated one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np

from hw_targets.base import (
    Buffer,
    Cost,
    KernelSource,
    Param,
    Target,
    TileCost,
    Tiling,
    UnsupportedKernel,
    ceil_div,
    grid_cost,
    round_up,
)
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["HEADER", "TARGET", "cost", "defines", "emit", "launch", "library_cost", "tiling"]

HEADER = "xpu_sim.h"
PIPES = ("dma", "simd")

_GUIDE = "Kunlunxin XPU C/C++ developer guide v2.2"
_CLOCK_HZ = 1.0e9
_GDDR6 = 512e9

TARGET = Target(
    name="kunlunxin",
    dialect="XPU C/C++",
    summary="Kunlun 2 (R200) style: 8 clusters x 64 SIMD cores, 8 KB LM per core, GDDR6",
    clock_hz=Param(_CLOCK_HZ, "Hz", "U", "no published Kunlun 2 clock; a round number"),
    cores=Param(512, "cores", "V", f"8 clusters x 64 cores [{_GUIDE}]"),
    buffers=(
        Buffer("LM", Param(8192, "bytes", "U",
                           f"32 KB LM per group of 4 cores [{_GUIDE}] split evenly"), 32),
        Buffer("SM", Param(256 * 1024, "bytes", "V", f"256 KB SM per cluster [{_GUIDE}]"), 64,
               scope="cluster"),
    ),
    dram_bytes_per_cycle=Param(_GDDR6 / _CLOCK_HZ, "B/cycle", "U",
                               "GDDR6 512 GB/s [V] at the assumed clock [U]"),
    macs_per_cycle=Param(16, "MAC/cycle", "U",
                         "512-bit SIMD [V] = 16 fp32 lanes, one vector MAC per cycle [U]"),
    in_dtype="half",
    params={
        "clusters": Param(8, "clusters", "V", _GUIDE),
        "cores_per_cluster": Param(64, "cores", "V", _GUIDE),
        "lm_group_bytes": Param(32 * 1024, "bytes", "V", f"LM per group of 4 cores [{_GUIDE}]"),
        "lm_group_cores": Param(4, "cores", "V", _GUIDE),
        "l3_bytes": Param(64 * 1024 * 1024, "bytes", "V", f"{_GUIDE}; not modelled"),
        "gddr6_bytes_per_s": Param(_GDDR6, "B/s", "V", _GUIDE),
        "simd_bits": Param(512, "bits", "V", _GUIDE),
        "simd_op_cycles": Param(1, "cycles", "U", "one 512-bit vector instruction per cycle"),
        "dma_latency": Param(32, "cycles", "U", "per GM2LM/LM2GM call; not published"),
        "core_dma_bytes_per_cycle": Param(64, "B/cycle", "U",
                                          "one core's DMA engine at most (one 512-bit word)"),
        "lm_align": Param(32, "bytes", "U", f"Kunlun 1 aligns LM to 32 B [{_GUIDE}], assumed"),
        "sm_align": Param(64, "bytes", "U", f"Kunlun 1 aligns SM to 64 B [{_GUIDE}], assumed"),
        "kunlun1_lm_bytes": Param(16 * 1024, "bytes", "V", f"Kunlun 1 LM per core [{_GUIDE}]"),
        "kunlun1_cores": Param(64, "cores", "V", f"Kunlun 1: 4 clusters x 16 cores [{_GUIDE}]"),
        "sdnn_flops_fp16": Param(128e12, "FLOP/s", "S",
                                 "Kunlun 2 fp16 peak (press); SDNN via fc/xblas only [V]"),
        "sdnn_efficiency": Param(0.5, "ratio", "U", "share of SDNN peak a library fc reaches"),
        "paper_attention_fusion_speedup": Param(
            2.1, "x", "U",
            "claimed by the paper: 2.1x speed-up on Kunlunxin from fusing redundant "
            "attention heads; not a measurement",
        ),
    },
)


def defines(target: Target) -> dict[str, int]:
    clusters, per_cluster = int(target.param("clusters")), int(target.param("cores_per_cluster"))
    if clusters * per_cluster != int(target.cores.value):
        raise ValueError(f"{target.name}: cores ({int(target.cores.value)}) must be "
                         f"clusters x cores_per_cluster ({clusters} x {per_cluster})")
    lm = target.buffer("LM")
    return {
        "lm_bytes": lm.bytes,
        "lm_align": lm.align,
        "clusters": clusters,
        "cores_per_cluster": per_cluster,
        "cores": clusters * per_cluster,
        "gm_bytes_per_kcycle": max(1, round(1000 * float(target.dram_bytes_per_cycle))),
        "core_dma_bytes_per_kcycle": round(1000 * target.param("core_dma_bytes_per_cycle")),
        "dma_latency": int(target.param("dma_latency")),
        "simd_op_cycles": int(target.param("simd_op_cycles")),
    }


def _lanes(target: Target) -> tuple[int, int]:
    """fp32 and fp16 lanes of one vector register."""
    bits = int(target.param("simd_bits"))
    return bits // 32, bits // 16


def _rate(d: Mapping[str, int], active: int) -> int:
    """Bytes per 1000 cycles of one core's DMA when ``active`` cores share the GDDR6."""
    return max(1, min(d["core_dma_bytes_per_kcycle"], d["gm_bytes_per_kcycle"] // active))


def _dma(nbytes: int, d: Mapping[str, int], rate: int) -> int:
    return d["dma_latency"] + ceil_div(nbytes * 1000, rate)


def _copy2d(rows: int, width: int, gm_ld: int, lm_ld: int, elem: int, d: Mapping[str, int],
            rate: int) -> int:
    """Cycles of a 2-D copy: one DMA call if both sides are contiguous, else one per row."""
    if gm_ld == width and lm_ld == width:
        return _dma(rows * width * elem, d, rate)
    return rows * _dma(width * elem, d, rate)


def _active(spec: GemmSpec, tm: int, tn: int, cores: int) -> int:
    """Cores that get at least one output tile."""
    return min(cores, spec.batch * ceil_div(spec.m, tm) * ceil_div(spec.n, tn))


def _lm_bytes(spec: GemmSpec, tm: int, tn: int, tk: int, target: Target) -> int:
    """LM a tiling needs, allocated in the emitted order with the LM alignment."""
    tnp = round_up(tn, _lanes(target)[1])
    sizes = [2 * tm * tk] * 2 + [2 * tk * tnp] * 2 + [4 * tm * tnp]
    if spec.bias != "none":
        sizes.append(4 * (tm if spec.bias == "row" else tnp))
    align, used = target.buffer("LM").align, 0
    for size in sizes:
        used = round_up(used, align) + size
    return used


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit LM (ties: fewer stages).

    ``TK`` is a multiple of 16 (fp16 rows of A land 32-byte aligned in LM) and ``TN`` a
    multiple of the 32 fp16 lanes, so every LM row starts aligned.
    """
    _, h_lanes = _lanes(target)
    budget = target.buffer("LM").bytes
    ms = sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t < spec.m} | {min(spec.m, 64)})
    n_full = round_up(spec.n, h_lanes)
    ns = sorted({t for t in range(h_lanes, 8 * h_lanes + 1, h_lanes) if t < n_full}
                | {min(n_full, 8 * h_lanes)})
    k_full = round_up(spec.k, 16)
    ks = sorted({t for t in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512) if t < k_full}
                | {min(k_full, 512)})
    best: tuple[int, int, Tiling] | None = None
    for tm, tn, tk in itertools.product(ms, ns, ks):
        used = _lm_bytes(spec, tm, tn, tk, target)
        if used > budget:
            continue
        candidate = Tiling(tm, tn, tk, int(target.cores.value), buffers={"LM": used})
        c = cost(spec, candidate, target)
        if best is None or (c.cycles, c.stages) < best[:2]:
            best = (c.cycles, c.stages, candidate)
    if best is None:
        raise UnsupportedKernel(
            f"no tiling of {spec.name} fits {budget} bytes of LM (a 1 x {h_lanes} x 16 tile "
            f"needs {_lm_bytes(spec, 1, h_lanes, 16, target)})"
        )
    return best[2]


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> Cost:
    if isinstance(spec, Im2colSpec):
        return _im2col_cost(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    d = defines(target)
    _, h_lanes = _lanes(target)
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    tnp = round_up(tn, h_lanes)
    op = d["simd_op_cycles"]
    kt = ceil_div(spec.k, tk)
    rate = _rate(d, _active(spec, tm, tn, d["cores"]))

    def moved(rows: int, cols: int, kk: int, last: bool) -> int:
        total = 2 * (rows * kk + kk * cols)
        if last:
            total += 4 * rows * cols + (4 * (rows if spec.bias == "row" else cols)
                                        if spec.bias != "none" else 0)
        return total

    def stage(rows: int, cols: int, kk: int, last: bool) -> dict[str, int]:
        vectors = ceil_div(cols, h_lanes)
        pipes = {
            "dma": _copy2d(rows, kk, spec.k, tk, 2, d, rate)
            + _copy2d(kk, cols, spec.n, tnp, 2, d, rate),
            "simd": vectors * kk * (2 + 2 * rows) * op,
        }
        if last:
            if spec.bias != "none":
                pipes["dma"] += _dma(4 * (rows if spec.bias == "row" else cols), d, rate)
                pipes["simd"] += 2 * rows * vectors * op
            pipes["dma"] += _copy2d(rows, cols, spec.n, tnp, 4, d, rate)
        return pipes

    def tile(rows: int, cols: int) -> TileCost:
        stages = [(stage(rows, cols, tk, False), kt - 1),
                  (stage(rows, cols, spec.k - (kt - 1) * tk, True), 1)]
        total = sum(max(s.values()) * count for s, count in stages)
        pipes = {name: sum(s[name] * count for s, count in stages) for name in PIPES}
        last = spec.k - (kt - 1) * tk
        return TileCost(total, kt, pipes,
                        (kt - 1) * moved(rows, cols, tk, False) + moved(rows, cols, last, True))

    padded = spec.batch * spec.m * round_up(spec.n, h_lanes) * spec.k
    return grid_cost(spec, tm, tn, int(target.cores.value), tile, padded)


def library_cost(spec: GemmSpec, target: Target = TARGET) -> int:
    """Cycles of the same GEMM as a vendor fc call on the SDNN (not simulated).

    The SDNN at ``sdnn_flops_fp16 x sdnn_efficiency``, or the compulsory traffic at the
    GDDR6 bandwidth, whichever is slower: the path Paddle takes (``fc_fusion``).
    """
    macs_per_cycle = target.param("sdnn_flops_fp16") / 2 / float(target.clock_hz)
    compute = spec.macs / (macs_per_cycle * target.param("sdnn_efficiency"))
    traffic = spec.compulsory_bytes(target.in_bytes) / float(target.dram_bytes_per_cycle)
    return math.ceil(max(compute, traffic))


def _im2col_chunk(spec: Im2colSpec, target: Target) -> tuple[int, int]:
    """LM row buffer (fp16 elements) and output rows per LM2GM chunk of an im2col."""
    ho, wo = spec.out_hw
    row = round_up(spec.width, 16)
    free = target.buffer("LM").bytes - 2 * row
    chunk = min(ho, free // (2 * wo)) if free > 0 else 0
    if chunk < 1:
        raise UnsupportedKernel(
            f"{spec.name}: an input row of {spec.width} and an output row of {wo} fp16 "
            f"values do not fit {target.buffer('LM').bytes} bytes of LM"
        )
    return row, chunk


def _im2col_cost(spec: Im2colSpec, target: Target) -> Cost:
    d = defines(target)
    cores = d["cores"]
    ho, wo = spec.out_hw
    (kh, kw), sh, dh = spec.kernel, spec.strides[0], spec.dilations[0]
    _, chunk = _im2col_chunk(spec, target)
    rows = spec.images * spec.groups * spec.k
    rate = _rate(d, min(cores, rows))
    oh = np.arange(ho)
    full, rest = divmod(ho, chunk)
    store = full * _dma(2 * chunk * wo, d, rate) + (_dma(2 * rest * wo, d, rate) if rest else 0)
    # An output row reads an input row unless its tap falls in the top/bottom padding.
    valid = np.array([int(np.count_nonzero((ih >= 0) & (ih < spec.height)))
                      for ih in (oh * sh - spec.pads[0] + tap * dh for tap in range(kh))],
                     dtype=np.int64)
    t = np.arange(rows)
    reads = valid[(t // kw) % kh]
    moved = reads * _dma(2 * spec.width, d, rate) + store
    traffic = int((reads * 2 * spec.width + 2 * ho * wo).sum())
    core = t % cores
    per_core = np.bincount(core, weights=moved, minlength=cores)
    slowest = int(np.argmax(per_core))
    mine = core == slowest
    return Cost(
        cycles=int(per_core[slowest]),
        pipes={"dma": int(moved[mine].sum()), "simd": 0},
        stages=int(np.count_nonzero(mine)),
        macs=0,
        padded_macs=0,
        dram_bytes=traffic,
    )


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    if isinstance(spec, Im2colSpec):
        return _emit_im2col(spec, target)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    _, h_lanes = _lanes(target)
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    has_bias = spec.bias != "none"
    bias_alloc = bias_load = bias_add = ""
    if has_bias:
        row = spec.bias == "row"
        length = "TM" if row else "TN32"
        bias_alloc = (f'\n  __local__ float* lm_bias = lm_malloc<float>({length}, "bias");')
        bias_load = (
            f"\n        GM2LM_ASYNC(bias + (bb % {spec.bias_operand.period}) * "
            f"{spec.bias_operand.stride}L + {'i * TM' if row else 'j * TN'}, lm_bias, "
            f"{'rows' if row else 'cols'} * (int)sizeof(float));"
        )
        operand = ("svadd_float32x16(lm_bias[r], acc)" if row else
                   "vvadd_float32x16(acc, vload_lm_float32x16(lm_bias + v + h))")
        bias_add = f"""
        for (int v = 0; v < cols; v += VH)
          for (int r = 0; r < rows; ++r)
            for (int h = 0; h < VH; h += VF) {{
              float* cr = lm_c + r * TN32 + v + h;
              const float32x16_t acc = vload_lm_float32x16(cr);
              vstore_lm_float32x16(cr, {operand});
            }}"""
    code = f"""/* {spec.name}: C[b] = A[b] @ B[b]{" + bias" if has_bias else ""} \
({spec.batch} x {spec.m}x{spec.k}x{spec.n}), fp16 in, fp32 out; XPU C/C++ for the
   cluster cores, launched <<<cluster_num, core_num>>>; tiles {tm}x{tn}x{tk} (C tile in
   LM, A and B slices double-buffered), dealt round-robin over all cores. Per k-step
   the _ASYNC DMAs of the next slices overlap the SIMD work on this one. */
namespace {spec.name} {{
enum : long {{ M = {spec.m}, K = {spec.k}, N = {spec.n}, BATCH = {spec.batch},
              TM = {tm}, TN = {tn}, TK = {tk}, TN32 = {round_up(tn, h_lanes)},
              VH = {h_lanes}, VF = {h_lanes // 2},  /* fp16 / fp32 lanes of a vector */
              MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK,
              ACTIVE = {_active(spec, tm, tn, int(target.cores.value))} /* cores with a tile */ }};

// rows x width values from global memory (row stride gm_ld) into LM (row stride lm_ld).
static __device__ void gm2lm_2d(const float16* gm, long gm_ld, __local__ float16* lm,
                                long lm_ld, int rows, int width) {{
  if (gm_ld == width && lm_ld == width) {{
    GM2LM_ASYNC(gm, lm, rows * width * (int)sizeof(float16));
    return;
  }}
  for (int r = 0; r < rows; ++r)
    GM2LM_ASYNC(gm + r * gm_ld, lm + r * lm_ld, width * (int)sizeof(float16));
}}

static __device__ void lm2gm_2d(__local__ const float* lm, long lm_ld, float* gm, long gm_ld,
                                int rows, int width) {{
  if (gm_ld == width && lm_ld == width) {{
    LM2GM_ASYNC(lm, gm, rows * width * (int)sizeof(float));
    return;
  }}
  for (int r = 0; r < rows; ++r)
    LM2GM_ASYNC(lm + r * lm_ld, gm + r * gm_ld, width * (int)sizeof(float));
}}

__global__ void kernel(const float16* a, const float16* b, const float* bias, float* c) {{
  const int ncores = cluster_num() * core_num();
  const int cid = cluster_id() * core_num() + core_id();
  __local__ float16* lm_a[2] = {{lm_malloc<float16>(TM * TK, "A slice 0"),
                                lm_malloc<float16>(TM * TK, "A slice 1")}};
  __local__ float16* lm_b[2] = {{lm_malloc<float16>(TK * TN32, "B slice 0"),
                                lm_malloc<float16>(TK * TN32, "B slice 1")}};
  __local__ float* lm_c = lm_malloc<float>(TM * TN32, "C tile");{bias_alloc}
  for (long t = cid; t < BATCH * MT * NT; t += ncores) {{
    const long bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int rows = (int)(i == MT - 1 ? M - i * TM : TM);
    const int cols = (int)(j == NT - 1 ? N - j * TN : TN);
    const float16* ga = a + (bb % {spec.a.period}) * {spec.a.stride}L + i * TM * K;
    const float16* gb = b + (bb % {spec.b.period}) * {spec.b.stride}L + j * TN;
    float* gc = c + (bb % {spec.c.period}) * {spec.c.stride}L + i * TM * N + j * TN;
    for (int q = 0; q < TM * TN32; q += VF) vstore_lm_float32x16(lm_c + q, vset_zero());
    for (long s = 0; s < KT; ++s) {{
      const int kk = (int)(s == KT - 1 ? K - s * TK : TK);
      const float16* la = lm_a[s % 2];
      const float16* lb = lm_b[s % 2];
      gm2lm_2d(ga + s * TK, K, lm_a[s % 2], TK, rows, kk);
      gm2lm_2d(gb + s * TK * N, N, lm_b[s % 2], TN32, kk, cols);
      for (int v = 0; v < cols; v += VH) {{
        for (int p = 0; p < kk; ++p) {{
          const float16x32_t bv = vload_lm_float16x32(lb + p * TN32 + v);
          const float32x16_t b_lo = vfp162float_l(bv), b_hi = vfp162float_h(bv);
          for (int r = 0; r < rows; ++r) {{
            float* cr = lm_c + r * TN32 + v;
            const float ar = (float)la[r * TK + p];
            vstore_lm_float32x16(cr, svmac_float32x16(ar, b_lo, vload_lm_float32x16(cr)));
            vstore_lm_float32x16(cr + VF,
                                 svmac_float32x16(ar, b_hi, vload_lm_float32x16(cr + VF)));
          }}
        }}
      }}
      if (s == KT - 1) {{{bias_load}{bias_add}
        lm2gm_2d(lm_c, TN32, gc, N, rows, cols);
      }}
      mfence();
    }}
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left = spec.pads[0], spec.pads[1]
    row, chunk = _im2col_chunk(spec, target)
    code = f"""/* {spec.name}: im2col of {spec.images}x{spec.channels}x{spec.height}x{spec.width} \
(fp16) for a {kh}x{kw} kernel, {spec.groups} group(s): cols[img][g] is K x (Ho*Wo) =
   {spec.k} x {ho * wo}. One cols row (channel, tap) per stage, rows dealt round-robin over
   all cores: GM2LM each input row the tap reads, gather in LM, LM2GM {chunk} output row(s)
   at a time. */
namespace {spec.name} {{
enum : long {{ C = {spec.channels}, H = {spec.height}, W = {spec.width}, HO = {ho}, WO = {wo},
              G = {spec.groups}, CPG = C / G, KH = {kh}, KW = {kw}, SH = {sh}, SW = {sw},
              PT = {top}, PL = {left}, DH = {dh}, DW = {dw}, CHUNK = {chunk},
              KR = CPG * KH * KW, ROWS = {spec.images} * G * KR,
              ACTIVE = {min(int(target.cores.value), spec.images * spec.groups * spec.k)} }};

__global__ void kernel(const float16* x, float16* cols) {{
  const int ncores = cluster_num() * core_num();
  const int cid = cluster_id() * core_num() + core_id();
  __local__ float16* lm_in = lm_malloc<float16>({row}, "input row");
  __local__ float16* lm_out = lm_malloc<float16>(CHUNK * WO, "cols chunk");
  for (long t = cid; t < ROWS; t += ncores) {{
    const long img = t / (G * KR), g = (t / KR) % G, r = t % KR;
    const long ch = g * CPG + r / (KH * KW);
    const int tap_h = (int)((r / KW) % KH), tap_w = (int)(r % KW);
    const float16* plane = x + (img * C + ch) * H * W;
    for (int oc = 0; oc < HO; oc += CHUNK) {{
      const int n = (int)(HO - oc < CHUNK ? HO - oc : CHUNK);
      for (int oh = oc; oh < oc + n; ++oh) {{
        float16* dst = lm_out + (oh - oc) * WO;
        const int ih = oh * SH - PT + tap_h * DH;
        if (ih < 0 || ih >= H) {{
          for (int ow = 0; ow < WO; ++ow) dst[ow] = (float16)0;
          continue;
        }}
        GM2LM(plane + ih * W, lm_in, W * (int)sizeof(float16));
        for (int ow = 0; ow < WO; ++ow) {{
          const int iw = ow * SW - PL + tap_w * DW;
          dst[ow] = (iw >= 0 && iw < W) ? lm_in[iw] : (float16)0;
        }}
      }}
      LM2GM(lm_out, cols + t * HO * WO + oc * WO, n * WO * (int)sizeof(float16));
    }}
    mfence();
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    d = defines(target)
    names = ", ".join(f'"{p}"' for p in PIPES)
    return f"""qmsim::begin_kernel({{{names}}});
xpu::active_cores() = {kernel.name}::ACTIVE;
// {kernel.name}::kernel<<<{d["clusters"]}, {d["cores_per_cluster"]}>>>({", ".join(args)})
for (int cluster = 0; cluster < {d["clusters"]}; ++cluster) {{
  for (int core = 0; core < {d["cores_per_cluster"]}; ++core) {{
    xpu::lm().reset();
    xpu::enter(cluster, core);
    qmsim::core_begin(cluster * {d["cores_per_cluster"]} + core);
    {kernel.name}::kernel({", ".join(args)});
    qmsim::core_end();
  }}
}}"""

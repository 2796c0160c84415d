"""The cpu target: a multi-core SIMD CPU, the reference the NPU styles are read against.

Model: each core packs tiles of A and B (double-buffered) and an fp32 C tile into its
L2, modelled as an arena of ``L2`` bytes; the FMA units retire ``macs_per_cycle`` fp32
MACs per cycle on ``lanes``-wide vectors (a partial vector costs a whole one); every
move to or from DRAM gets ``1/cores`` of the chip's bandwidth. Per k-step (a stage) the
loads of the next tiles overlap the FMAs, so the stage costs its slowest pipe; the bias
and the store of C ride on the tile's last stage.

All numbers are assumptions about a generic AVX2 server core (tag ``U``): the point of
this target is a plain-C lowering that anyone can run, not a claim about one CPU.
"""

from __future__ import annotations

import itertools

from hw_targets.base import (
    Buffer,
    Cost,
    KernelSource,
    Param,
    Target,
    TileCost,
    Tiling,
    ceil_div,
    grid_cost,
    round_up,
)
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["HEADER", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

HEADER = "cpu_sim.h"
PIPES = ("dram", "fma")

TARGET = Target(
    name="cpu",
    dialect="C",
    summary="generic AVX2 CPU: fp32 SIMD FMA, L2 cache blocking, shared DRAM bandwidth",
    clock_hz=Param(3.0e9, "Hz", "U", "a typical server core clock"),
    cores=Param(2, "cores", "U", "the 2-core CI machine qmpass is tested on"),
    buffers=(Buffer("L2", Param(1 << 20, "bytes", "U", "1 MiB L2 per core (x86 server)"), 64),),
    dram_bytes_per_cycle=Param(8, "B/cycle", "U", "~24 GB/s at 3 GHz, shared by the cores"),
    macs_per_cycle=Param(16, "MAC/cycle", "U", "2 FMA ports x 8 fp32 lanes (AVX2)"),
    in_dtype="float",
    params={
        "lanes": Param(8, "fp32", "U", "AVX2 vector width"),
    },
)


def defines(target: Target) -> dict[str, int]:
    cores = int(target.cores.value)
    return {
        "local_bytes": target.buffer("L2").bytes,
        "local_align": target.buffer("L2").align,
        "core_bytes_per_cycle": max(1, int(target.dram_bytes_per_cycle.value) // cores),
        "lanes": int(target.param("lanes")),
        "macs_per_cycle": int(target.macs_per_cycle.value),
    }


def _footprint(tm: int, tn: int, tk: int) -> int:
    """Bytes of L2 a tiling needs: A and B tiles twice (double buffering), one C tile."""
    return 4 * (2 * (tm * tk + tk * tn) + tm * tn)


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit L2 (ties: fewer stages)."""
    lanes = int(target.param("lanes"))
    budget = target.buffer("L2").bytes
    best: tuple[int, int, Tiling] | None = None
    ms = [t for t in (8, 16, 32, 64, 128, 256) if t < spec.m] + [spec.m]
    ns = [t for t in (8, 16, 32, 64, 128, 256, 512) if t < spec.n] + [round_up(spec.n, lanes)]
    ks = [t for t in (16, 32, 64, 128, 256, 512) if t < spec.k] + [spec.k]
    for tm, tn, tk in itertools.product(sorted(set(ms)), sorted(set(ns)), sorted(set(ks))):
        if _footprint(tm, tn, tk) > budget:
            continue
        candidate = Tiling(tm, tn, tk, int(target.cores.value),
                           buffers={"L2": _footprint(tm, tn, tk)})
        c = cost(spec, candidate, target)
        key = (c.cycles, c.stages)
        if best is None or key < best[:2]:
            best = (c.cycles, c.stages, candidate)
    if best is None:
        raise ValueError(f"no tiling of {spec.name} fits {budget} bytes of L2")
    return best[2]


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> Cost:
    d = defines(target)
    rate, lanes, macs = d["core_bytes_per_cycle"], d["lanes"], d["macs_per_cycle"]
    cores = int(target.cores.value)
    if isinstance(spec, Im2colSpec):
        ho, wo = spec.out_hw
        move = ceil_div(4 * ho * wo, rate)
        rows = spec.images * spec.groups * spec.k
        busiest = ceil_div(rows, cores)
        return Cost(2 * busiest * move, {"dram": 2 * busiest * move, "fma": 0},
                    busiest, 0, 0, 2 * rows * 4 * ho * wo)
    assert tiling is not None, "a GEMM needs a tiling"
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    kt = ceil_div(spec.k, tk)

    def tile(rows: int, cols: int) -> TileCost:
        total, pipes, moved = 0, dict.fromkeys(PIPES, 0), 0
        for s in range(kt):
            kk = min(tk, spec.k - s * tk)
            stage = {
                "dram": ceil_div(4 * rows * kk, rate) + ceil_div(4 * kk * cols, rate),
                "fma": ceil_div(rows * round_up(cols, lanes) * kk, macs),
            }
            moved += 4 * (rows * kk + kk * cols)
            if s == kt - 1:
                if spec.bias != "none":
                    stage["dram"] += ceil_div(4 * (rows if spec.bias == "row" else cols), rate)
                    moved += 4 * (rows if spec.bias == "row" else cols)
                stage["dram"] += ceil_div(4 * rows * cols, rate)
                moved += 4 * rows * cols
            total += max(stage.values())
            for name, value in stage.items():
                pipes[name] += value
        return TileCost(total, kt, pipes, moved)

    padded = spec.batch * spec.m * round_up(spec.n, lanes) * spec.k
    return grid_cost(spec, tm, tn, cores, tile, padded)


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    if isinstance(spec, Im2colSpec):
        return _emit_im2col(spec)
    assert tiling is not None, "a GEMM needs a tiling"
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    bias_row = 1 if spec.bias == "row" else 0
    bias_code = (
        ""
        if spec.bias == "none"
        else f"""
        if (s == KT - 1)
          qm_bias(tc, bias + (bb % {spec.bias_operand.period}) * {spec.bias_operand.stride}"""
        f""" + {"i * TM" if bias_row else "j * TN"}, rows, cols, {bias_row});"""
    )
    code = f"""/* {spec.name}: C[b] = A[b] @ B[b]{" + bias" if spec.bias != "none" else ""} \
({spec.batch} x {spec.m}x{spec.k}x{spec.n}), plain C, tiles {tm}x{tn}x{tk}.
   Tiles are dealt round-robin to the cores; per k-step the next A and B tiles are loaded
   into the other half of a double buffer while the FMAs run on this one. */
namespace {spec.name} {{
enum : long {{ M = {spec.m}, K = {spec.k}, N = {spec.n}, BATCH = {spec.batch},
              TM = {tm}, TN = {tn}, TK = {tk},
              MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK }};

static void kernel(int core, int cores, const float* a, const float* b, const float* bias,
                   float* c) {{
  float* ta[2] = {{qm_local_alloc(TM * TK, "A tile 0"), qm_local_alloc(TM * TK, "A tile 1")}};
  float* tb[2] = {{qm_local_alloc(TK * TN, "B tile 0"), qm_local_alloc(TK * TN, "B tile 1")}};
  float* tc = qm_local_alloc(TM * TN, "C tile");
  for (long t = core; t < BATCH * MT * NT; t += cores) {{
    const long bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int rows = (int)(i == MT - 1 ? M - i * TM : TM);
    const int cols = (int)(j == NT - 1 ? N - j * TN : TN);
    const float* ga = a + (bb % {spec.a.period}) * {spec.a.stride}L + i * TM * K;
    const float* gb = b + (bb % {spec.b.period}) * {spec.b.stride}L + j * TN;
    float* gc = c + (bb % {spec.c.period}) * {spec.c.stride}L + i * TM * N + j * TN;
    qm_zero(tc, rows * cols);
    for (long s = 0; s < KT; ++s) {{
      const int kk = (int)(s == KT - 1 ? K - s * TK : TK);
      qm_load(ta[s % 2], ga + s * TK, rows, kk, K);
      qm_load(tb[s % 2], gb + s * TK * N, kk, cols, N);
      qm_fma(tc, ta[s % 2], tb[s % 2], rows, cols, kk);{bias_code}
      if (s == KT - 1) qm_store(gc, tc, rows, cols, N);
      qm_end_stage();
    }}
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec) -> KernelSource:
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left = spec.pads[0], spec.pads[1]
    code = f"""/* {spec.name}: im2col of {spec.images}x{spec.channels}x{spec.height}x{spec.width} \
for a {kh}x{kw} kernel, {spec.groups} group(s): cols[img][g] is K x (Ho*Wo) = \
{spec.k} x {ho * wo}; one row per stage, rows dealt round-robin to the cores. */
namespace {spec.name} {{
enum : long {{ C = {spec.channels}, H = {spec.height}, W = {spec.width}, HO = {ho}, WO = {wo},
              G = {spec.groups}, CPG = C / G, KH = {kh}, KW = {kw},
              KR = CPG * KH * KW, ROWS = {spec.images} * G * KR }};

static void kernel(int core, int cores, const float* x, float* cols) {{
  float* row = qm_local_alloc(HO * WO, "cols row");
  for (long t = core; t < ROWS; t += cores) {{
    const long img = t / (G * KR), g = (t / KR) % G, r = t % KR;
    const long ch = g * CPG + r / (KH * KW);
    qm_im2col_row(row, x + (img * C + ch) * H * W, H, W, HO, WO, (int)((r / KW) % KH),
                  (int)(r % KW), {sh}, {sw}, {top}, {left}, {dh}, {dw});
    qm_store(cols + t * HO * WO, row, 1, HO * WO, HO * WO);
    qm_end_stage();
  }}
}}
}}  // namespace {spec.name}
"""
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    cores = int(target.cores.value)
    names = ", ".join(f'"{p}"' for p in PIPES)
    return f"""qmsim::begin_kernel({{{names}}});
for (int core = 0; core < {cores}; ++core) {{
  cpu::local().reset();
  qmsim::core_begin(core);
  {kernel.name}::kernel(core, {cores}, {", ".join(args)});
  qmsim::core_end();
}}"""

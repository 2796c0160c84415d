"""The kunlunxin target's description: a Kunlun 2 (R200, XPU2) XPU, as data.

8 clusters x 64 cores, each core a scalar unit and a few KB of local memory (LM: 32 KB
per group of 4 cores, split evenly); the 512-bit SIMD unit is shared by the 4 cores of a
group (guide), so a busy group's cores each get a quarter of it; a cluster's shared memory
(SM, declared, not modelled) and the chip's GDDR6. The matrix engine (SDNN) is reachable
only through the vendor's fc/xblas libraries (docs/TARGETS.md), so it appears only in
:func:`hw_targets.kunlunxin.cost.library_cost`. Not declared because nothing reads them:
the 64 MB L3 (all traffic is charged at GDDR6 rates) and the Kunlun 1 figures of the
guide. The cost model, the emitter and the header (through :func:`defines`) read every
number here.
"""

from __future__ import annotations

from hw_targets.base import Buffer, Param, Target

__all__ = ["HEADER", "PIPES", "TARGET", "defines", "lanes", "row_unit"]

HEADER = "xpu_sim.h"
PIPES = ("dma", "simd")

_GUIDE = "Kunlunxin XPU C/C++ developer guide v2.2"
_CLOCK_HZ = 1.0e9
_GDDR6 = 512e9

_LAUNCH = ("1 us from a kernel's launch to its cores' start, assumed: no published "
           "figure (the host-side launch overlaps the previous kernel)")

TARGET = Target(
    name="kunlunxin",
    dialect="XPU C/C++",
    summary="Kunlun 2 (R200) style: 8 clusters x 64 SIMD cores, 8 KB LM per core, GDDR6",
    clock_hz=Param(_CLOCK_HZ, "Hz", "U", "no published Kunlun 2 clock; a round number"),
    cores=Param(512, "cores", "V", f"8 clusters x 64 cores [{_GUIDE}]"),
    buffers=(
        Buffer("LM", Param(8192, "bytes", "U",
                           f"32 KB LM per group of 4 cores [{_GUIDE}] split evenly"),
               Param(64, "bytes", "U",
                     "one 512-bit vector: Kunlun 2 vector loads/stores of LM take whole "
                     "64-byte vectors [docs/TARGETS.md, issue 14]; not read in a header")),
        # Declared, not modelled (see hw_targets.kunlunxin.cost).
        Buffer("SM", Param(256 * 1024, "bytes", "V", f"256 KB SM per cluster [{_GUIDE}]"),
               Param(64, "bytes", "U", f"Kunlun 1 aligns SM to 64 B [{_GUIDE}], assumed"),
               scope="cluster"),
    ),
    dram_bytes_per_cycle=Param(_GDDR6 / _CLOCK_HZ, "B/cycle", "U",
                               "GDDR6 512 GB/s [V] at the assumed clock [U]"),
    macs_per_cycle=Param(4, "MAC/cycle", "U",
                         "512-bit SIMD [V] = 16 fp32 lanes, one vector MAC per cycle [U], "
                         "one unit per group of 4 cores [V]: 4 per core"),
    in_dtype="half",
    params={
        "launch_cycles": Param(1000, "cycles", "U", _LAUNCH),
        "clusters": Param(8, "clusters", "V", _GUIDE),
        "cores_per_cluster": Param(64, "cores", "V", _GUIDE),
        "simd_bits": Param(512, "bits", "V", _GUIDE),
        "simd_op_cycles": Param(1, "cycles", "U", "one 512-bit vector instruction per cycle"),
        "simd_sharers": Param(4, "cores", "V",
                              f"one 512-bit SIMD unit per group of 4 cores [{_GUIDE}]"),
        "dma_latency": Param(32, "cycles", "U", "per GM2LM/LM2GM call; not published"),
        "core_dma_bytes_per_cycle": Param(64, "B/cycle", "U",
                                          "one core's DMA engine at most (one 512-bit word)"),
        "sdnn_flops_fp16": Param(128e12, "FLOP/s", "S",
                                 "Kunlun 2 fp16 peak (press); SDNN via fc/xblas only [V]"),
        "sdnn_efficiency": Param(0.5, "ratio", "U", "share of SDNN peak a library fc reaches"),
        # Not read by the cost model: the paper's claim, printed beside the fusion speed-up
        # the model predicts (bench/targets.py, part E).
        "paper_attention_fusion_speedup": Param(
            2.1, "x", "U",
            "claimed by the paper: 2.1x speed-up on Kunlunxin from fusing redundant "
            "attention heads; not a measurement",
        ),
    },
)


def lanes(target: Target) -> tuple[int, int]:
    """fp32 and fp16 lanes of one vector register."""
    bits = int(target.param("simd_bits"))
    return bits // 32, bits // 16


def row_unit(target: Target) -> int:
    """Input elements of one LM alignment unit: LM rows of A (and an im2col's input row)
    are padded to it so that every row starts aligned."""
    return target.buffer("LM").alignment // target.in_bytes


def defines(target: Target) -> dict[str, int]:
    """The header's constants (``QM_<NAME>``), every one read from ``target``."""
    clusters, per_cluster = int(target.param("clusters")), int(target.param("cores_per_cluster"))
    if clusters * per_cluster != int(target.cores.value):
        raise ValueError(f"{target.name}: cores ({int(target.cores.value)}) must be "
                         f"clusters x cores_per_cluster ({clusters} x {per_cluster})")
    lm = target.buffer("LM")
    return {
        "launch_cycles": int(target.param("launch_cycles")),
        "lm_bytes": lm.bytes,
        "lm_align": lm.alignment,
        "clusters": clusters,
        "cores_per_cluster": per_cluster,
        "cores": clusters * per_cluster,
        "simd_bits": int(target.param("simd_bits")),
        "gm_bytes_per_kcycle": max(1, round(1000 * float(target.dram_bytes_per_cycle))),
        "core_dma_bytes_per_kcycle": round(1000 * target.param("core_dma_bytes_per_cycle")),
        "dma_latency": int(target.param("dma_latency")),
        "simd_op_cycles": int(target.param("simd_op_cycles")),
        "simd_sharers": int(target.param("simd_sharers")),
        "vector_align": int(target.param("simd_bits")) // 8,
    }

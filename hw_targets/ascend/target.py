"""The ascend target's description: one AI Core of an Atlas A2 (Ascend 910B) chip, as data.

The A2 generation (dav-c220) splits an AI Core into a cube core (AIC: L1 512 KB, L0A 64 KB,
L0B 64 KB, L0C 128 KB) and vector cores (AIV: Unified Buffer 192 KB); kernels that use both
are MIX kernels, and results leave L0C through ``Fixpipe``. 24 AI Cores (assumed) and an L2
shared by the chip; a cube unit of ``cube_edge``\\ :sup:`3` (16 x 16 x 16) fp16 MACs per
cycle accumulating in fp32, on fractals of ``cube_edge`` x ``cube_edge`` elements (512 B of
fp16, 1 KB of fp32). Every number the cost model, the emitter and the
header (through :func:`defines`) use is read from :data:`TARGET` here, so
``dataclasses.replace`` of any of them changes what is predicted, emitted and simulated.

Numbers are tagged ``V``/``S``/``U`` (see :mod:`hw_targets.base`); the rates of the paths
are not published for the 910B: their values are a CANN test fixture's for an Ascend 310,
kept as assumptions.
"""

from __future__ import annotations

from hw_targets.base import Buffer, Param, Target

__all__ = ["HEADER", "PIPES", "TARGET", "cube_edge", "defines", "fractal_bytes"]

HEADER = "ascend_sim.h"
PIPES = ("MTE2", "MTE1", "M", "FIX", "AIV-MTE2", "V", "MTE3", "HBM")

_TILING = ("cannmirror/asc-devkit impl/adv_api/tiling/matmul/matmul_tiling_base.cpp "
           "('for ascend910b')")
_FIXTURE = ("an Ascend 310's rate in CANN op-tiling test fixtures (hardware_info), kept for the "
            "910B: no 910B figure published")
_L0_ALIGN = Param(512, "bytes", "V", "Ascend C Mmad doc: A/B start 512-byte aligned")
_BLOCK = "Ascend C's 32-byte DataCopy unit (an assumption; no vendor source read)"

_LAUNCH = ("1 us from a kernel's launch to its cores' start, assumed: no published "
           "figure (the host-side launch overlaps the previous kernel)")

TARGET = Target(
    name="ascend",
    dialect="Ascend C",
    summary="Atlas A2 (910B) AI Core: cube core + vector core (MIX), Fixpipe out of L0C, 24 cores",
    clock_hz=Param(1.8e9, "Hz", "U", "no published 910B clock; ~1.8 GHz from press peak figures"),
    cores=Param(24, "cores", "U", "24 AI Cores (910B2-class; 20 on a 910B3/B4): press, not a "
                                  "vendor source read here"),
    buffers=(
        Buffer("L1", Param(512 << 10, "bytes", "V", _TILING + ": 512 KB (256 B reserved)"),
               Param(32, "bytes", "U", _BLOCK)),
        Buffer("L0A", Param(64 << 10, "bytes", "V", _TILING), _L0_ALIGN),
        Buffer("L0B", Param(64 << 10, "bytes", "V", _TILING), _L0_ALIGN),
        Buffer("L0C", Param(128 << 10, "bytes", "V", _TILING), _L0_ALIGN),
        Buffer("UB", Param(192 << 10, "bytes", "V", _TILING + ": 192 KB (256 B reserved)"),
               Param(32, "bytes", "U", _BLOCK)),
    ),
    dram_bytes_per_cycle=Param(1600 / 1.8, "B/cycle", "U",
                               "1.6 TB/s HBM2e of the 910B [S, press] at the 1.8 GHz clock [U]"),
    macs_per_cycle=Param(4096, "MAC/cycle", "S", "cube 16x16x16 fp16, Hot Chips 2019"),
    in_dtype="half",
    params={
        "launch_cycles": Param(1800, "cycles", "U", _LAUNCH),
        "cube_edge": Param(16, "elements", "S",
                           "16x16x16 cube, Hot Chips 2019; a 16x16 fp16 fractal is 512 B "
                           "(Ascend C Mmad doc)"),
        "l2_bytes": Param(192 << 20, "bytes", "U", "192 MB L2 of the 910B [press]; not a vendor "
                                                   "source read here"),
        "l2_rate": Param(128, "B/cycle", "U", _FIXTURE + ": l2_rate 128"),
        "ddr_rate": Param(64, "B/cycle", "U",
                          _FIXTURE + ": ddr_write_rate 64 / ddr_read_rate 67"),
        "l1_to_l0_a_rate": Param(512, "B/cycle", "U", _FIXTURE + ": l1_to_l0_a_rate 512"),
        "l1_to_l0_b_rate": Param(256, "B/cycle", "U", _FIXTURE + ": l1_to_l0_b_rate 256"),
        "fixpipe_rate": Param(256, "B/cycle", "U",
                              "L0C read by Fixpipe; the fixture's l0_c_to_ub_rate 256, assumed"),
        "ub_to_ddr_rate": Param(64, "B/cycle", "U", _FIXTURE + ": ub_to_ddr_rate 64"),
        "dma_issue_cycles": Param(32, "cycles", "U",
                                  "fixed cost of issuing one DataCopy/LoadData/Fixpipe/"
                                  "DataCopyPad; not published (Kunlunxin's assumption)"),
        "flag_cycles": Param(64, "cycles", "U",
                             "a CrossCoreSetFlag -> CrossCoreWaitFlag round trip; not published"),
        "vector_bytes_per_repeat": Param(256, "bytes", "S", "docs/TARGETS.md: 128 fp16 / 64 fp32"),
        "vector_cycles_per_repeat": Param(1, "cycles", "U", "one repeat issued per cycle"),
        # Not read by the cost model: the paper's claim, printed beside the c_conv the
        # model implies (bench/targets.py, part D).
        "paper_c_conv": Param(1.2, "ratio", "U",
                              "claimed by the paper, eq. 9; not a measurement"),
    },
)


def cube_edge(target: Target) -> int:
    """Elements along each side of a fractal (and of the cube)."""
    return int(target.param("cube_edge"))


def fractal_bytes(target: Target, element_bytes: int) -> int:
    """Bytes of one fractal of ``element_bytes`` elements (512 for fp16, 1024 for fp32)."""
    return cube_edge(target) ** 2 * element_bytes


def defines(target: Target) -> dict[str, int]:
    """The header's constants (``QM_<NAME>``), every one read from ``target``."""
    cores = int(target.cores.value)
    hbm_share = int(target.dram_bytes_per_cycle.value) // cores
    return {
        "dma_issue_cycles": int(target.param("dma_issue_cycles")),
        "flag_cycles": int(target.param("flag_cycles")),
        "launch_cycles": int(target.param("launch_cycles")),
        "cube_edge": cube_edge(target),
        "l1_bytes": target.buffer("L1").bytes,
        "l0a_bytes": target.buffer("L0A").bytes,
        "l0b_bytes": target.buffer("L0B").bytes,
        "l0c_bytes": target.buffer("L0C").bytes,
        "ub_bytes": target.buffer("UB").bytes,
        "l1_align": target.buffer("L1").alignment,
        "l0a_align": target.buffer("L0A").alignment,
        "l0b_align": target.buffer("L0B").alignment,
        "l0c_align": target.buffer("L0C").alignment,
        "ub_align": target.buffer("UB").alignment,
        "l2_rate": int(target.param("l2_rate")),
        "hbm_core_rate": max(1, min(int(target.param("ddr_rate")), hbm_share)),
        "l1_to_l0a_rate": int(target.param("l1_to_l0_a_rate")),
        "l1_to_l0b_rate": int(target.param("l1_to_l0_b_rate")),
        "l0c_out_rate": int(target.param("fixpipe_rate")),
        "ub_to_ddr_rate": int(target.param("ub_to_ddr_rate")),
        "vector_bytes": int(target.param("vector_bytes_per_repeat")),
        "vector_repeat_cycles": int(target.param("vector_cycles_per_repeat")),
    }

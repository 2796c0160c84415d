"""The ascend target's description: one Da Vinci AI Core of an Ascend 910, as data.

Per core L1 1 MB, L0A 64 KB, L0B 64 KB, L0C 256 KB, Unified Buffer 256 KB; 32 cores and a
32 MB L2 shared by the chip; a cube unit of ``cube_edge``\\ :sup:`3` (16 x 16 x 16) fp16
MACs per cycle accumulating in fp32, on fractals of ``cube_edge`` x ``cube_edge``
elements (512 B of fp16, 1 KB of fp32). Every number the cost model, the emitter and the
header (through :func:`defines`) use is read from :data:`TARGET` here, so
``dataclasses.replace`` of any of them changes what is predicted, emitted and simulated.

Numbers are tagged ``V``/``S``/``U`` (see :mod:`hw_targets.base`); the rates of the paths
are field names read in CANN code with values from secondary sources.
"""

from __future__ import annotations

from hw_targets.base import Buffer, Param, Target

__all__ = ["HEADER", "PIPES", "TARGET", "cube_edge", "defines", "fractal_bytes"]

HEADER = "ascend_sim.h"
PIPES = ("MTE2", "MTE1", "M", "V", "MTE3", "HBM")

_CCECONF = "mindspore-ai/akg src/contrib/cce_parm/cceconf.cc (cloud = Ascend 910)"
_FIXTURE = "CANN op-tiling test fixtures (hardware_info of an Ascend stub), via docs/TARGETS.md"
_L0_ALIGN = Param(512, "bytes", "V", "Ascend C Mmad doc: A/B start 512-byte aligned")
_BLOCK = "Ascend C's 32-byte DataCopy unit (an assumption; no vendor source read)"

TARGET = Target(
    name="ascend",
    dialect="Ascend C",
    summary="Ascend 910 Da Vinci AI Core: 16x16x16 fp16 cube, L1/L0A/L0B/L0C/UB, 32 cores",
    clock_hz=Param(1.0e9, "Hz", "U",
                   "256 TFLOPS fp16 [S] / (32 cores x 4096 MAC x 2) = 0.98 GHz, rounded"),
    cores=Param(32, "cores", "V", _CCECONF + " Core_num"),
    buffers=(
        Buffer("L1", Param(1 << 20, "bytes", "V", _CCECONF), Param(32, "bytes", "U", _BLOCK)),
        Buffer("L0A", Param(64 << 10, "bytes", "V", _CCECONF), _L0_ALIGN),
        Buffer("L0B", Param(64 << 10, "bytes", "V", _CCECONF), _L0_ALIGN),
        Buffer("L0C", Param(256 << 10, "bytes", "V", _CCECONF), _L0_ALIGN),
        Buffer("UB", Param(256 << 10, "bytes", "V", _CCECONF + " Unified_Buffer"),
               Param(32, "bytes", "U", _BLOCK)),
    ),
    dram_bytes_per_cycle=Param(1200, "B/cycle", "U",
                               "1.2 TB/s HBM [S, docs/TARGETS.md] at the 1 GHz clock [U]"),
    macs_per_cycle=Param(4096, "MAC/cycle", "S", "cube 16x16x16 fp16, Hot Chips 2019"),
    in_dtype="half",
    params={
        "cube_edge": Param(16, "elements", "S",
                           "16x16x16 cube, Hot Chips 2019; a 16x16 fp16 fractal is 512 B "
                           "(Ascend C Mmad doc)"),
        "l2_bytes": Param(32 << 20, "bytes", "V", _CCECONF + " L2_Buffer"),
        "l2_rate": Param(128, "B/cycle", "S", _FIXTURE + ": l2_rate 128 (field name V)"),
        "ddr_rate": Param(64, "B/cycle", "S",
                          _FIXTURE + ": ddr_write_rate 64 / ddr_read_rate 67 (field name V)"),
        "l1_to_l0_a_rate": Param(512, "B/cycle", "S", "docs/TARGETS.md 512 (field name V)"),
        "l1_to_l0_b_rate": Param(256, "B/cycle", "S", "docs/TARGETS.md 256 (field name V)"),
        "l0_c_to_ub_rate": Param(256, "B/cycle", "S", "docs/TARGETS.md 256 (field name V)"),
        "ub_to_ddr_rate": Param(64, "B/cycle", "S", "docs/TARGETS.md 64 (field name V)"),
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
        "l0c_to_ub_rate": int(target.param("l0_c_to_ub_rate")),
        "ub_to_ddr_rate": int(target.param("ub_to_ddr_rate")),
        "vector_bytes": int(target.param("vector_bytes_per_repeat")),
        "vector_repeat_cycles": int(target.param("vector_cycles_per_repeat")),
    }

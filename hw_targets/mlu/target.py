"""The mlu target's description: one Cambricon MLU370 chip, as data (docs/TARGETS.md).

Per core: NRAM (640 KB usable of 768 KB) and WRAM (1024 KB); a cluster's SRAM (declared,
not used: each core reads its operands from GDRAM); 4 clusters x 4 compute cores; the
chip's LPDDR5 shared by the active cores; a TFU that multiplies K padded to ``k_align`` by
N padded to ``n_align``. The MLU370-X8 card carries two chips: its 614.4 GB/s and 96
TFLOPS fp16 are halved here for one chip. Derived numbers say in their source how they are
derived (the chip's DRAM bandwidth and fp16 peak are folded into ``dram_bytes_per_cycle``
and ``macs_per_cycle``). The cost model, the emitter and the header (through
:func:`defines`) read every number here.
"""

from __future__ import annotations

from hw_targets.base import Buffer, Param, Target

__all__ = ["HEADER", "PIPES", "TARGET", "defines"]

HEADER = "bang_sim.h"
PIPES = ("ALU", "VFU", "TFU", "IO-DMA", "Move-DMA")

_CLOCK = 1.3e9
_CLUSTERS = 4
_CORES_PER_CLUSTER = 4
_FP16_FLOPS = 96e12 / 2  # one chip of the two-chip MLU370-X8
_DRAM_BYTES_PER_S = 614.4e9 / 2
_KB = 1024
_ALIGN = Param(64, "bytes", "U", "__nram__/__wram__ arrays 64-byte aligned, as GDRAM units")

_LAUNCH = ("1 us from a kernel's launch to its cores' start, assumed: no published "
           "figure (the host-side launch overlaps the previous kernel)")

TARGET = Target(
    name="mlu",
    dialect="BANG C",
    summary="one Cambricon MLU370 chip: 4 clusters x 4 cores, NRAM/WRAM per core, TFU matmul",
    clock_hz=Param(_CLOCK, "Hz", "V", "MLU370-X8 clock (docs/TARGETS.md: Cambricon)"),
    cores=Param(
        _CLUSTERS * _CORES_PER_CLUSTER, "cores", "U",
        "4 clusters per chip (U: an MLU370 chip is 2 dies [S], 2 clusters per die assumed) "
        "x 4 compute cores per cluster (V, mlu-ops kernel.h)",
    ),
    buffers=(
        Buffer("NRAM", Param(640 * _KB, "bytes", "V",
                             "768 KB NRAM per core, 640 KB usable (mlu-ops kernel.h)"), _ALIGN),
        Buffer("WRAM", Param(1024 * _KB, "bytes", "S", "1024 KB WRAM per core (docs/TARGETS.md)"),
               _ALIGN),
        # Declared, not modelled (the kernels read their operands from GDRAM).
        Buffer("SRAM", Param(4096 * _KB, "bytes", "V", "4 MB SRAM per cluster (mlu-ops docs)"),
               _ALIGN, scope="cluster"),
    ),
    dram_bytes_per_cycle=Param(
        _DRAM_BYTES_PER_S / _CLOCK, "B/cycle", "U",
        "614.4 GB/s LPDDR5 of the two-chip MLU370-X8 (S) / 2 for one chip (U: even split) "
        "at 1.3 GHz (V), shared by the active cores",
    ),
    macs_per_cycle=Param(
        round(_FP16_FLOPS / 2 / _CLOCK / (_CLUSTERS * _CORES_PER_CLUSTER)), "MAC/cycle", "U",
        "unpublished per-core TFU rate: 96 TFLOPS fp16 of the two-chip card (S) / 2 chips "
        "/ 2 / 1.3 GHz / 16 cores",
    ),
    in_dtype="half",
    params={
        "launch_cycles": Param(1300, "cycles", "U", _LAUNCH),
        "cores_per_cluster": Param(_CORES_PER_CLUSTER, "cores", "V",
                                   "4 compute + 1 memory core per cluster (mlu-ops docs)"),
        "core_dram_bytes_per_cycle": Param(64, "B/cycle", "U",
                                           "one core's GDRAM DMA at most (not published); the "
                                           "cores that stream share the chip's bandwidth"),
        "gdram_unit": Param(64, "bytes", "V", "GDRAM accessed in 64 B aligned units (mlu-ops)"),
        "vector_bytes": Param(128, "bytes", "V", "vector work costs ceil(bytes/128) cycles"),
        "k_align": Param(32, "fp16", "V", "matmul K padded to 64 B / sizeof(half)"),
        "n_align": Param(64, "channels", "V", "output channels padded to 64 (WRAM lanes)"),
        "move_bytes_per_cycle": Param(128, "B/cycle", "U",
                                      "NRAM2WRAM/NRAM2NRAM rate, assumed one vector line"),
        "dma_issue_cycles": Param(32, "cycles", "U",
                                  "fixed cost of one __memcpy call; not published"),
        "sync_cycles": Param(64, "cycles", "U", "barrier at the end of a pipeline iteration"),
        # Not read by the cost model: the paper's claim, printed beside the c_conv the
        # model implies (bench/targets.py, part D).
        "paper_c_conv": Param(1.5, "ratio", "U",
                              "claimed by the paper, eq. 9; not a measurement"),
    },
)


def defines(target: Target) -> dict[str, int]:
    """The header's constants (``QM_<NAME>``), every one read from ``target``."""
    return {
        "dma_issue_cycles": int(target.param("dma_issue_cycles")),
        "launch_cycles": int(target.param("launch_cycles")),
        "nram_bytes": target.buffer("NRAM").bytes,
        "wram_bytes": target.buffer("WRAM").bytes,
        "nram_align": target.buffer("NRAM").alignment,
        "wram_align": target.buffer("WRAM").alignment,
        "cores_per_cluster": int(target.param("cores_per_cluster")),
        "dram_millibytes_per_cycle": round(1000 * float(target.dram_bytes_per_cycle)),
        "core_dram_millibytes_per_cycle": round(1000 * target.param("core_dram_bytes_per_cycle")),
        "macs_per_cycle": int(target.macs_per_cycle),
        "move_bytes_per_cycle": int(target.param("move_bytes_per_cycle")),
        "sync_cycles": int(target.param("sync_cycles")),
        "gdram_unit": int(target.param("gdram_unit")),
        "vector_bytes": int(target.param("vector_bytes")),
        "k_align": int(target.param("k_align")),
        "n_align": int(target.param("n_align")),
    }

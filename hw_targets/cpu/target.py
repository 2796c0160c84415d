"""The cpu target's description: a generic multi-core AVX2 server CPU, as data.

All numbers are assumptions about a generic AVX2 server core (tag ``U``): the point of
this target is a plain-C lowering that anyone can run, not a claim about one CPU. The cost
model, the emitter and the header (through :func:`defines`) read every number here.
"""

from __future__ import annotations

from hw_targets.base import Buffer, Param, Target

__all__ = ["HEADER", "PIPES", "TARGET", "defines"]

HEADER = "cpu_sim.h"
PIPES = ("dram", "fma")

TARGET = Target(
    name="cpu",
    dialect="C",
    summary="generic AVX2 CPU: fp32 SIMD FMA, L2 cache blocking, shared DRAM bandwidth",
    clock_hz=Param(3.0e9, "Hz", "U", "a typical server core clock"),
    cores=Param(2, "cores", "U", "the 2-core CI machine qmpass is tested on"),
    buffers=(Buffer("L2", Param(1 << 20, "bytes", "U", "1 MiB L2 per core (x86 server)"),
                    Param(64, "bytes", "U", "a cache line (x86)")),),
    dram_bytes_per_cycle=Param(8, "B/cycle", "U", "~24 GB/s at 3 GHz, shared by the cores"),
    macs_per_cycle=Param(16, "MAC/cycle", "U", "2 FMA ports x 8 fp32 lanes (AVX2)"),
    in_dtype="float",
    params={
        "lanes": Param(8, "fp32", "U", "AVX2 vector width"),
    },
)


def defines(target: Target) -> dict[str, int]:
    """The header's constants (``QM_<NAME>``), every one read from ``target``."""
    cores = int(target.cores.value)
    return {
        "local_bytes": target.buffer("L2").bytes,
        "local_align": target.buffer("L2").alignment,
        "core_bytes_per_cycle": max(1, int(target.dram_bytes_per_cycle.value) // cores),
        "lanes": int(target.param("lanes")),
        "macs_per_cycle": int(target.macs_per_cycle.value),
    }

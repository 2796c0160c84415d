"""The mlu target: one Cambricon MLU370 chip programmed in BANG C (docs/TARGETS.md).

Split in three: :mod:`.target` (the description, as data, and the header's constants),
:mod:`.cost` (the cost model and the tiling search) and :mod:`.emit` (the emitter, which
fills in the kernel templates of ``hw_targets/templates/mlu/``). ``include/bang_sim.h``
gives the BANG C subset the kernels use its meaning and its cycles on the CPU.
"""

from __future__ import annotations

from hw_targets.mlu.cost import cost, tiling
from hw_targets.mlu.emit import emit, launch
from hw_targets.mlu.target import HEADER, PIPES, TARGET, defines

__all__ = ["HEADER", "PIPES", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

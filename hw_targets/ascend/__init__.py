"""The ascend target: one AI Core of an Atlas A2 (Ascend 910B), programmed in Ascend C.

Split in three: :mod:`.target` (the description, as data, and the header's constants),
:mod:`.cost` (the cost model and the tiling search) and :mod:`.emit` (the emitter, which
fills in the kernel templates of ``hw_targets/templates/ascend/``). ``include/ascend_sim.h``
gives the Ascend C subset the kernels use its meaning and its cycles on the CPU.
"""

from __future__ import annotations

from hw_targets.ascend.cost import cost, tiling
from hw_targets.ascend.emit import emit, launch
from hw_targets.ascend.target import HEADER, PIPES, TARGET, defines

__all__ = ["HEADER", "PIPES", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

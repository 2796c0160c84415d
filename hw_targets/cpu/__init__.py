"""The cpu target: a multi-core SIMD CPU, the reference the NPU styles are read against.

Split in three: :mod:`.target` (the description, as data, and the header's constants),
:mod:`.cost` (the cost model and the tiling search) and :mod:`.emit` (the emitter, which
fills in the kernel templates of ``hw_targets/templates/cpu/``). ``include/cpu_sim.h``
gives the kernels' helpers their meaning and their cycles.
"""

from __future__ import annotations

from hw_targets.cpu.cost import cost, tiling
from hw_targets.cpu.emit import emit, launch
from hw_targets.cpu.target import HEADER, PIPES, TARGET, defines

__all__ = ["HEADER", "PIPES", "TARGET", "cost", "defines", "emit", "launch", "tiling"]

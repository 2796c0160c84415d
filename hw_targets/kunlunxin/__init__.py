"""The kunlunxin target: a Kunlun 2 (R200, XPU2) programmed in XPU C/C++.

Split in three: :mod:`.target` (the description, as data, and the header's constants),
:mod:`.cost` (the cost model, the tiling search and the vendor-library estimate) and
:mod:`.emit` (the emitter, which fills in the kernel templates of
``hw_targets/templates/kunlunxin/``). ``include/xpu_sim.h`` gives the XPU C/C++ names the
kernels use their meaning and their cycles on the CPU.
"""

from __future__ import annotations

from hw_targets.kunlunxin.cost import cost, library_cost, tiling
from hw_targets.kunlunxin.emit import emit, launch
from hw_targets.kunlunxin.target import HEADER, PIPES, TARGET, defines

__all__ = ["HEADER", "PIPES", "TARGET", "cost", "defines", "emit", "launch", "library_cost",
           "tiling"]

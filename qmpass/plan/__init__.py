"""Planning: extraction -> :class:`Plan` (which rewrite where, at which rank or channels).

Run by ``compress`` (and :mod:`qmpass.tvm`), not by ``analyze``: the planner reads the
extracted operators, channel groups and calibration statistics, never the QM-FRG, and
from :mod:`qmpass.spectral` only ``operator_norm`` (for certificates).
"""

from qmpass.plan.plan import Cost, Plan, Step, StepKind

__all__ = ["Cost", "Plan", "Step", "StepKind"]

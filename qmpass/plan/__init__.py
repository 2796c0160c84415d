"""Planning: analysis -> :class:`Plan` (which rewrite where, at which rank or channels)."""

from qmpass.plan.plan import Cost, Plan, Step, StepKind

__all__ = ["Cost", "Plan", "Step", "StepKind"]

"""What every unit of compression is: a :class:`Candidate` with its :class:`Variant` list,
and the calibration statistics it reads (:class:`StatsKey`, :class:`StatsLike`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.budget import Option, Unit, lower_hull
from qmpass.plan.plan import Step

__all__ = ["Built", "Candidate", "StatsKey", "StatsLike", "Variant", "input_key", "unchanged"]

#: the steps (with their new weights) that realise a variant
Built = list[tuple[Step, Mapping[str, np.ndarray]]]


class StatsLike(Protocol):
    """What the planner reads of calibration statistics (``qmpass.verify.TensorStats``)."""

    @property
    def mean(self) -> np.ndarray: ...
    @property
    def cov(self) -> np.ndarray: ...
    @property
    def max_norm(self) -> float: ...


@dataclass(frozen=True)
class StatsKey:
    """Which statistics a unit reads: vectors of ``tensor`` along ``axis``, or the
    receptive fields (``patches``) of the Conv ``operator``."""

    tensor: str
    kind: Literal["vectors", "patches"]
    axis: int = -1
    operator: str | None = None

    @property
    def key(self) -> str:
        if self.kind == "patches":
            return f"patches:{self.operator}"
        return f"vectors:{self.axis}:{self.tensor}"


def input_key(op: Operator) -> StatsKey:
    """The statistics of what ``op`` multiplies its weight with."""
    if op.op_type == "Conv":
        return StatsKey(op.input, "patches", operator=op.name)
    return StatsKey(op.input, "vectors", -1)


@dataclass(frozen=True)
class Variant:
    """One way to compress a unit. ``cost`` is the unit's cost after it in the plan's
    :class:`~qmpass.plan.resource.Resource` (weight parameters, or a target's cycles;
    for channel groups an estimate that ignores other groups, corrected by the
    planner); ``error`` the summed relative error; ``worst`` the largest member's;
    ``label`` the rank or kept channel count (-1 for a mix of ranks)."""

    cost: float
    error: float
    worst: float
    label: int
    build: Callable[[], Built]


@dataclass(frozen=True)
class Candidate:
    """One unit of compression: its operators, its variants (``[0]`` unchanged) and,
    for a channel group, the group."""

    key: str
    operators: tuple[str, ...]
    variants: tuple[Variant, ...]
    group: ChannelGroup | None = None

    @property
    def unit(self) -> Unit:
        return self.priced(1.0)

    def priced(self, gain: float) -> Unit:
        """The unit for the budget's allocation, each variant's error times ``gain``."""
        return Unit(self.key, tuple(Option(i, v.cost, v.error * gain)
                                    for i, v in enumerate(self.variants)))

    def milder(self, index: int) -> list[int]:
        """Variants on the unit's lower hull that cost more than ``index`` (keep more),
        cheapest first: what to fall back to when ``index`` breaks the tolerance."""
        chosen = self.variants[index].cost
        hull = lower_hull(self.unit.options)
        return [o.value for o in reversed(hull) if o.cost > chosen and o.value != 0]


def unchanged(cost: float) -> Variant:
    """The variant that leaves a unit as it is (``variants[0]``)."""
    return Variant(cost, 0.0, 0.0, -1, list)


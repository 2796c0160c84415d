"""Units of compression and their variants: what the planner chooses between.

A :class:`Candidate` is one unit (an operator, a cluster of operators reading one
tensor, a channel group) with its :class:`Variant` list: ``variants[0]`` leaves the unit
unchanged; each other variant costs fewer parameters, adds a predicted error and knows
how to build the plan steps (and their new weights) that realise it.

* low-rank operator: one variant per rank ``q`` (a multiple of ``align``) that saves
  parameters and FLOPs; error = relative tail energy (:mod:`qmpass.plan.factors`).
* cluster (operators reading one tensor): the fused shared-basis variants *and* the
  members factorised separately (the members' own Lagrangian path); the allocation picks
  whichever loses less for its cost, so a shared basis is used where it pays.
* channel group: one variant per kept channel count. ``qmfrg`` orders channels by greedy
  forward selection and compensates the consumers by least squares; ``magnitude`` and
  ``random`` order them by L1 norm or at random and do not compensate.

Errors are relative (energy lost over energy seen), summed over members, so units of
different sizes are compared on one scale: the objective of the paper's eq. (8).

:mod:`.common` holds what every unit is, :mod:`.lowrank` the factorised units,
:mod:`.pruning` the channel groups and the costs of pruned operators, :mod:`.crosslayer`
the units that the QM-FRG groups across layers to share one input-side basis.
"""

from __future__ import annotations

from qmpass.plan.units.common import (
    Built,
    Candidate,
    StatsKey,
    StatsLike,
    Variant,
    input_key,
)
from qmpass.plan.units.crosslayer import Proposal, crosslayer_candidates, crosslayer_outcomes
from qmpass.plan.units.lowrank import cluster_candidate, lowrank_candidate
from qmpass.plan.units.pruning import (
    channel_candidate,
    pruned_costs,
    pruned_resource,
    pruned_scales,
)

__all__ = [
    "Built",
    "Candidate",
    "Proposal",
    "StatsKey",
    "StatsLike",
    "Variant",
    "channel_candidate",
    "cluster_candidate",
    "crosslayer_candidates",
    "crosslayer_outcomes",
    "input_key",
    "lowrank_candidate",
    "pruned_costs",
    "pruned_resource",
    "pruned_scales",
]

"""Choosing each unit's variant under a budget: the Lagrangian of
:mod:`qmpass.plan.budget` with exact costs, tightening and a fill of what it leaves, the
baselines' uniform shares, and the ``delta`` rule (see :mod:`qmpass.plan.planner`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.budget import Unit, allocate
from qmpass.plan.resource import Resource
from qmpass.plan.units import Candidate, pruned_resource

__all__ = ["TIGHTENING_ROUNDS", "Rule", "choose", "exact_cost", "full_cost"]

#: how a ``keep`` budget is shared: the Lagrangian, the same fraction of every operator's
#: cost (the low-rank baselines), the same fraction of every group's channels (pruning)
Rule = Literal["lagrangian", "uniform", "channels"]
#: rounds of measuring and tightening a ``keep`` budget over overlapping channel groups
#: rounds of measuring and tightening a ``keep`` budget over overlapping channel groups
TIGHTENING_ROUNDS = 12


def choose(
    candidates: Sequence[Candidate], ops: Mapping[str, Operator], *, keep: float | None,
    delta: float | None, rule: Rule, resource: Resource, notes: list[str],
    gains: Mapping[str, float],
) -> dict[str, int]:
    """The variant index of every unit under the ``keep`` budget, shared by ``rule`` (the
    Lagrangian prices each unit's errors by its gain), or each unit's cheapest variant
    within ``delta``; a budget the allocation may miss adds a sentence to ``notes``."""
    if delta is not None:
        allowed = 1.0 - math.exp(-delta)
        return {
            c.key: min(
                (i for i, v in enumerate(c.variants) if v.worst <= allowed + 1e-12),
                key=lambda i: c.variants[i].cost,
            )
            for c in candidates
        }
    assert keep is not None
    full = full_cost(candidates, ops, resource)
    target = keep * full
    if rule == "channels":
        return _uniform(candidates, ops, target, resource)
    if rule == "uniform":
        return _uniform_fraction(candidates, ops, target, resource)
    # Channel groups may share operators (a conv consumes one and produces the next), so
    # their full costs overlap; budget the *savings*, which add up but for the product of
    # two groups' removed channels, corrected by measuring and tightening.
    units = [c.priced(gains.get(c.key, 1.0)) for c in candidates]
    budget = sum(u.options[0].cost for u in units) - (full - target)
    choice: dict[str, int] = {}
    for _ in range(TIGHTENING_ROUNDS):
        choice = {key: option.value for key, option in allocate(units, budget).items()}
        spent = exact_cost(candidates, ops, choice, resource)
        if spent <= target + 0.5:
            break
        budget -= spent - target
    else:
        notes.append(
            f"the keep budget may be missed: after {TIGHTENING_ROUNDS} rounds of tightening, "
            f"the plan spends {spent:,.0f} {resource.name} of the compressible operators' "
            f"{full:,.0f}, above the {target:,.0f} that keep={keep:g} allows"
        )
        return choice
    return _fill(candidates, units, ops, choice, target, resource)


def _fill(
    candidates: Sequence[Candidate], units: Sequence[Unit], ops: Mapping[str, Operator],
    choice: dict[str, int], target: float, resource: Resource,
) -> dict[str, int]:
    """Spend what the Lagrangian's last hull step left of the budget: while some unit's
    milder option fits in what is left, move the one that buys back the most (priced)
    error. The Lagrangian path stops at the first point within budget, and it walks only
    the lower hulls: with coarse steps (ranks in multiples of 8 on small layers), or a flat
    spectrum whose hull jumps from the unchanged operator to a far lower rank, that can
    leave much of the budget unspent. Any milder option may be taken here, on the hull or
    above it."""
    options = {u.key: {o.value: o for o in u.options} for u in units}
    by_error = {u.key: sorted(u.options, key=lambda o: o.error) for u in units}
    spent = exact_cost(candidates, ops, choice, resource)
    while True:
        best: tuple[float, str, int, float] | None = None
        for c in candidates:
            now = options[c.key][choice[c.key]]
            for option in by_error[c.key]:  # the most error bought back first
                gain = now.error - option.error
                if gain <= 0 or (best is not None and gain <= best[0]):
                    break
                if option.cost <= now.cost:
                    continue
                cost = exact_cost(candidates, ops, {**choice, c.key: option.value}, resource) \
                    if c.group is not None else spent + option.cost - now.cost
                if cost <= target + 0.5:
                    best = (gain, c.key, option.value, cost)
                    break
        if best is None:
            return choice
        _, key, value, spent = best
        choice[key] = value


def _uniform(candidates: Sequence[Candidate], ops: Mapping[str, Operator], target: float,
             resource: Resource) -> dict[str, int]:
    """The baselines' allocation: the largest common fraction of channels kept in every
    group that meets ``target`` (each count rounded to its nearest allowed value)."""
    def pick(fraction: float) -> dict[str, int]:
        choice = {}
        for c in candidates:
            full = c.group.channels if c.group is not None else 1
            choice[c.key] = min(
                range(len(c.variants)),
                key=lambda i: (abs(_kept(c, i) - fraction * full), -_kept(c, i)),
            )
        return choice

    return _largest_fraction(pick, candidates, ops, target, resource)


def _uniform_fraction(candidates: Sequence[Candidate], ops: Mapping[str, Operator],
                      target: float, resource: Resource) -> dict[str, int]:
    """The low-rank baselines' allocation (plain SVD, SVD-LLM): the largest common
    fraction of its cost that every operator keeps (each at its variant nearest to it)
    that meets ``target``."""
    def pick(fraction: float) -> dict[str, int]:
        return {c.key: min(range(len(c.variants)), key=lambda i: (
            abs(c.variants[i].cost - fraction * c.variants[0].cost), -c.variants[i].cost))
            for c in candidates}

    return _largest_fraction(pick, candidates, ops, target, resource)


def _largest_fraction(
    pick: Callable[[float], dict[str, int]], candidates: Sequence[Candidate],
    ops: Mapping[str, Operator], target: float, resource: Resource,
) -> dict[str, int]:
    """``pick`` at the largest fraction (by bisection) whose choice meets ``target``."""
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if exact_cost(candidates, ops, pick(middle), resource) <= target:
            low = middle
        else:
            high = middle
    return pick(low)


def _kept(candidate: Candidate, index: int) -> int:
    assert candidate.group is not None
    return candidate.group.channels if index == 0 else candidate.variants[index].label


def full_cost(candidates: Sequence[Candidate], ops: Mapping[str, Operator],
               resource: Resource) -> float:
    """``resource`` spent by all the candidates' operators as they are (what ``keep`` is
    a fraction of)."""
    return resource.operators([ops[n] for n in sorted({n for c in candidates
                                                       for n in c.operators}) if n in ops])


def exact_cost(
    candidates: Sequence[Candidate], ops: Mapping[str, Operator], choice: Mapping[str, int],
    resource: Resource,
) -> float:
    """``resource`` spent by all the candidates' operators after the chosen variants
    (channel groups counted jointly, so operators between two groups shrink on both
    sides)."""
    kept: dict[ChannelGroup, int] = {}
    total = 0.0
    for c in candidates:
        if c.group is not None:
            kept[c.group] = _kept(c, choice[c.key])
        else:
            total += c.variants[choice[c.key]].cost
    return total + pruned_resource(resource, kept, ops)

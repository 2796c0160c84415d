"""Budgeted allocation (the paper's eq. 8): minimise the summed predicted error of all
units subject to their summed cost staying within a budget, by its Lagrangian.

Every unit (an operator, a cluster, a channel group) offers options: "keep it as it is"
(error 0, full cost) and cheaper variants with predicted errors. For a multiplier
``lam``, each unit independently picks ``argmin error + lam * cost``; raising ``lam``
walks every unit down the lower convex hull of its (cost, error) points. Taking hull
steps in order of their error-per-saved-cost slope, across all units, until the budget
is met is exactly that Lagrangian path (Everett's theorem: each point on it is optimal
for the budget it spends). Options off the hull are never chosen; that is the price of
the relaxation, and it is at most one hull step per unit.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Option", "Unit", "allocate", "lower_hull"]


@dataclass(frozen=True)
class Option:
    """One variant of a unit: its ``value`` (rank, kept channels), cost and error."""

    value: int
    cost: float
    error: float


@dataclass(frozen=True)
class Unit:
    """A unit's options; ``options[0]`` must be the unchanged unit (error 0)."""

    key: str
    options: tuple[Option, ...]


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (cost, error), from the most expensive
    (the unchanged unit) to the cheapest, each step saving cost for more error."""
    pareto: list[Option] = []  # cheapest first, each better than every cheaper option
    for option in sorted(options, key=lambda o: (o.cost, o.error)):
        if not pareto or option.error < pareto[-1].error:
            if pareto and pareto[-1].cost == option.cost:
                pareto.pop()
            pareto.append(option)
    hull: list[Option] = []
    for option in reversed(pareto):
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Error added per unit of cost saved going from ``a`` to the cheaper ``b``."""
    saved = a.cost - b.cost
    return (b.error - a.error) / saved if saved > 0 else float("inf")


def allocate(units: Sequence[Unit], budget: float) -> dict[str, Option]:
    """The option of every unit on the Lagrangian path that first brings the total cost
    within ``budget``. When even the cheapest options exceed it, they are returned."""
    hulls = {u.key: lower_hull(u.options) for u in units}
    chosen = {u.key: 0 for u in units}  # index into the unit's hull
    total = sum(hulls[u.key][0].cost for u in units)
    heap: list[tuple[float, str]] = []
    for key, hull in hulls.items():
        if len(hull) > 1:
            heapq.heappush(heap, (_slope(hull[0], hull[1]), key))
    while total > budget and heap:
        _, key = heapq.heappop(heap)
        hull, at = hulls[key], chosen[key]
        total -= hull[at].cost - hull[at + 1].cost
        chosen[key] = at + 1
        if at + 2 < len(hull):
            heapq.heappush(heap, (_slope(hull[at + 1], hull[at + 2]), key))
    return {key: hulls[key][at] for key, at in chosen.items()}

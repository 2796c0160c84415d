"""The Lagrangian allocation against brute force on small problems."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpass.plan.budget import Option, Unit, allocate, lower_hull


def _convex_unit(key: str, full: int, decay: float) -> Unit:
    """Options of a truncated spectrum ``s_j = decay**j``: error = tail energy."""
    energy = decay ** (2 * np.arange(full))
    energy /= energy.sum()
    options = [Option(full, float(full), 0.0)]
    options += [Option(q, float(q), float(energy[q:].sum())) for q in range(1, full)]
    return Unit(key, tuple(options))


def test_hull_drops_dominated_and_nonconvex_points() -> None:
    options = (Option(4, 100, 0.0), Option(3, 60, 0.2), Option(2, 50, 0.1), Option(1, 20, 0.5),
               Option(0, 10, 0.6))
    hull = lower_hull(options)
    # (60, 0.2) costs more than (50, 0.1) and is worse; (20, 0.5) lies above the chord
    assert [o.value for o in hull] == [4, 2, 0]


@settings(max_examples=40, deadline=None)
@given(
    decays=st.lists(st.floats(0.3, 0.95), min_size=2, max_size=3),
    fraction=st.floats(0.3, 0.9),
)
def test_allocation_matches_brute_force_on_convex_units(decays: list[float], fraction: float
                                                        ) -> None:
    units = [_convex_unit(f"u{i}", 6, d) for i, d in enumerate(decays)]
    budget = fraction * sum(u.options[0].cost for u in units)
    picked = allocate(units, budget)
    spent = sum(o.cost for o in picked.values())
    error = sum(o.error for o in picked.values())
    assert spent <= budget
    best = min(
        sum(o.error for o in combo)
        for combo in itertools.product(*(u.options for u in units))
        if sum(o.cost for o in combo) <= sum(o.cost for o in picked.values())
    )
    # on convex curves the Lagrangian point is optimal for the budget it spends
    assert error <= best + 1e-12


def test_budget_below_everything_returns_cheapest() -> None:
    units = [_convex_unit("a", 5, 0.5), _convex_unit("b", 5, 0.8)]
    picked = allocate(units, 0.0)
    assert {o.value for o in picked.values()} == {1}


def test_spends_on_the_unit_that_loses_least() -> None:
    steep = _convex_unit("steep", 8, 0.3)  # energy in few values: cheap to truncate
    flat = _convex_unit("flat", 8, 0.99)
    picked = allocate([steep, flat], 11.0)
    assert picked["steep"].value < picked["flat"].value

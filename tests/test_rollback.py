"""The search for a passing prefix of a plan's units (``qmpass.compress.rollback``), on a
stand-in applier and verifier whose error grows with the prefix: every prefix length
is found, in the runs the docstring promises, and a unit-at-a-time rollback reuses the
search's failing prefix instead of running it again."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from qmpass.compress import rollback
from qmpass.verify import Verification


class _Stand:
    """``applier.build`` and ``verifier.check``: a model is the list of its steps; its
    error is the number of steps past ``passing`` (0 within the tolerance)."""

    def __init__(self, passing: int) -> None:
        self.passing, self.runs = passing, 0

    def build(self, built: list[Any]) -> tuple[list[Any], dict[int, str]]:
        return list(built), {}

    def check(self, model: list[Any]) -> Verification:
        self.runs += 1
        error = float(max(0, len(model) - self.passing))
        return Verification(error, error, 1)


def _planned(units: int) -> Any:
    steps = [SimpleNamespace(predicted_error=float(i)) for i in range(units)]
    return SimpleNamespace(plan=SimpleNamespace(steps=steps), tensors=[{}] * units,
                           units=[SimpleNamespace(steps=(i,), fallbacks=lambda: iter(()))
                                  for i in range(units)])


@pytest.mark.parametrize("units", [1, 2, 3, 7, 64, 65, 200])
def test_the_search_finds_every_passing_prefix_in_logarithmic_runs(units: int) -> None:
    for passing in range(units):
        stand: Any = _Stand(passing)
        planned = _planned(units)
        whole = stand.check(list(planned.units))
        stand.runs = 0
        found = rollback._search(stand, stand, planned, list(planned.units), 0.0, whole)
        assert found.passing == passing
        assert found.best[2].relative_error == 0.0 and len(found.best[0]) == passing
        assert found.failed_at[passing + 1].relative_error == 1.0
        assert stand.runs <= 2 * math.floor(math.log2(max(passing, 1))) + 2
        assert stand.runs <= 2 * math.ceil(math.log2(units)) + 2


def test_a_small_plan_runs_only_the_units_the_search_could_not_keep() -> None:
    """40 of 64 units pass: 11 runs find them, where a unit at a time took 41; the 41st
    unit's first attempt is the search's failing prefix, not a run of its own."""
    stand: Any = _Stand(40)
    planned = _planned(64)
    whole = stand.check(list(planned.units))
    stand.runs = 0
    first: Any = (list(planned.units), {}, whole)  # the plan applied whole
    model, outcomes, verification = rollback.apply_verified(stand, stand, planned, 0.0, first)
    statuses = [o.status for o in outcomes]
    assert statuses == ["kept"] * 40 + ["rolled_back"] * 24
    assert verification.relative_error == 0.0 and len(model) == 40
    assert outcomes[40].attempts[0].relative_error == 1.0
    assert stand.runs <= 11 + 23  # the search, then each later unit once

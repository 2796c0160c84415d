"""Nested plans for several budgets at once: the ranks of a gated model's levels.

Each level is planned by the Lagrangian of :mod:`qmpass.plan.budget` at its own budget
(``keep`` of the compressible operators' cost, in weight parameters or a target's
cycles; what its last hull step leaves is spent on milder options, as ``compress``
does), from the largest budget down, with every unit capped by what the level before
it chose, so one stored set of factors serves every level (the rank-``q`` factors are the
first ``q`` directions of the rank-``r`` ones; :mod:`qmpass.algebra.gated`):

* an operator factorised at rank ``r`` may only take ranks ``<= r`` below (it is never
  made dense again);
* a same-input cluster keeps the form it took at the first level that compressed it: a
  shared basis (rank ``<= r`` below) or its members factorised separately (each member a
  unit of its own, capped by its rank).

A budget of 1 leaves every operator dense (the original model, exactly: the Lagrangian
would already take ranks that lose nothing on the calibration statistics, which is not
nothing on other inputs). Unconstrained, the first compressed level is exactly
:func:`~qmpass.plan.make_plan`'s allocation at that budget; the caps can only cost
error at the later levels, which is what a gated model's report measures against
standalone plans (the Lagrangian path is itself nested: a smaller budget walks each
unit's hull further, so the caps bind only where the alignment or a cluster's form
differs). Only low-rank units are
gated: channel pruning would need the kept channels themselves nested and the
compensated consumers stored per level, so the planner is asked for factorised
convolutions, and :func:`~qmpass.compress.gated.compress_gated` passes only the units the
gated rule takes (MatMul/Gemm, :func:`qmpass.algebra.gated.gated_declines`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qmpass.extract import Operator
from qmpass.plan.budget import Option, Unit, allocate
from qmpass.plan.plan import Cost, Plan, Step
from qmpass.plan.resource import Resource
from qmpass.plan.units import Candidate

__all__ = ["GatedUnit", "LevelPlan", "plan_levels"]

LevelStep = tuple[Step, Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class GatedUnit:
    """One gated step: ``operators`` (one, or a shared basis's members in output order)
    and per level its planned step with tensors (None: dense at that level)."""

    operators: tuple[str, ...]
    levels: tuple[LevelStep | None, ...]

    def ranks(self) -> tuple[int | None, ...]:
        return tuple(None if s is None else s[0].rank for s in self.levels)


@dataclass(frozen=True)
class LevelPlan:
    """The budgets, one :class:`~qmpass.plan.Plan` per level (the steps in use there,
    ``kept`` the fraction it spends) and the gated units across levels."""

    budgets: tuple[float, ...]
    plans: tuple[Plan, ...]
    units: tuple[GatedUnit, ...]
    #: per candidate key, the variant the first level that compressed it chose (where
    #: that level took one of the candidate's own variants): where to probe its gain
    chosen: Mapping[str, int] = field(default_factory=dict)

    @property
    def miss(self) -> float:
        """How far the level furthest from its budget keeps from it (as planned)."""
        return max(abs((p.kept or 0.0) - b) for p, b in zip(self.plans, self.budgets,
                                                              strict=True))


@dataclass
class _State:
    """Where a candidate stands after a level: free (dense), or its form and caps."""

    form: str = "free"  # free | single (one operator or one shared basis) | separate
    rank: int | None = None  # single: the rank cap
    members: dict[str, int | None] | None = None  # separate: each member's cap (None: dense)
    fused: tuple[str, ...] | None = None  # single, of a cluster: its shared-basis unit's key


def plan_levels(
    candidates: Sequence[Candidate],
    memo: Mapping[tuple[str, ...], Candidate | None],
    ops: Mapping[str, Operator],
    budgets: Sequence[float],
    resource: Resource,
    base: Plan,
    gains: Mapping[str, float] | None = None,
) -> LevelPlan:
    """The nested plans of ``budgets`` (decreasing) over ``candidates`` (from
    :func:`~qmpass.plan.planner.unit_candidates`, whose ``memo`` holds each cluster's
    shared-basis and member units). ``base`` gives the plans' model, method, baseline
    and declined operators. ``gains`` (by candidate key, 1 where absent) scale each
    candidate's predicted errors, whatever form it takes at a level, as
    :func:`~qmpass.plan.make_plan`'s do: what the model's output feels of them
    (:func:`qmpass.compress.sensitivity.measure_gains`)."""
    names = sorted({n for c in candidates for n in c.operators if n in ops})
    full = resource.operators([ops[n] for n in names])
    states = {c.key: _State() for c in candidates}
    built: dict[tuple[str, int], list[LevelStep]] = {}
    per_level: list[dict[tuple[str, ...], LevelStep]] = []
    plans: list[Plan] = []
    chosen: dict[str, int] = {}
    for budget in budgets:
        units: list[Unit] = []
        sources: dict[str, Candidate] = {}
        for c in candidates:
            gain = (gains or {}).get(c.key, 1.0)
            for key, source, options in _options(c, states[c.key], memo, gain):
                units.append(Unit(key, tuple(options)))
                sources[key] = source
        # a budget of 1 is the model as it is: allocate() would take variants that lose
        # nothing on the calibration data (a rank at the statistics' numerical rank),
        # which is not nothing on other inputs
        choice = ({u.key: u.options[0] for u in units} if budget >= 1.0 else
                  _fill(units, allocate(units, budget * full), budget * full))
        spent = sum(option.cost for option in choice.values())
        steps: dict[tuple[str, ...], LevelStep] = {}
        for key, option in choice.items():
            source = sources[key]
            if option.value == 0:  # unchanged (never an option of a capped unit)
                continue
            if key == source.key:  # a free candidate's own variant
                chosen.setdefault(key, option.value)
            cache = (key, option.value)
            if cache not in built:
                built[cache] = source.variants[option.value].build()
            for step, tensors in built[cache]:
                steps[step.operators] = (step, tensors)
        for c in candidates:
            states[c.key] = _advance(c, states[c.key], steps)
        per_level.append(steps)
        plans.append(Plan(
            model=base.model, method=base.method, budget={"keep": float(budget)},
            baseline=base.baseline, steps=tuple(s for s, _ in steps.values()),
            declined=base.declined, resource=resource.name,
            notes=() if spent <= budget * full + 0.5 else (
                f"level at keep={budget:g} spends {spent / full:.3f} of the compressible "
                f"operators' {resource.name}: "
                + ("the ranks of the level above cap this level's" if plans else
                   "no variant of the units is cheap enough"),),
            kept=spent / full if full else 1.0,
        ))
    keys = sorted({k for steps in per_level for k in steps},
                  key=lambda k: names.index(k[0]) if k[0] in names else len(names))
    gated = tuple(GatedUnit(k, tuple(steps.get(k) for steps in per_level)) for k in keys)
    return LevelPlan(tuple(float(b) for b in budgets), tuple(plans), gated, chosen)


def _fill(units: Sequence[Unit], choice: dict[str, Option], target: float
          ) -> dict[str, Option]:
    """Spend what the Lagrangian's last hull step left of ``target``, as ``compress``
    does (:func:`qmpass.plan.allocation.choose`): while some unit's option with less
    (priced) error fits in what is left, take the one that buys back the most. The
    options are the level's, so the caps of the level above still hold."""
    choice = dict(choice)
    spent = sum(option.cost for option in choice.values())
    while True:
        best: tuple[float, str, Option] | None = None
        for unit in units:
            now = choice[unit.key]
            for option in unit.options:
                gain = now.error - option.error
                if gain > 0 and option.cost > now.cost and \
                        spent + option.cost - now.cost <= target + 0.5 and \
                        (best is None or gain > best[0]):
                    best = (gain, unit.key, option)
        if best is None:
            return choice
        _, key, option = best
        spent += option.cost - choice[key].cost
        choice[key] = option


_CAPPED = "capped:"  # unit keys whose options exclude the unchanged unit


def _options(candidate: Candidate, state: _State,
             memo: Mapping[tuple[str, ...], Candidate | None], gain: float
             ) -> list[tuple[str, Candidate, list[Option]]]:
    """The allocation units ``candidate`` offers at the next level, given ``state``:
    (unit key, the candidate whose variants the options index, the options, their
    errors times ``gain``)."""
    if state.form == "free":
        return [(candidate.key, candidate,
                 _indexed(candidate, range(len(candidate.variants)), gain))]
    if state.form == "single":
        source = candidate if state.fused is None else memo.get(state.fused)
        assert source is not None  # the unit that planned the level above
        allowed = [i for i, v in enumerate(source.variants)
                   if i > 0 and state.rank is not None and 0 <= v.label <= state.rank]
        return [(_CAPPED + candidate.key, source, _indexed(source, allowed, gain))]
    assert state.members is not None
    out = []
    for name, cap in state.members.items():
        member = memo.get((name,))
        if member is None:
            continue
        allowed = [i for i, v in enumerate(member.variants)
                   if cap is None or (i > 0 and v.label <= cap)]
        key = (_CAPPED if cap is not None else "") + f"member:{name}"
        out.append((key, member, _indexed(member, allowed, gain)))
    return out


def _indexed(source: Candidate, indices: Sequence[int] | range, gain: float) -> list[Option]:
    return [Option(i, source.variants[i].cost, source.variants[i].error * gain)
            for i in indices]


def _advance(candidate: Candidate, state: _State,
             steps: Mapping[tuple[str, ...], LevelStep]) -> _State:
    """The state after a level that planned ``steps``."""
    mine = [s for k, s in steps.items() if set(k) & set(candidate.operators)]
    if not mine:
        return state  # free stays free; a capped unit always takes a step
    if state.form == "separate" or (len(mine) > 1 or (
            candidate.key.startswith("cluster:") and mine[0][0].kind == "lowrank")):
        ranks: dict[str, int | None] = dict.fromkeys(candidate.operators)
        for step, _ in mine:
            ranks[step.operators[0]] = step.rank
        return _State("separate", members=ranks)
    step = mine[0][0]
    return _State("single", rank=step.rank, fused=("fused", *step.operators)
                  if candidate.key.startswith("cluster:") else None)


def level_cost(plan: Plan, ops: Mapping[str, Operator]) -> Cost:
    """Parameters and FLOPs of all weight operators at a level: the planned steps' and
    every other operator's as it is."""
    replaced = {n for s in plan.steps for n in s.operators}
    rest = Cost.of(op for name, op in ops.items() if name not in replaced)
    return Cost(rest.params + sum(s.after.params for s in plan.steps),
                rest.flops + sum(s.after.flops for s in plan.steps))

"""Keeping only what verification accepts (see :mod:`qmpass.compress`).

Every planned step is applied to a fresh import of the model, so rolling a step back is
just building the model without it. All steps are tried together first. When the result
breaks the tolerance, the plan's units (an operator, a cluster, a channel group), least
predicted error first, are bisected: in about ``log2(units) + 1`` runs of the model, a
prefix that verifies within the tolerance while one more unit does not (the error is not
exactly monotone in the prefix, so a longer passing prefix may exist). That prefix is
kept. The units past it are then

* on a plan of at most ``BISECT_UNITS`` units, added one at a time on top of it, each
  falling back to milder variants of itself (a higher rank, more channels) and rolled
  back if none passes, with the measured error as the reason: a run of the whole model
  per unit and variant, but only for the units the bisection could not keep;
* on a larger plan, rolled back, each with the error of the shortest failing prefix that
  added it; milder variants are not tried. With a ``local`` measure
  (:mod:`qmpass.verify.local`), the units of such a plan are ordered by their error alone
  measured on the held-out inputs, not by the error predicted on the fitting ones.

:func:`measured_locally` adds each kept step's local error to its outcome.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import onnx

from qmpass.compress.report import Attempt, Outcome
from qmpass.plan import Step
from qmpass.plan.planner import Planned, PlannedUnit
from qmpass.plan.units import Built
from qmpass.rewrite import Applier
from qmpass.verify import Verification, Verifier

__all__ = ["BISECT_UNITS", "Local", "Tried", "apply_all", "apply_verified", "measured_locally"]

#: plans with more units than this are bisected, not taken a unit at a time
BISECT_UNITS = 64

#: a plan applied whole: the model, the steps that declined (by position), its error
Tried = tuple[onnx.ModelProto, dict[int, str], Verification]
#: the local error of each measurable step (by position) of a model built with ``steps``
Local = Callable[[onnx.ModelProto, Sequence[Step]], dict[int, float]]


def apply_all(applier: Applier, verifier: Verifier, planned: Planned) -> Tried:
    """The model with every step of the plan, the steps that declined, and its error."""
    model, declined = applier.build(list(zip(planned.plan.steps, planned.tensors, strict=True)))
    return model, declined, verifier.check(model)


def apply_verified(
    applier: Applier, verifier: Verifier, planned: Planned, tolerance: float, first: Tried,
    local: Local | None = None,
) -> tuple[onnx.ModelProto, list[Outcome], Verification]:
    """Apply the plan, keeping only what verification accepts (see module docstring);
    ``first`` is :func:`apply_all` of the plan; ``local`` orders a large plan's search."""
    everything = list(zip(planned.plan.steps, planned.tensors, strict=True))
    model, declined, verification = first
    if verification.relative_error <= tolerance:
        together = (Attempt(planned.plan.steps, verification.relative_error),)
        return model, [_outcome(step, declined.get(i), together) for i, (step, _) in
                       enumerate(everything)], verification

    # Too much error together: search for a passing prefix of the units (least error
    # first), then, on a plan small enough, take the rest one at a time.
    units = sorted(planned.units, key=lambda u: sum(
        planned.plan.steps[i].predicted_error for i in u.steps))
    order = "predicted error"
    if len(units) > BISECT_UNITS and local is not None:  # each unit alone, held out
        alone = local(model, planned.plan.steps)
        units.sort(key=lambda u: max(alone.get(i, math.sqrt(
            planned.plan.steps[i].predicted_error)) for i in u.steps))
        order = "error alone on the held-out inputs"
    prefix = _search(applier, verifier, planned, units, tolerance, verification)
    if len(units) > BISECT_UNITS:
        return _rolled_back_past(planned, units, prefix, tolerance, order)
    return _one_at_a_time(applier, verifier, planned, units, prefix, tolerance)


@dataclass(frozen=True)
class _Prefix:
    """The outcome of :func:`_search`: the first ``passing`` units verify within the
    tolerance (as ``best``); ``failed_at`` maps the prefix lengths known to fail to their
    verifications (the whole plan's and ``passing + 1`` among them)."""

    passing: int
    best: Tried
    failed_at: dict[int, Verification]


def _steps(planned: Planned, units: Sequence[PlannedUnit]) -> Built:
    return [(planned.plan.steps[i], planned.tensors[i]) for unit in units for i in unit.steps]


def _search(
    applier: Applier, verifier: Verifier, planned: Planned, units: list[PlannedUnit],
    tolerance: float, whole: Verification,
) -> _Prefix:
    """A prefix of ``units`` that verifies within ``tolerance`` while one more unit does
    not; ``whole``, the verification of all of them, failed. A galloping search: prefixes
    of 1, 2, 4, ... units until one fails, then a bisection between the last two, so a
    prefix of ``p`` units costs about ``2 log2(p) + 1`` runs of the model and never more
    than about ``2 log2(len(units)) + 1``."""
    def verified(count: int) -> Tried:
        model, declined = applier.build(_steps(planned, units[:count]))
        return model, declined, verifier.check(model)

    passing, failing = 0, len(units)  # prefix lengths known to pass / to fail
    failed_at = {failing: whole}
    best: Tried | None = None
    galloping = True  # doubling the passing prefix until a prefix fails
    while failing - passing > 1:
        middle = max(1, 2 * passing) if galloping else (passing + failing) // 2
        if middle >= failing:
            galloping = False
            continue
        tried = verified(middle)
        if tried[2].relative_error <= tolerance:
            passing, best = middle, tried
        else:
            failing, galloping = middle, False
            failed_at[middle] = tried[2]
    return _Prefix(passing, best if best is not None else verified(0), failed_at)


def _kept(planned: Planned, units: Sequence[PlannedUnit], prefix: _Prefix) -> list[Outcome]:
    """The outcomes of the steps of the passing prefix, verified together."""
    _, declined, verification = prefix.best
    kept = tuple(step for step, _ in _steps(planned, units[:prefix.passing]))
    together = (Attempt(kept, verification.relative_error),)
    return [_outcome(step, declined.get(i), together) for i, step in enumerate(kept)]


def _rolled_back_past(
    planned: Planned, units: list[PlannedUnit], prefix: _Prefix, tolerance: float,
    order: str,
) -> tuple[onnx.ModelProto, list[Outcome], Verification]:
    """The passing prefix kept and every unit past it rolled back, each with the error of
    the shortest failing prefix that added it (a large plan: no milder variants)."""
    outcomes = _kept(planned, units, prefix)
    passing = prefix.passing
    for rank, unit in enumerate(units[passing:], start=passing + 1):
        first = min(count for count in prefix.failed_at if count >= rank)
        error = prefix.failed_at[first].relative_error
        reason = (f"bisected: the {first} units of least {order} together give a "
                  f"relative output error {error:.4g} over the tolerance {tolerance:g}; "
                  f"the first {passing} pass, and this is unit {rank}")
        outcomes += [Outcome(planned.plan.steps[i], "rolled_back", reason,
                             (Attempt(tuple(s for s, _ in _steps(planned, units[:first])),
                                      error),))
                     for i in unit.steps]
    model, _, verification = prefix.best
    return model, outcomes, verification


def _one_at_a_time(
    applier: Applier, verifier: Verifier, planned: Planned, units: list[PlannedUnit],
    prefix: _Prefix, tolerance: float,
) -> tuple[onnx.ModelProto, list[Outcome], Verification]:
    """The passing prefix kept, then each later unit added on its own, least predicted
    error first, falling back to milder variants of itself and rolled back if none
    passes (the module docstring)."""
    outcomes = _kept(planned, units, prefix)
    model, declined, verification = prefix.best
    accepted: Built = [pair for i, pair in enumerate(_steps(planned, units[:prefix.passing]))
                       if i not in declined]
    for rank, unit in enumerate(units[prefix.passing:], start=prefix.passing + 1):
        plan_steps = _steps(planned, [unit])
        tried: list[Attempt] = []
        failure: str | None = None  # the last variant onnxruntime could not run
        for built in itertools.chain([plan_steps], unit.fallbacks()):
            if built is plan_steps and rank == prefix.passing + 1:
                # the search's failing prefix: this unit as planned on the passing ones
                measured = prefix.failed_at[rank]
                tried.append(Attempt(tuple(step for step, _ in built), measured.relative_error))
                failure = measured.failure
                continue
            candidate, refused_all = applier.build([*accepted, *built])
            refused = {i - len(accepted): why for i, why in refused_all.items()
                       if i >= len(accepted)}
            measured = verifier.check(candidate)
            tried.append(Attempt(tuple(step for step, _ in built), measured.relative_error))
            failure = measured.failure or failure
            if measured.relative_error <= tolerance:
                note = None if len(tried) == 1 else "a milder variant than planned (see attempts)"
                outcomes += [_outcome(step, refused.get(i), tuple(tried), note)
                             for i, (step, _) in enumerate(built)]
                accepted += [pair for i, pair in enumerate(built) if i not in refused]
                model, verification = candidate, measured
                break
        else:
            errors = [a.relative_error for a in tried if not math.isnan(a.relative_error)]
            which = "with this step" if len(tried) == 1 else \
                f"(the least of {len(tried)} variants tried, see attempts)"
            reason = (f"relative output error {min(errors):.4g} {which} exceeds the tolerance "
                      f"{tolerance:g}" if errors else
                      f"the model with this step fails verification: {failure}")
            outcomes += [Outcome(step, "rolled_back", reason, tuple(tried))
                         for step, _ in plan_steps]
    return model, outcomes, verification


def measured_locally(outcomes: Sequence[Outcome], model: onnx.ModelProto, local: Local
                     ) -> list[Outcome]:
    """``outcomes`` with each kept step's local error in ``model`` (where measurable)."""
    kept = [i for i, o in enumerate(outcomes) if o.status == "kept"]
    measured = local(model, [outcomes[i].step for i in kept])
    found = {kept[position]: error for position, error in measured.items()}
    return [replace(o, local_error=found[i]) if i in found else o
            for i, o in enumerate(outcomes)]


def _outcome(step: Step, declined: str | None, attempts: tuple[Attempt, ...],
             note: str | None = None) -> Outcome:
    if declined is not None:
        return Outcome(step, "declined", declined, attempts)
    return Outcome(step, "kept", note, attempts)

"""Keeping only what verification accepts (see :mod:`qmpass.compress`).

Every planned step is applied to a fresh import of the model, so rolling a step back is
just building the model without it. All steps are tried together first. When the result
breaks the tolerance, the plan's units (an operator, a cluster, a channel group) are
added one at a time, least predicted error first; a unit that breaks the tolerance
falls back to milder variants of itself (a higher rank, more channels) and is rolled
back if none passes, with the measured error as the reason.

That costs a run of the whole model per unit and variant: on a large model (more than
``BISECT_UNITS`` units) the units are bisected instead: in about ``log2(units)`` runs, a
prefix of the units, least predicted error first, that verifies within the tolerance
while one more unit does not (the error is not exactly monotone in the prefix, so a
longer passing prefix may exist). The units past it are rolled back, each with the error
of the shortest failing prefix that added it; milder variants are not tried. With a
``local`` measure (:mod:`qmpass.verify.local`), the units are ordered by their error
alone measured on the held-out inputs, not by the error predicted on the fitting ones.

:func:`measured_locally` adds each kept step's local error to its outcome.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

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
    ``first`` is :func:`apply_all` of the plan; ``local`` orders a bisection."""
    everything = list(zip(planned.plan.steps, planned.tensors, strict=True))
    model, declined, verification = first
    if verification.relative_error <= tolerance:
        together = (Attempt(planned.plan.steps, verification.relative_error),)
        return model, [_outcome(step, declined.get(i), together) for i, (step, _) in
                       enumerate(everything)], verification

    # Too much error together: take the units one at a time, least predicted error first.
    # A unit whose variant breaks the tolerance falls back to milder variants of itself;
    # its outcomes (one per planned step) list every variant tried.
    units = sorted(planned.units, key=lambda u: sum(
        planned.plan.steps[i].predicted_error for i in u.steps))
    if len(units) > BISECT_UNITS:
        order = "predicted error"
        if local is not None:  # measured on held-out inputs, each unit alone
            alone = local(model, planned.plan.steps)
            units.sort(key=lambda u: max(alone.get(i, math.sqrt(
                planned.plan.steps[i].predicted_error)) for i in u.steps))
            order = "error alone on the held-out inputs"
        return _bisected(applier, verifier, planned, units, tolerance, verification, order)
    accepted: Built = []
    outcomes: list[Outcome] = []
    model, _ = applier.build([])
    verification = verifier.check(model)
    for unit in units:
        plan_steps = [everything[i] for i in unit.steps]
        tried: list[Attempt] = []
        failure: str | None = None  # the last variant onnxruntime could not run
        for built in itertools.chain([plan_steps], unit.fallbacks()):
            candidate, declined = applier.build([*accepted, *built])
            refused = {i - len(accepted): why for i, why in declined.items()
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


def _bisected(
    applier: Applier, verifier: Verifier, planned: Planned, units: list[PlannedUnit],
    tolerance: float, whole: Verification, order: str,
) -> tuple[onnx.ModelProto, list[Outcome], Verification]:
    """A prefix of ``units`` that verifies within ``tolerance``, by bisection (the module
    docstring); ``whole`` is the verification of all of them, which failed."""
    everything = list(zip(planned.plan.steps, planned.tensors, strict=True))

    def steps_of(count: int) -> Built:
        return [everything[i] for unit in units[:count] for i in unit.steps]

    def verified(count: int) -> Tried:
        model, declined = applier.build(steps_of(count))
        return model, declined, verifier.check(model)

    passing, failing = 0, len(units)  # prefix lengths known to pass / to fail
    best = verified(0)
    failed_at = {failing: whole.relative_error}
    while failing - passing > 1:
        middle = (passing + failing) // 2
        tried = verified(middle)
        if tried[2].relative_error <= tolerance:
            passing, best = middle, tried
        else:
            failing = middle
            failed_at[middle] = tried[2].relative_error
    model, declined, verification = best
    kept = tuple(step for step, _ in steps_of(passing))
    together = (Attempt(kept, verification.relative_error),)
    outcomes = [_outcome(step, declined.get(i), together) for i, step in enumerate(kept)]
    for rank, unit in enumerate(units[passing:], start=passing + 1):
        first = min(count for count in failed_at if count >= rank)
        error = failed_at[first]
        reason = (f"bisected: the {first} units of least {order} together give a "
                  f"relative output error {error:.4g} over the tolerance {tolerance:g}; "
                  f"the first {passing} pass, and this is unit {rank}")
        outcomes += [Outcome(planned.plan.steps[i], "rolled_back", reason,
                             (Attempt(tuple(s for s, _ in steps_of(first)), error),))
                     for i in unit.steps]
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

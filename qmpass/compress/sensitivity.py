"""What the model's output feels of each unit's error: the gains the budget's allocation
prices the units by.

The planner predicts each unit's *own* relative error (the whitened tail energy of its
outputs, :mod:`qmpass.plan.factors`). Summed over units, that treats a unit whose output
is washed out by a residual stream and one whose every error reaches the logits alike.
Here each unit is applied alone, at one probe variant, to the model, which runs on (a
part of) the calibration inputs that fit the plan; the gain is the squared relative
error of the model's outputs per unit of the unit's predicted error,

    g_u = e_out(u at probe)^2 / e_u(probe),

so that ``sum_u g_u e_u`` estimates the squared output error of a plan to first order
(errors of different units adding as if uncorrelated). The Lagrangian then allocates the
budget on those priced errors (:func:`qmpass.plan.planner.make_plan`'s ``gains``).

The cost is one onnxruntime run of the model per unit, on at most ``PROBE_SAMPLES``
samples: linear in the number of units times the model, measured in the report
(``seconds.sensitivity``). That is quadratic in depth: on a 1.1B-parameter decoder, 154
units of about 25 s each. With a ``limit``, the probes stop as soon as the time measured
so far, extrapolated over the units left, passes it (:class:`ProbesTooSlow`), and
``compress`` prices by layer instead (``--pricing auto``, the default, says so in the
report; ``--pricing output`` has no limit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from qmpass.plan.budget import lower_hull
from qmpass.plan.units import Candidate
from qmpass.rewrite import Applier
from qmpass.verify import Verifier

__all__ = ["PROBE_ERROR", "PROBE_SAMPLES", "PROBE_SECONDS", "Gain", "ProbesTooSlow",
           "measure_gains"]

#: the predicted relative error of the variant each unit is probed at (or the nearest)
PROBE_ERROR = 0.05
#: calibration samples the probes run on, at most (a seeded subsample of the fit part)
PROBE_SAMPLES = 32
#: seconds the probes of ``--pricing auto`` may be projected to take, at most
PROBE_SECONDS = 600.0
#: the gain of a unit whose probe onnxruntime cannot run: never worth compressing
_UNRUNNABLE = 1e6


@dataclass(frozen=True)
class Gain:
    """One unit's measured gain: at the probe variant ``label``, the unit's predicted
    error and the model's measured output error."""

    unit: str
    label: int
    predicted: float
    output_error: float

    def to_dict(self) -> dict[str, float | int | str | None]:
        """The report's row (``output_error`` None where onnxruntime could not run it)."""
        measured = None if math.isnan(self.output_error) else self.output_error
        return {"unit": self.unit, "probe": self.label, "predicted_error": self.predicted,
                "output_error": measured, "gain": self.value}

    @property
    def value(self) -> float:
        if math.isnan(self.output_error):
            return _UNRUNNABLE
        return self.output_error**2 / self.predicted


class ProbesTooSlow(Exception):
    """The probes were stopped: ``projected`` seconds for all ``units`` (``done`` run)."""

    def __init__(self, done: int, units: int, projected: float) -> None:
        super().__init__(f"{done} of {units} probes run, all projected to take "
                         f"{projected:.0f} s")
        self.done, self.units, self.projected = done, units, projected


def measure_gains(
    model: onnx.ModelProto,
    applier: Applier,
    candidates: Iterable[Candidate],
    feeds: Mapping[str, np.ndarray],
    samples: int,
    seed: int = 0,
    at: Mapping[str, int] | None = None,
    limit: float | None = None,
) -> dict[str, Gain]:
    """The gain of every candidate unit (by key) whose probe variant has a predicted
    error above zero, measured on at most ``PROBE_SAMPLES`` of ``feeds``'s ``samples``.
    Raises :class:`ProbesTooSlow` once the probes are projected past ``limit`` seconds
    (None: no limit)."""
    started = time.perf_counter()
    verifier = Verifier(model, _subsample(feeds, samples, seed))
    gains: dict[str, Gain] = {}
    candidates = list(candidates)
    for done, candidate in enumerate(candidates):
        if limit is not None and done:
            projected = (time.perf_counter() - started) / done * len(candidates)
            if projected > limit:
                raise ProbesTooSlow(done, len(candidates), projected)
        if candidate.key in gains:
            continue
        probe = (at or {}).get(candidate.key)
        if not probe or candidate.variants[probe].error <= 0:
            probe = _probe(candidate)
        if probe is None:
            continue
        variant = candidate.variants[probe]
        rewritten, declined = applier.build(variant.build())
        if declined:
            continue  # a step the rewrite refuses: the planner's prices stay
        measured = verifier.check(rewritten)
        gains[candidate.key] = Gain(candidate.key, variant.label, variant.error,
                                    measured.relative_error)
    return gains


def _probe(candidate: Candidate) -> int | None:
    """The variant on the unit's lower hull whose predicted error is the least at or
    above ``PROBE_ERROR`` (the most lossy one if none reaches it); None if none loses."""
    hull = [o for o in lower_hull(candidate.unit.options) if o.value != 0 and o.error > 0]
    if not hull:
        return None
    above = [o for o in hull if o.error >= PROBE_ERROR]
    return (min(above, key=lambda o: o.error) if above else max(hull, key=lambda o: o.error)
            ).value


def _subsample(feeds: Mapping[str, np.ndarray], samples: int, seed: int
               ) -> dict[str, np.ndarray]:
    if samples <= PROBE_SAMPLES:
        return dict(feeds)
    rows = np.sort(np.random.default_rng(seed).choice(samples, PROBE_SAMPLES, replace=False))
    return {name: value[rows] for name, value in feeds.items()}

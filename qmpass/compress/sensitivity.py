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
(``seconds.sensitivity``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from qmpass.plan.budget import lower_hull
from qmpass.plan.units import Candidate
from qmpass.rewrite import Applier
from qmpass.verify import Verifier

__all__ = ["PROBE_ERROR", "PROBE_SAMPLES", "Gain", "measure_gains"]

#: the predicted relative error of the variant each unit is probed at (or the nearest)
PROBE_ERROR = 0.05
#: calibration samples the probes run on, at most (a seeded subsample of the fit part)
PROBE_SAMPLES = 32
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


def measure_gains(
    model: onnx.ModelProto,
    applier: Applier,
    candidates: Iterable[Candidate],
    feeds: Mapping[str, np.ndarray],
    samples: int,
    seed: int = 0,
    at: Mapping[str, int] | None = None,
) -> dict[str, Gain]:
    """The gain of every candidate unit (by key) whose probe variant has a predicted
    error above zero, measured on at most ``PROBE_SAMPLES`` of ``feeds``'s ``samples``."""
    verifier = Verifier(model, _subsample(feeds, samples, seed))
    gains: dict[str, Gain] = {}
    for candidate in candidates:
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

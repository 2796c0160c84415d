r"""The ``compress`` report: one :class:`Outcome` per planned step, its :class:`Attempt`\ s,
and the :class:`Report` whose :meth:`~Report.to_dict` is the JSON ``--report`` writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from qmpass.compress.sensitivity import Gain
from qmpass.extract import Extraction
from qmpass.plan import Plan, Step
from qmpass.verify import Verification

__all__ = ["Attempt", "Outcome", "Report", "model_params", "operator_flops", "operator_params"]


@dataclass(frozen=True)
class Attempt:
    """One verification of a unit of the plan: the steps of the variant tried (the
    planned one first, then milder ones) and the model's measured relative output error
    with them and the steps accepted before."""

    steps: tuple[Step, ...]
    relative_error: float


@dataclass(frozen=True)
class Outcome:
    """What happened to one planned step: ``kept``, ``rolled_back`` or ``declined``.

    ``step`` is the step as planned, or, kept as a milder variant, as applied (a higher
    rank, more channels); ``attempts`` are the verifications of its unit, in order (one
    when everything passed together: that run's error). A unit kept as a milder variant
    of another shape (a cluster's members factorised separately instead of a shared
    basis) has one outcome per step applied.
    """

    step: Step
    status: Literal["kept", "rolled_back", "declined"]
    reason: str | None = None
    attempts: tuple[Attempt, ...] = ()
    #: a kept step's error alone on the held-out inputs (:mod:`qmpass.verify.local`)
    local_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        step = self.step
        out: dict[str, Any] = {
            "kind": step.kind,
            "operators": list(step.operators),
            "rank": step.rank,
            "certificate": step.certificate,
            "predicted_error": step.predicted_error,
            "params_before": step.before.params,
            "params_after": step.after.params,
            "flops_before": step.before.flops,
            "flops_after": step.after.flops,
            "status": self.status,
        }
        if step.kind == "prune_channels":
            out.update(group=step.group, channels=step.channels, kept_channels=len(step.kept or ()))
        if self.reason:
            out["reason"] = self.reason
        if self.local_error is not None:
            out["local_error"] = self.local_error
        out["attempts"] = [_attempt_dict(step, attempt) for attempt in self.attempts]
        return out


def _shared_status(bases: tuple[dict[str, Any], ...], outcomes: tuple[Outcome, ...]
                   ) -> list[dict[str, Any]]:
    """The plan's cross-layer groups, a ``shared`` one with its step's verified status
    (``rolled_back``/``declined`` when verification or the rewriter refused it,
    ``not_kept`` when its unit was kept as a milder variant of another shape)."""
    out = []
    for row in bases:
        row = dict(row)
        if row.get("status") == "shared":
            found = next((o for o in outcomes if o.step.kind == "crosslayer_basis"
                          and set(o.step.operators) == set(row["operators"])), None)
            if found is None or found.status != "kept":
                row["status"] = found.status if found is not None else "not_kept"
                row["reason"] = found.reason if found is not None else \
                    "verification kept a milder variant of its unit"
        out.append(row)
    return out


def _attempt_dict(row: Step, attempt: Attempt) -> dict[str, Any]:
    """An attempt as the row of ``row`` shows it: the size tried for these operators
    (a rank, or kept channels), or the whole variant when it has another shape."""
    same = [s for s in attempt.steps if s.operators == row.operators]
    if len(same) == 1:
        return {**_size(same[0]), "relative_error": attempt.relative_error}
    return {"variant": [{"operators": list(s.operators), **_size(s)} for s in attempt.steps],
            "relative_error": attempt.relative_error}


def _size(step: Step) -> dict[str, Any]:
    if step.kind == "prune_channels":
        return {"kind": step.kind, "kept_channels": len(step.kept or ())}
    return {"kind": step.kind, "rank": step.rank}


@dataclass(frozen=True)
class Report:
    """The ``compress`` report (docs/DESIGN.md, "Interfaces"); :meth:`to_dict` is its JSON.

    ``verification`` is measured on the held-out calibration inputs (the tolerance
    applies to it), ``fit_verification`` on those the plan was fitted to."""

    model: str
    plan: Plan
    outcomes: tuple[Outcome, ...]
    verification: Verification
    params: tuple[int, int]
    flops: tuple[int, int]
    operator_params: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)
    cycles: tuple[int, int, int] | None = None  # before, after, at this batch
    ir_version: tuple[int, int] = (0, 0)  # of the input and of the output
    fit_verification: Verification | None = None  # on the inputs the plan was fitted to
    samples: tuple[int, int] = (0, 0)  # calibration samples that fitted, that verified
    notes: tuple[str, ...] = ()  # what the user should know (also printed on stderr)
    mode: str = "rollback"  # how the budget was met (CompressConfig.mode)
    gains: tuple[Gain, ...] = ()  # what the output felt of each unit (output pricing)

    @property
    def kept(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "kept")

    def to_dict(self) -> dict[str, Any]:
        baseline = self.plan.baseline.params
        # measured: operators outside the plan's reach are unchanged, so what is left of
        # the compressible ones is the measured total minus those
        outside = self.operator_params[0] - baseline
        return {
            "model": self.model,
            "method": self.plan.method,
            "budget": self.plan.budget,
            "params_before": self.params[0],
            "params_after": self.params[1],
            "flops_before": self.flops[0],
            "flops_after": self.flops[1],
            "operator_params_before": self.operator_params[0],
            "operator_params_after": self.operator_params[1],
            "compressible_params": baseline,
            "keep_achieved": (self.operator_params[1] - outside) / baseline if baseline else 1.0,
            "rewrites": [o.to_dict() for o in self.outcomes],
            "declined_operators": [
                {"operator": name, "reason": reason} for name, reason in self.plan.declined
            ],
            "budget_mode": self.mode,
            "verification": self.verification.to_dict(),
            "verification_fit": None if self.fit_verification is None else
            self.fit_verification.to_dict(),
            "calibration_samples": {"fit": self.samples[0], "held_out": self.samples[1]},
            "notes": [*self.plan.notes, *self.notes],
            "shared_bases": _shared_status(self.plan.shared_bases, self.outcomes),
            "alternatives": self.alternatives,
            "conv_alternatives": {k: v for k, v in self.alternatives.items()
                                  if not k.endswith("+refit")},
            "pricing": "output" if self.gains else "layer",
            "gains": [gain.to_dict() for gain in self.gains],
            "seconds": self.seconds,
            "ir_version": {"input": self.ir_version[0], "output": self.ir_version[1]},
            **({} if self.cycles is None else {"target": {
                "name": self.plan.resource.removeprefix("cycles:"),
                "cycles_before": self.cycles[0],
                "cycles_after": self.cycles[1],
                "batch": self.cycles[2],
            }}),
        }


def operator_params(extraction: Extraction) -> int:
    """Weight-operator parameters; a MatMul/Gemm weight stored once and read by several
    operators (a cross-layer shared basis) counts once."""
    seen: set[str] = set()
    total = 0
    for op in extraction.operators:
        total += op.params
        if op.weight_name in seen and op.op_type in ("MatMul", "Gemm"):
            total -= int(op.weight.size)
        seen.add(op.weight_name)
    return total


def operator_flops(extraction: Extraction) -> int:
    return sum(op.flops for op in extraction.operators)


def model_params(model: onnx.ModelProto) -> int:
    """Every value the model stores in floating-point initializers and Constant nodes."""
    tensors = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in _FLOAT_TYPES)

_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)

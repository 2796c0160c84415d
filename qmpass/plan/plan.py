"""The Plan: the one interface between analysis and every backend (docs/DESIGN.md).

A plan is a list of :class:`Step` records, each a decision: which rewrite, on which
operators, at which rank or with which kept channels, what error it is predicted to
cost and what it saves. It round-trips through JSON. The new weights a step needs
(low-rank factors, compensated consumer weights) are *not* decisions; they are computed
from the model, the step and the calibration statistics by :mod:`qmpass.plan.factors`,
so every backend derives the same arrays from the same plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from qmpass.extract import Operator

__all__ = ["Cost", "Plan", "Step", "StepKind"]

StepKind = Literal["lowrank", "shared_basis", "prune_channels", "crosslayer_basis"]


@dataclass(frozen=True)
class Cost:
    """Weight parameters and FLOPs per sample of the operators a step touches."""

    params: int
    flops: int

    @classmethod
    def of(cls, operators: Iterable[Operator]) -> Cost:
        """The operators' parameters and FLOPs as extraction counted them."""
        ops = list(operators)
        return cls(sum(op.params for op in ops), sum(op.flops for op in ops))


@dataclass(frozen=True)
class Step:
    """One planned rewrite.

    ``operators`` are Operator names (node names after
    :func:`qmpass.rewrite.base.name_nodes`).
    For ``lowrank`` it is one operator and ``rank`` the inner width q; for
    ``shared_basis`` the members reading one tensor, in output order, and ``rank`` the
    width of the shared basis; for ``prune_channels`` the channel group named by
    ``group`` (producers first, then consumers), ``channels`` its width and ``kept`` the
    channel indices that stay; for ``crosslayer_basis`` members reading two or more
    different tensors of one width, sharing one input-side basis of width ``rank``
    (:mod:`qmpass.plan.units.crosslayer`). ``predicted_error`` is the relative output error the
    planner expects (energy lost, or calibration error when data-aware);
    ``certificate`` holds the terms of the sound bound ``R ||W - W'||_op + ||b - b'||`` on
    the change of one output vector: ``op_norm`` and ``bias_change`` always, ``radius``
    (``R``, the longest input seen in calibration) and ``bound`` with calibration data.
    The planner computes them from the new weights (:mod:`qmpass.plan.units`, with
    :func:`qmpass.spectral.operator_norm`, which never underestimates).
    """

    kind: StepKind
    operators: tuple[str, ...]
    before: Cost
    after: Cost
    predicted_error: float
    rank: int | None = None
    group: str | None = None
    channels: int | None = None
    kept: tuple[int, ...] | None = None
    certificate: dict[str, float] = field(default_factory=dict)
    data_aware: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["operators"] = list(self.operators)
        if self.kept is not None:
            out["kept"] = list(self.kept)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["operators"] = tuple(values["operators"])
        values["before"] = Cost(**values["before"])
        values["after"] = Cost(**values["after"])
        if values.get("kept") is not None:
            values["kept"] = tuple(values["kept"])
        values["certificate"] = dict(values.get("certificate") or {})
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """Steps plus how they were chosen (``method``, budget) and the totals they imply.

    ``budget`` is ``{"keep": F}`` or ``{"delta": D}``; ``baseline`` is the cost of all the
    operators the method could compress; ``resource`` what ``keep`` is a fraction of
    (``params``, or ``cycles:<target>``: see :mod:`qmpass.plan.resource`). ``notes``:
    sentences about what the planner could not promise (a ``keep`` budget it may miss).
    ``kept``: with a ``keep`` budget, the fraction of the baseline's resource the chosen
    variants keep, as the planner counts it (what the rewritten model measures, to the
    rounding of shared channel groups).
    """

    model: str
    method: str
    budget: dict[str, float]
    baseline: Cost
    steps: tuple[Step, ...]
    declined: tuple[tuple[str, str], ...] = ()
    resource: str = "params"
    notes: tuple[str, ...] = ()
    kept: float | None = None
    #: the QM-FRG clusters proposed as cross-layer shared bases and what was measured
    #: (:func:`qmpass.plan.units.crosslayer.crosslayer_outcomes`)
    shared_bases: tuple[dict[str, Any], ...] = ()

    @property
    def params_saved(self) -> int:
        return sum(s.before.params - s.after.params for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "budget": dict(self.budget),
            "baseline": asdict(self.baseline),
            "steps": [s.to_dict() for s in self.steps],
            "declined": [{"operator": o, "reason": r} for o, r in self.declined],
            "resource": self.resource,
            "notes": list(self.notes),
            "kept": self.kept,
            "shared_bases": [dict(b) for b in self.shared_bases],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            model=data["model"],
            method=data["method"],
            budget=dict(data["budget"]),
            baseline=Cost(**data["baseline"]),
            steps=tuple(Step.from_dict(s) for s in data["steps"]),
            declined=tuple((d["operator"], d["reason"]) for d in data.get("declined", ())),
            resource=data.get("resource", "params"),
            notes=tuple(data.get("notes", ())),
            kept=data.get("kept"),
            shared_bases=tuple(dict(b) for b in data.get("shared_bases", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

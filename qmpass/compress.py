"""``compress``: analyse -> plan -> rewrite -> verify, keeping only verified rewrites.

Every planned step is applied to a fresh import of the model, so rolling a step back is
just building the model without it. All steps are tried together first. When the result
breaks ``tolerance``, the plan's units (an operator, a cluster, a channel group) are
added one at a time, least predicted error first; a unit that breaks the tolerance
falls back to milder variants of itself (a higher rank, more channels) and is rolled
back if none passes, with the measured error as the reason.

With calibration data, ``qmfrg`` can treat convolutions two ways (prune their channel
groups, or factorise them); both plans are built and verified. If both pass, the one with
the smaller error is kept; if the tolerance forces rollbacks, the one that ends with the
smaller model (``CompressConfig.convs``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from hw_targets import TARGET_NAMES
from qmpass.errors import QmpassInputError
from qmpass.extract import Extraction, extract_operators
from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.extract.shapes import infer_shapes
from qmpass.modelio import ModelLike, caller_form, load_model, stored_values
from qmpass.plan import Plan, Step
from qmpass.plan.planner import (
    METHODS,
    Method,
    PlanConfig,
    Planned,
    make_plan,
    stats_requests,
)
from qmpass.plan.resource import PARAMS, Cycles, Resource
from qmpass.plan.units import Built, Candidate
from qmpass.rewrite import Applier
from qmpass.rewrite.base import name_nodes
from qmpass.verify import (
    StatsRequest,
    TensorStats,
    Verification,
    Verifier,
    check_feeds,
    collect_stats,
    synthesize_inputs,
)

__all__ = ["Attempt", "CompressConfig", "Outcome", "Report", "calibration_stats", "compress"]

#: vectors per calibration statistic, at most (about): the fixtures stay below it
CALIBRATION_VECTORS = 50_000
_PROTOBUF_LIMIT = 2**31 - 1  # bytes of one protobuf message


@dataclass(frozen=True)
class CompressConfig:
    """Knobs of :func:`compress` (the CLI flags of ``qmpass compress``).

    Without ``keep`` and ``delta`` the pass keeps what ``delta = 0.05`` allows.
    ``calib`` feeds (keyed by graph input name) make the plan data-aware and are the
    verification inputs; without them ``samples`` inputs are synthesised. ``align``:
    ranks and kept channel counts are multiples of it (see ``PlanConfig``). ``convs``:
    with calibration data, ``qmfrg`` can prune the channel groups of convolutions or
    factorise the convolutions; ``auto`` plans both and keeps the better (see the module
    docstring).
    """

    method: Method = "qmfrg"
    keep: float | None = None
    delta: float | None = None
    tolerance: float = 0.05
    calib: Mapping[str, np.ndarray] | None = None
    samples: int = 64
    seed: int = 0
    align: int = 8
    convs: Literal["auto", "prune", "factorise"] = "auto"
    target: str | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise QmpassInputError(f"--batch must be at least 1, got {self.batch}.")
        if self.target is not None and self.target not in TARGET_NAMES:
            raise QmpassInputError(
                f"unknown target '{self.target}'; choose one of {', '.join(TARGET_NAMES)}."
            )
        if self.method not in METHODS:
            raise QmpassInputError(
                f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}."
            )
        if self.keep is not None and self.delta is not None:
            raise QmpassInputError("give --keep or --delta, not both.")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise QmpassInputError(f"--keep must be in (0, 1], got {self.keep}.")
        if self.delta is not None and not self.delta >= 0.0:
            raise QmpassInputError(f"--delta must be non-negative, got {self.delta}.")
        if self.convs not in ("auto", "prune", "factorise"):
            raise QmpassInputError(
                f"unknown conv treatment '{self.convs}'; choose auto, prune or factorise."
            )
        if self.align < 1:
            raise QmpassInputError(f"--align must be a positive integer, got {self.align}.")
        if not self.tolerance >= 0.0:
            raise QmpassInputError(f"--tolerance must be non-negative, got {self.tolerance}.")

    def conv_choices(self) -> tuple[Literal["prune", "factorise"], ...]:
        """The treatments of convolutions to plan (both only where they can differ)."""
        if self.convs != "auto":
            return (self.convs,)
        if self.method == "qmfrg" and self.calib is not None:
            return ("prune", "factorise")
        return ("prune",)

    def plan_config(
        self, convs: Literal["prune", "factorise"] = "prune", resource: Resource = PARAMS
    ) -> PlanConfig:
        delta = 0.05 if self.keep is None and self.delta is None else self.delta
        return PlanConfig(
            self.method, keep=self.keep, delta=delta, seed=self.seed, align=self.align,
            convs=convs, resource=resource,
        )


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
        out["attempts"] = [_attempt_dict(step, attempt) for attempt in self.attempts]
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
    """The ``compress`` report (docs/DESIGN.md, "Interfaces"); :meth:`to_dict` is its JSON."""

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
            "verification": self.verification.to_dict(),
            "notes": list(self.plan.notes),
            "conv_alternatives": self.alternatives,
            "seconds": self.seconds,
            "ir_version": {"input": self.ir_version[0], "output": self.ir_version[1]},
            **({} if self.cycles is None else {"target": {
                "name": self.plan.resource.removeprefix("cycles:"),
                "cycles_before": self.cycles[0],
                "cycles_after": self.cycles[1],
                "batch": self.cycles[2],
            }}),
        }


def calibration_stats(
    model: onnx.ModelProto,
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    method: Method,
    feeds: Mapping[str, np.ndarray],
) -> dict[str, TensorStats]:
    """The calibration statistics a data-aware plan of ``method`` reads
    (:func:`qmpass.plan.planner.stats_requests`), measured on ``feeds``. Each request
    takes at most about ``CALIBRATION_VECTORS`` vectors (a seeded random subsample): a
    3x3 convolution over 56x56 images gives 200,000 receptive fields per 64 samples,
    far more than its covariance needs."""
    ops = {op.name: op for op in extraction.operators}
    requests = {
        key: StatsRequest(want.tensor, want.kind, want.axis,
                          ops[want.operator].geometry if want.operator else None)
        for key, want in stats_requests(extraction, groups, method).items()
    }
    if not requests:
        return {}
    return collect_stats(model, feeds, requests, max_vectors=CALIBRATION_VECTORS)


def compress(
    model: ModelLike, config: CompressConfig = CompressConfig()
) -> tuple[onnx.ModelProto, Report]:
    """Compress ``model`` (a path or ModelProto, not modified) as ``config`` says."""
    seconds: dict[str, float] = {}
    timer = time.perf_counter()
    loaded = load_model(model)
    if loaded.proto.ByteSize() >= _PROTOBUF_LIMIT:
        raise QmpassInputError(
            "the model is 2 GB or larger; protobuf cannot hold it in one message, and "
            "compress does not support such models yet."
        )
    original = name_nodes(caller_form(loaded.proto))
    extraction = extract_operators(original, loaded.external)
    groups = channel_groups(original)
    seconds["analyse"] = time.perf_counter() - timer

    timer = time.perf_counter()
    feeds = check_feeds(config.calib, original) if config.calib is not None else synthesize_inputs(
        original, count=config.samples, seed=config.seed
    )
    verifier = Verifier(original, feeds)  # first: refuses a model onnxruntime cannot run
    stats = (
        calibration_stats(original, extraction, groups, config.method, feeds)
        if config.calib is not None else None
    )
    seconds["calibrate"] = time.perf_counter() - timer

    timer = time.perf_counter()
    values = stored_values(original)
    choices = config.conv_choices()
    resource = PARAMS if config.target is None else Cycles(
        config.target, infer_shapes(original), config.batch)
    memo: dict[tuple[str, ...], Candidate | None] = {}  # low-rank units, shared by both
    candidates = [
        make_plan(extraction, groups, values, stats, config.plan_config(convs, resource),
                  loaded.name, memo)
        for convs in choices
    ]
    seconds["plan"] = time.perf_counter() - timer

    timer = time.perf_counter()
    applier = Applier(original, extraction, groups)
    if len(candidates) > 1 and candidates[0].plan == candidates[1].plan:
        candidates = candidates[:1]  # both treatments planned the same: verify it once
    tried = [_apply_all(applier, verifier, planned) for planned in candidates]
    alternatives: dict[str, float] = {}
    if len(tried) > 1:  # what each treatment of the convolutions verified at
        alternatives = {c: t[2].relative_error for c, t in zip(choices, tried, strict=True)}
    within = [i for i, t in enumerate(tried) if t[2].relative_error <= config.tolerance]
    if within:  # all steps pass: the same budget, so the smaller error wins
        best = min(within, key=lambda i: tried[i][2].relative_error)
        results = {best: _apply_verified(applier, verifier, candidates[best],
                                         config.tolerance, tried[best])}
    else:  # the tolerance forces rollbacks: the treatment that ends smaller wins
        results = {i: _apply_verified(applier, verifier, candidates[i], config.tolerance,
                                      tried[i]) for i in range(len(candidates))}
        best = min(results, key=lambda i: (_model_params(results[i][0]),
                                           results[i][2].relative_error))
    plan = candidates[best].plan
    result, outcomes, verification = results[best]
    seconds["rewrite_and_verify"] = time.perf_counter() - timer

    after = extract_operators(result)
    report = Report(
        model=plan.model,
        plan=plan,
        outcomes=tuple(outcomes),
        verification=verification,
        params=(_model_params(original), _model_params(result)),
        flops=(_flops(extraction), _flops(after)),
        operator_params=(_params(extraction), _params(after)),
        seconds=seconds,
        alternatives=alternatives,
        ir_version=(loaded.proto.ir_version, result.ir_version),
        cycles=None if not isinstance(resource, Cycles) else (
            round(resource.operators(extraction.operators)),
            round(Cycles(resource.target.name, infer_shapes(result), resource.batch)
                  .operators(after.operators)),
            resource.batch,
        ),
    )
    return result, report


_Attempt = tuple[onnx.ModelProto, dict[int, str], Verification]


def _apply_all(applier: Applier, verifier: Verifier, planned: Planned) -> _Attempt:
    """The model with every step of the plan, the steps that declined, and its error."""
    model, declined = applier.build(list(zip(planned.plan.steps, planned.tensors, strict=True)))
    return model, declined, verifier.check(model)


def _apply_verified(
    applier: Applier, verifier: Verifier, planned: Planned, tolerance: float, first: _Attempt
) -> tuple[onnx.ModelProto, list[Outcome], Verification]:
    """Apply the plan, keeping only what verification accepts (see module docstring);
    ``first`` is :func:`_apply_all` of the plan."""
    everything = list(zip(planned.plan.steps, planned.tensors, strict=True))
    model, declined, verification = first
    if verification.relative_error <= tolerance:
        together = (Attempt(planned.plan.steps, verification.relative_error),)
        return model, [_outcome(step, declined.get(i), together) for i, (step, _) in
                       enumerate(everything)], verification

    # Too much error together: take the units one at a time, least predicted error first.
    # A unit whose variant breaks the tolerance falls back to milder variants of itself;
    # its outcomes (one per planned step) list every variant tried.
    accepted: Built = []
    outcomes: list[Outcome] = []
    model, _ = applier.build([])
    verification = verifier.check(model)
    units = sorted(planned.units, key=lambda u: sum(
        planned.plan.steps[i].predicted_error for i in u.steps))
    for unit in units:
        plan_steps = [everything[i] for i in unit.steps]
        tried: list[Attempt] = []
        for built in itertools.chain([plan_steps], unit.fallbacks()):
            candidate, declined = applier.build([*accepted, *built])
            refused = {i - len(accepted): why for i, why in declined.items()
                       if i >= len(accepted)}
            measured = verifier.check(candidate)
            tried.append(Attempt(tuple(step for step, _ in built), measured.relative_error))
            if measured.relative_error <= tolerance:
                note = None if len(tried) == 1 else "a milder variant than planned (see attempts)"
                outcomes += [_outcome(step, refused.get(i), tuple(tried), note)
                             for i, (step, _) in enumerate(built)]
                accepted += [pair for i, pair in enumerate(built) if i not in refused]
                model, verification = candidate, measured
                break
        else:
            least = min(a.relative_error for a in tried)
            which = "with this step" if len(tried) == 1 else \
                f"(the least of {len(tried)} variants tried, see attempts)"
            outcomes += [
                Outcome(step, "rolled_back",
                        f"relative output error {least:.4g} {which} exceeds the tolerance "
                        f"{tolerance:g}", tuple(tried))
                for step, _ in plan_steps
            ]
    return model, outcomes, verification


def _outcome(step: Step, declined: str | None, attempts: tuple[Attempt, ...],
             note: str | None = None) -> Outcome:
    if declined is not None:
        return Outcome(step, "declined", declined, attempts)
    return Outcome(step, "kept", note, attempts)




def _params(extraction: Extraction) -> int:
    return sum(op.params for op in extraction.operators)


def _flops(extraction: Extraction) -> int:
    return sum(op.flops for op in extraction.operators)


def _model_params(model: onnx.ModelProto) -> int:
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

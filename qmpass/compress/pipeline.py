"""``compress``: load -> split the calibration inputs -> plan -> rewrite -> verify on the
held-out part, as :class:`~qmpass.compress.config.CompressConfig` asks for the budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Literal

import onnx

from qmpass import extdata, heap
from qmpass.compress.calibration import Split, calibration_stats, split_feeds
from qmpass.compress.config import CompressConfig
from qmpass.compress.report import (
    Report,
    model_params,
    operator_flops,
    operator_params,
)
from qmpass.compress.rollback import Local, Tried, apply_all, apply_verified, measured_locally
from qmpass.compress.sensitivity import PROBE_SECONDS, Gain, ProbesTooSlow, measure_gains
from qmpass.errors import QmpassInputError
from qmpass.extdata import data_folder, embedded, embedded_bytes, external_tensors, in_scratch
from qmpass.extract import extract_operators
from qmpass.extract.channels import channel_groups
from qmpass.extract.shapes import infer_shapes
from qmpass.modelio import LoadedModel, ModelLike, load_model, stored_values
from qmpass.parallel import Executor, model_file
from qmpass.plan import Step, factors
from qmpass.plan.planner import Planned, make_plan
from qmpass.plan.resource import PARAMS, Cycles
from qmpass.plan.sequential import refit
from qmpass.plan.units import Candidate
from qmpass.plan.units.crosslayer import crosslayer_verified
from qmpass.rewrite import Applier
from qmpass.rewrite.base import working_form
from qmpass.rewrite.gated_lowrank import refuse_gated
from qmpass.scratch import Scratch, anchor, scratch_file
from qmpass.verify import Verifier, check_feeds, synthesize_inputs
from qmpass.verify.compare import sample_count
from qmpass.verify.local import boundaries, local_errors

__all__ = ["BUDGET_SLACK", "SEARCH_STEPS", "compress"]

#: a plan and what tells it from the other plans of one budget (``alternatives``)
Alternative = tuple[str, Planned]
#: how far below --keep the kept fraction may end before the report says so
BUDGET_SLACK = 0.03
#: bisection steps of the search over --keep when only --tolerance is given
SEARCH_STEPS = 7
_PLAIN = " without cross-layer bases"  # the label of a plan verified beside a cross-layer one
_SYNTHESISED = ("no --calib: the rewrites were verified on synthesised inputs, which "
                "shows only that the model runs and keeps its shapes, not that it keeps "
                "its accuracy; give calibration inputs to measure that")


def compress(
    model: ModelLike, config: CompressConfig | None = None, *, keep_external: bool = False
) -> tuple[onnx.ModelProto, Report]:
    """Compress ``model`` (a path or ModelProto, not modified) as ``config`` says (the
    defaults of :class:`CompressConfig` when None).

    Weights in external data files are read from them a tensor at a time. The returned
    model holds them whole when it stays under 2 GB (``keep_external`` False); with
    ``keep_external``, or past 2 GB, it refers to the input's files instead (write it with
    :func:`qmpass.extdata.model_payloads`, which copies them into the output's own)."""
    config = CompressConfig() if config is None else config
    if config.budgets is not None:
        raise QmpassInputError("CompressConfig(budgets=...) makes a gated model: call "
                               "qmpass.compress.compress_gated.")
    timer = time.perf_counter()
    loaded = load_model(model, spill=True)  # a large proto's weights: to a scratch file
    refuse_gated(loaded.proto, "compress")
    with Executor(config.jobs, config.scheduler) as executor, data_folder(loaded.folder), \
            _scratch(loaded) as scratch:
        result, report = _compress(loaded, config, executor, timer)
        # weights moved out at load come back in: the output holds them as the input did
        result = result if keep_external and loaded.spilled is None else embedded(result)
        if loaded.spilled is not None:  # unchanged weights it still refers to (past 1 GB)
            anchor(result, loaded.spilled)
        if scratch is not None:  # new weights the returned model refers to stay
            scratch.kept = any(in_scratch(t) for t in result.graph.initializer)
        return result, report


def _scratch(loaded: LoadedModel) -> AbstractContextManager[Scratch | None]:
    """A scratch file for the rewrites' new weights (:mod:`qmpass.scratch`) when the model
    is large: it has external data, or its weights pass ``SCRATCH_MODEL_BYTES``."""
    if external_tensors(loaded.proto) or embedded_bytes(loaded.proto) >= SCRATCH_MODEL_BYTES:
        return scratch_file()
    return nullcontext()


#: weights past which a model held in memory is rewritten through a scratch file
SCRATCH_MODEL_BYTES = 1 << 30


def _compress(
    loaded: LoadedModel, config: CompressConfig, executor: Executor, timer: float
) -> tuple[onnx.ModelProto, Report]:
    seconds: dict[str, float] = {}
    ir_version = loaded.proto.ir_version  # (an owned model is brought to caller form)
    original = working_form(loaded.proto, owned=loaded.owned)
    extraction = extract_operators(original, loaded.external)
    groups = channel_groups(original)
    seconds["analyse"] = time.perf_counter() - timer

    timer = time.perf_counter()
    if config.calib is not None:
        split = split_feeds(original, check_feeds(config.calib, original), config.holdout,
                            config.seed)
    else:
        feeds = synthesize_inputs(original, count=config.samples, seed=config.seed)
        split = Split(feeds, feeds, (0, sample_count(original, feeds)), _SYNTHESISED)
    verifier = Verifier(original, split.held_out)  # first: refuses what onnxruntime can't run
    stats = (calibration_stats(original, extraction, groups, config.method, split.fit)
             if config.calib is not None else None)
    heap.trim()  # what the statistics' sums left free, before planning
    seconds["calibrate"] = time.perf_counter() - timer

    timer = time.perf_counter()
    values = stored_values(original)
    choices = config.conv_choices()
    resource = PARAMS if config.target is None else Cycles(
        config.target, infer_shapes(original), config.batch)

    memos: dict[int, dict[tuple[str, ...], Candidate | None]] = {}  # per alignment
    applier = Applier(original, extraction, groups)
    gains: dict[str, Gain] = {}
    priced = config.priced_by_output
    notes: list[str] = [] if split.note is None else [split.note]

    def plans(keep: float | None, align: int | None = None, crosslayer: bool = True
              ) -> list[Alternative]:
        """The plan of each treatment of the convolutions (distinct plans only, labelled
        by their treatment); with output pricing, the units' gains are measured the first
        time a unit is planned for a ``keep``."""
        memo = memos.setdefault(align or 0, {})  # low-rank units, shared by all plans

        def plan_all(prices: dict[str, float] | None) -> list[Planned]:
            return [make_plan(extraction, groups, values, stats,
                              replace(config.plan_config(convs, resource, keep, align),
                                      crosslayer=config.crosslayer and crosslayer),
                              loaded.name, memo, executor, model_file(loaded), prices)
                    for convs in choices]

        nonlocal priced
        planned = plan_all(None)
        if priced and keep is not None:
            unpriced = [c for p in planned for c in p.candidates if c.key not in gains]
            if unpriced:  # probed at the variants the plan priced by layer chose
                started = time.perf_counter()
                chosen = {u.candidate.key: u.chosen for p in planned for u in p.units}
                try:
                    gains.update(measure_gains(
                        original, applier, unpriced, split.fit,
                        split.samples[0] if split.separate else 0, config.seed, chosen,
                        PROBE_SECONDS if config.pricing == "auto" else None))
                except ProbesTooSlow as slow:
                    priced = False
                    gains.clear()
                    notes.append(f"--pricing auto priced the units by their own error: "
                                 f"pricing by the output ({slow}) would pass "
                                 f"{PROBE_SECONDS:.0f} s; --pricing output forces it")
                seconds["sensitivity"] = (seconds.get("sensitivity", 0.0)
                                          + time.perf_counter() - started)
            if priced:
                planned = plan_all({key: gain.value for key, gain in gains.items()})
        distinct: list[Alternative] = []
        for label, p in zip(choices, planned, strict=True):  # the same plan is verified once
            if all(p.plan != q.plan for _, q in distinct):
                distinct.append((label, p))
        if keep is not None and config.mode == "budget" and config.align is None \
                and align is None and any(
                abs((p.plan.kept or 0.0) - keep) > BUDGET_SLACK for _, p in distinct):
            finer = plans(keep, 1, crosslayer)  # steps of 8 too coarse: steps of 1
            better = _miss(finer, keep) < _miss(distinct, keep)
            memos.pop(0 if better else 1)  # the memo not used holds every factorisation
            return finer if better else distinct
        return distinct

    keep = config.keep
    searched: dict[float, tuple[list[Alternative], list[Tried]]] = {}  # keep -> verified

    def evaluate(k: float) -> list[Tried]:
        planned = plans(k)
        searched[k] = (planned, [apply_all(applier, verifier, p) for _, p in planned])
        return searched[k][1]

    if config.mode == "search":
        assert config.tolerance is not None
        keep = _search(evaluate, config.tolerance)
        notes.append(f"--tolerance {config.tolerance:g} alone: the search over the budget "
                     f"settled on --keep {keep:.3f}")
    # the search verified the plans it settled on already
    alternatives_, tried = searched[keep] if keep in searched else (plans(keep), [])
    labels = [label for label, _ in alternatives_]
    candidates = [p for _, p in alternatives_]
    if any(s.kind == "crosslayer_basis" for p in candidates for s in p.plan.steps):
        # a cross-layer basis wins on its own units' error; whether the model output
        # agrees is measured: the plans without it are verified beside them
        plain = plans(keep, crosslayer=False)
        candidates = [*candidates, *(p for _, p in plain)]
        labels = [*labels, *(f"{label}{_PLAIN}" for label, _ in plain)]
    if config.calib is not None and config.refit != "off" and any(
            s.kind != "prune_channels" for p in candidates for s in p.plan.steps):
        refitted = [refit(original, extraction, groups, p, split.fit) for p in candidates]
        if config.refit == "on":
            candidates, tried = refitted, []
        else:
            candidates, labels = [*candidates, *refitted], [*labels,
                                                           *(f"{c}+refit" for c in labels)]
    seconds["plan"] = time.perf_counter() - timer
    factors.release()  # planning's caches: the model runs in onnxruntime from here on
    extdata.release()
    heap.trim()  # and the heap its temporaries left free, before onnxruntime's sessions

    timer = time.perf_counter()
    local: Local | None = None
    if config.calib is not None:  # each step alone, on the held-out inputs

        def local(model: onnx.ModelProto, steps: Sequence[Step]) -> dict[int, float]:
            return local_errors(original, model, boundaries(steps, extraction, groups),
                                split.held_out)

    tolerance = config.effective_tolerance
    tried = [*tried, *(apply_all(applier, verifier, planned)
                       for planned in candidates[len(tried):])]
    alternatives: dict[str, float] = {}
    if len(tried) > 1:  # what each alternative (convolutions, refit) verified at
        alternatives = {c: t[2].relative_error for c, t in zip(labels, tried, strict=True)}
    within = [i for i, t in enumerate(tried) if t[2].relative_error <= tolerance]
    if within:  # all steps pass: the same budget, so the smaller error wins
        best = min(within, key=lambda i: tried[i][2].relative_error)
        results = {best: apply_verified(applier, verifier, candidates[best], tolerance,
                                        tried[best], local)}
    else:  # the tolerance forces rollbacks: the treatment that ends smaller wins
        results = {i: apply_verified(applier, verifier, candidates[i], tolerance, tried[i],
                                     local) for i in range(len(candidates))}
        best = min(results, key=lambda i: (model_params(results[i][0]),
                                           results[i][2].relative_error))
    plan = candidates[best].plan
    if _PLAIN in labels[best]:  # say which cross-layer bases the verification turned down
        other = labels.index(labels[best].replace(_PLAIN, ""))
        plan = replace(plan, shared_bases=crosslayer_verified(
            candidates[other].plan.shared_bases, tried[other][2].relative_error,
            tried[best][2].relative_error))
    result, outcomes, verification = results[best]
    fit_verification = Verifier(original, split.fit).check(result) if split.separate else None
    seconds["rewrite_and_verify"] = time.perf_counter() - timer
    if local is not None:
        timer = time.perf_counter()
        outcomes = measured_locally(outcomes, result, local)
        seconds["local_errors"] = time.perf_counter() - timer

    after = extract_operators(result)
    report = Report(
        model=plan.model,
        plan=plan,
        outcomes=tuple(outcomes),
        verification=verification,
        params=(model_params(original), model_params(result)),
        flops=(operator_flops(extraction), operator_flops(after)),
        operator_params=(operator_params(extraction), operator_params(after)),
        seconds=seconds,
        alternatives=alternatives,
        ir_version=(ir_version, result.ir_version),
        cycles=None if not isinstance(resource, Cycles) else (
            round(resource.operators(extraction.operators)),
            round(Cycles(resource.target.name, infer_shapes(result), resource.batch)
                  .operators(after.operators)),
            resource.batch,
        ),
        fit_verification=fit_verification,
        samples=split.samples,
        notes=tuple(notes),
        mode=config.mode,
        gains=tuple(gains.values()),
    )
    return result, _budget_checked(report, config)


def _miss(planned: list[Alternative], keep: float) -> float:
    """How far the closest of the plans keeps from ``keep``, as planned."""
    return min(abs((p.plan.kept or 0.0) - keep) for _, p in planned)


def _search(evaluate: Callable[[float], list[Tried]], tolerance: float) -> float:
    """The smallest ``keep`` (to ``2**-SEARCH_STEPS``) whose plan, applied whole, verifies
    within ``tolerance`` for some treatment of the convolutions; 1.0 if none does. The
    error is not exactly monotone in ``keep``; rollbacks after the search are the guard."""
    low, high = 0.0, 1.0  # high: the least keep known to pass (1.0: nothing to lose)
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if min(t[2].relative_error for t in evaluate(middle)) <= tolerance:
            high = middle
        else:
            low = middle
    return high


def _budget_checked(report: Report, config: CompressConfig) -> Report:
    """The report with a note when ``--keep`` was missed by more than ``BUDGET_SLACK``;
    with ``strict_budget`` that is an error instead (nothing is written)."""
    if config.keep is None:
        return report
    achieved = float(report.to_dict()["keep_achieved"])
    if achieved <= config.keep + BUDGET_SLACK or math.isclose(achieved, config.keep):
        return report
    why: Literal["the tolerance", "steps declined or failing verification"] = (
        "the tolerance" if config.mode == "rollback" else
        "steps declined or failing verification")
    text = (f"--keep {config.keep:g} was not met: {achieved:.3f} of the compressible weights "
            f"kept ({why} stopped it; held-out error "
            f"{report.verification.relative_error:.4g})")
    if config.strict_budget:
        raise QmpassInputError(text + "; --strict-budget makes that an error.")
    return replace(report, notes=(*report.notes, text))


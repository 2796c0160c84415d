"""``compress --budgets``: one budget-gated model that serves several budgets, chosen per
request by its ``budget_level`` input (docs/GATED.md).

load -> split the calibration inputs -> the planner's units (low-rank only) -> nested
plans of every budget (:mod:`qmpass.plan.levels`) -> one gated record per operator
(:mod:`qmpass.algebra.gated`) -> the gated model (:mod:`qmpass.rewrite.gated_lowrank`)
-> every level verified on the held-out inputs and timed in onnxruntime, beside a
standalone :func:`~qmpass.compress.compress` at the same budget (what nesting cost).

Every planned step is kept (``--keep`` semantics per level: there is no tolerance to
roll back to). Channel pruning and refitted factors are not gated: neither is nested
across budgets (see :mod:`qmpass.plan.levels`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qmpass.algebra.gated import GatedFactors, gated_declines
from qmpass.compress.calibration import Split, calibration_stats, split_feeds
from qmpass.compress.config import DEFAULT_ALIGN, CompressConfig
from qmpass.compress.gated_report import GatedReport, LevelRow, stored_params
from qmpass.compress.pipeline import BUDGET_SLACK, compress
from qmpass.compress.report import operator_flops, operator_params
from qmpass.compress.sensitivity import PROBE_SECONDS, ProbesTooSlow, measure_gains
from qmpass.errors import QmpassInputError
from qmpass.extdata import embedded, external_tensors
from qmpass.extract import Extraction, Operator, extract_operators
from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.extract.shapes import infer_shapes
from qmpass.modelio import ModelLike, load_model, stored_values
from qmpass.parallel import Executor, model_file
from qmpass.plan.levels import LevelPlan, level_cost, plan_levels
from qmpass.plan.plan import Cost, Plan
from qmpass.plan.planner import unit_candidates
from qmpass.plan.resource import PARAMS, Cycles
from qmpass.plan.units import Candidate
from qmpass.rewrite import Applier
from qmpass.rewrite.base import working_form
from qmpass.rewrite.gated_lowrank import GATED_INPUT, GatedForm, build_gated, refuse_gated
from qmpass.verify import Verification, Verifier, check_feeds, compare, synthesize_inputs
from qmpass.verify.compare import sample_count
from qmpass.verify.runner import DEFAULT_BATCH, feed_batches, session

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

__all__ = ["LATENCY_RUNS", "LATENCY_THREADS", "compress_gated"]

#: timed onnxruntime runs per level (after two warm-up runs); the report gives the median
LATENCY_RUNS = 9
#: onnxruntime threads of the timed sessions: one measures the work a level does, not how
#: threads are scheduled on a shared machine (bench/gated.py times batch 1 as well)
LATENCY_THREADS = 1


def compress_gated(
    model: ModelLike, config: CompressConfig, standalone: bool = True,
    form: GatedForm = "model",
) -> tuple[onnx.ModelProto, GatedReport]:
    """The budget-gated model of ``model`` for ``config.budgets`` and its report.
    ``standalone``: also compress the model separately at every budget below 1 (one
    :func:`~qmpass.compress.compress` each) to measure what nesting cost. ``form``: the
    graph form (:func:`~qmpass.rewrite.gated_lowrank.build_gated`; ``bench/gated.py``
    times both)."""
    if config.budgets is None:
        raise QmpassInputError("a gated model needs budgets (CompressConfig(budgets=...)).")
    with Executor(config.jobs, config.scheduler) as executor:
        return _compress_gated(model, config, executor, standalone, form)


def _compress_gated(model: ModelLike, config: CompressConfig, executor: Executor,
                    standalone: bool, form: GatedForm) -> tuple[onnx.ModelProto, GatedReport]:
    assert config.budgets is not None
    budgets = config.budgets
    seconds: dict[str, float] = {}
    timer = time.perf_counter()
    loaded = load_model(model)
    refuse_gated(loaded.proto, "compress")
    # the gated rewrite holds every level's factors in the proto: external data read in
    whole = embedded(loaded.proto, loaded.folder)
    if external_tensors(whole):  # embedded() leaves models of 2 GB or more as they are
        raise QmpassInputError("--budgets does not support models of 2 GB or more yet.")
    original = working_form(whole, owned=loaded.owned or whole is not loaded.proto)
    extraction = extract_operators(original, loaded.external)
    ops = {op.name: op for op in extraction.operators}
    groups = channel_groups(original)
    if config.calib is not None:
        split = split_feeds(original, check_feeds(config.calib, original), config.holdout,
                            config.seed)
    else:
        feeds = synthesize_inputs(original, count=config.samples, seed=config.seed)
        split = Split(feeds, feeds, (0, sample_count(original, feeds)),
                      "no --calib: the levels were verified on synthesised inputs")
    verifier = Verifier(original, split.held_out)
    stats = (calibration_stats(original, extraction, groups, config.method, split.fit)
             if config.calib is not None else None)
    resource = PARAMS if config.target is None else Cycles(
        config.target, infer_shapes(original), config.batch)
    seconds["analyse_and_calibrate"] = time.perf_counter() - timer

    timer = time.perf_counter()
    values = stored_values(original)
    pricing = _Pricing(config, original, extraction, groups, split)

    def levels(align: int, by_output: bool) -> LevelPlan | None:
        """The levels at ``align``, priced by each unit's own error or by the output
        (None: the probes would take too long)."""
        memo: dict[tuple[str, ...], Candidate | None] = {}
        plan_config = config.plan_config("factorise", resource, budgets[0], align)
        candidates, declined = unit_candidates(extraction, groups, values, stats, plan_config,
                                               memo, executor, model_file(loaded))
        gated = []
        for c in candidates:
            reason = gated_declines([ops[n] for n in c.operators])
            if reason is None:
                gated.append(c)
            else:
                declined.update(dict.fromkeys(c.operators, f"not gated: {reason}"))
        base = Plan(model=loaded.name, method=config.method, budget={},
                    baseline=Cost.of(ops[n] for n in sorted({n for c in gated
                                                             for n in c.operators})),
                    steps=(), declined=tuple(sorted(declined.items())),
                    resource=resource.name)
        planned = plan_levels(gated, memo, ops, budgets, resource, base)
        if not by_output:
            return planned
        gains = pricing.gains(gated, planned.chosen)  # probed where the levels went
        return None if gains is None else plan_levels(gated, memo, ops, budgets, resource,
                                                      base, gains)

    def aligned(by_output: bool) -> LevelPlan | None:
        planned = levels(config.align or DEFAULT_ALIGN, by_output)
        if planned is not None and config.align is None and planned.miss > BUDGET_SLACK:
            finer = levels(1, by_output)  # steps of 8 too coarse for these budgets
            planned = finer if finer is not None and finer.miss < planned.miss else planned
        return planned

    tried: dict[str, LevelPlan | None] = {}
    if config.pricing != "output" or not pricing.wanted:
        tried["layer"] = aligned(False)
    if pricing.wanted:
        by_output = aligned(True)
        layer = tried.get("layer")
        if by_output is not None and (layer is None or by_output.plans != layer.plans):
            tried["output"] = by_output  # (the same levels are built and verified once)
    seconds["plan"] = time.perf_counter() - timer - pricing.seconds
    if pricing.seconds:
        seconds["sensitivity"] = pricing.seconds

    timer = time.perf_counter()
    built = {how: (planned, *_build(original, ops, planned, form))
             for how, planned in tried.items() if planned is not None}
    priced_by = next(iter(built))
    runner = _LevelRunner(original, split.held_out, verifier)
    if len(built) > 1:  # --pricing auto: the levels that verify better, as compress does
        mean = {how: statistics.fmean(runner.verify(model, level).relative_error
                                      for level in range(len(budgets)))
                for how, (_, model, _) in built.items()}
        priced_by = "output" if mean["output"] < OUTPUT_MARGIN * mean["layer"] else "layer"
        pricing.notes.append(
            f"--pricing auto priced the levels by {_PRICED[priced_by]}: the mean held-out "
            f"error of the levels was {mean['layer']:.4g} priced by each unit's own error, "
            f"{mean['output']:.4g} by the output")
        for how, (_, model, _) in built.items():
            if how != priced_by:
                runner.forget(model)
    planned, gated, declined_units = built[priced_by]
    plans = [replace(plan, steps=tuple(s for s in plan.steps
                                       if s.operators not in declined_units))
             for plan in planned.plans]
    declined = [*plans[0].declined, *((", ".join(k), why) for k, why in declined_units.items())]
    seconds["rewrite"] = time.perf_counter() - timer

    timer = time.perf_counter()
    default_ok = runner.default_is_level_0(gated)
    rows = []
    for level, (budget, plan) in enumerate(zip(budgets, plans, strict=True)):
        cost = level_cost(plan, ops)
        row = LevelRow(level, budget, plan, cost.params, cost.flops,
                       runner.verify(gated, level), runner.latency(gated, level))
        if standalone:
            row = _with_standalone(row, runner, original, config, budget)
        rows.append(row)
    seconds["verify_and_time"] = time.perf_counter() - timer
    report = GatedReport(
        model=loaded.name, method=config.method, resource=resource.name, levels=tuple(rows),
        declined=tuple(declined),
        params=(stored_params(original), stored_params(gated)),
        operator_params=operator_params(extraction), operator_flops=operator_flops(extraction),
        latency_ms=runner.latency(original, None), default_is_level_0=default_ok,
        samples=split.samples, seconds=seconds,
        notes=tuple(n for n in [split.note, *pricing.notes,
                                *(n for p in plans for n in p.notes)] if n),
        pricing=priced_by,
        gains=tuple(sorted(pricing.measured.items())),
    )
    return gated, report


#: output-priced levels are kept under ``--pricing auto`` when their mean held-out error
#: is below this times the layer-priced levels' (a tie keeps the layer pricing)
OUTPUT_MARGIN = 1.0
_PRICED = {"layer": "each unit's own error", "output": "the output"}


class _Pricing:
    """The gains the levels are priced by under output pricing: every gated unit probed
    once (:func:`measure_gains`), as ``compress`` does, at the variant the levels priced
    by each unit's own error chose (the first level that compressed it). ``--pricing
    output`` takes the levels planned on them; ``--pricing auto`` (with calibration
    inputs) plans the levels both ways and keeps those that verify better: one
    gain per unit serves every level, which by measurement (docs/GATED.md) helps some
    models' levels and costs others'."""

    def __init__(self, config: CompressConfig, original: onnx.ModelProto,
                 extraction: Extraction, groups: Sequence[ChannelGroup], split: Split) -> None:
        self.config, self.original, self.split = config, original, split
        self.applier = Applier(original, extraction, groups)
        self.wanted = config.priced_by_output
        self.measured: dict[str, float] = {}
        self.notes: list[str] = []
        self.seconds = 0.0

    def gains(self, candidates: Sequence[Candidate], at: Mapping[str, int]
              ) -> dict[str, float] | None:
        """The units' gains (None: ``--pricing auto`` and the probes would pass
        ``PROBE_SECONDS``)."""
        unpriced = [c for c in candidates if c.key not in self.measured]
        if unpriced and self.wanted:
            started = time.perf_counter()
            split = self.split
            try:
                found = measure_gains(
                    self.original, self.applier, unpriced, split.fit,
                    split.samples[0] if split.separate else 0, self.config.seed, at,
                    PROBE_SECONDS if self.config.pricing == "auto" else None)
            except ProbesTooSlow as slow:
                self.wanted = False
                self.notes.append(f"--pricing auto priced the levels by each unit's own "
                                  f"error: pricing by the output ({slow}) would pass "
                                  f"{PROBE_SECONDS:.0f} s; --pricing output forces it")
            else:
                self.measured.update({key: gain.value for key, gain in found.items()})
                self.measured.update({c.key: 1.0 for c in unpriced if c.key not in found})
            self.seconds += time.perf_counter() - started
        return self.measured if self.wanted else None


def _build(original: onnx.ModelProto, ops: Mapping[str, Operator], planned: LevelPlan,
           form: GatedForm
           ) -> tuple[onnx.ModelProto, dict[tuple[str, ...], str]]:
    """The gated model and the units left dense at every level (with why)."""
    units, declined = [], {}
    for unit in planned.units:
        members = [ops[n] for n in unit.operators]
        try:
            units.append((members, GatedFactors.of(members, unit.levels)))
        except ValueError as exc:
            declined[unit.operators] = str(exc)
    model, refused = build_gated(original, ops, units, planned.budgets, form)
    for index, why in refused.items():
        declined[tuple(op.name for op in units[index][0])] = why
    if len(declined) == len(planned.units) and planned.units:
        raise QmpassInputError(f"no operator could be gated ({next(iter(declined.values()))}).")
    if not planned.units:
        raise QmpassInputError("no level compresses anything: every budget leaves the "
                               "model as it is (or nothing in it can be factorised).")
    return model, declined


def _with_standalone(row: LevelRow, runner: _LevelRunner, original: onnx.ModelProto,
                     config: CompressConfig, budget: float) -> LevelRow:
    """The row with a separately compressed model at its budget (the original at 1)."""
    if budget >= 1.0:
        reference = runner.verifier.check(original)
        return replace(row, standalone=reference, standalone_kept=1.0,
                       standalone_latency_ms=runner.latency(original, None))
    alone, report = compress(original, replace(config, budgets=None, keep=budget))
    return replace(row, standalone=runner.verifier.check(alone),
                   standalone_kept=float(report.to_dict()["keep_achieved"]),
                   standalone_latency_ms=runner.latency(alone, None))


class _LevelRunner:
    """Runs models on the held-out feeds (a level's ``budget_level`` fed when given)."""

    def __init__(self, original: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                 verifier: Verifier) -> None:
        self.verifier = verifier
        self.chunks = list(feed_batches(session(original), feeds, DEFAULT_BATCH))
        self.feeds = dict(feeds)
        self.outputs = [o.name for o in original.graph.output]
        self.inputs = verifier.inputs
        self._sessions: dict[int, tuple[onnx.ModelProto, InferenceSession]] = {}

    def _session(self, model: onnx.ModelProto) -> InferenceSession:
        key = id(model)
        if key not in self._sessions:  # the model is kept so its id stays its own
            self._sessions[key] = (model, session(model, threads=LATENCY_THREADS))
        return self._sessions[key][1]

    def forget(self, model: onnx.ModelProto) -> None:
        """Drop ``model``'s session (and the model it keeps alive)."""
        self._sessions.pop(id(model), None)

    @staticmethod
    def _feeds(feeds: Mapping[str, np.ndarray], level: int | None) -> dict[str, np.ndarray]:
        return dict(feeds) if level is None else {**feeds, GATED_INPUT: np.array(level)}

    def run(self, model: onnx.ModelProto, level: int | None) -> list[np.ndarray]:
        sess = self._session(model)
        parts = [sess.run(self.outputs, self._feeds(c, level)) for c in self.chunks]
        return [np.concatenate(column, axis=0) if len(parts) > 1 else column[0]
                for column in zip(*parts, strict=True)]

    def verify(self, model: onnx.ModelProto, level: int) -> Verification:
        return compare(self.verifier.reference, self.run(model, level), self.inputs)

    def default_is_level_0(self, model: onnx.ModelProto) -> bool:
        return all(np.array_equal(a, b) for a, b in zip(self.run(model, None),
                                                        self.run(model, 0), strict=True))

    def latency(self, model: onnx.ModelProto, level: int | None) -> float:
        """Median wall time (ms) of one run over all the held-out feeds."""
        sess = self._session(model)
        feeds = self._feeds(self.feeds, level)
        for _ in range(2):
            sess.run(self.outputs, feeds)
        times = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            sess.run(self.outputs, feeds)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)


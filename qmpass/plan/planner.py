"""Analysis -> :class:`Plan`: which rewrite where, at which rank or with which channels.

Units of compression by method (:mod:`qmpass.plan.units` builds their variants):

* ``qmfrg``: with calibration data, channel groups produced by convolutions are pruned
  (greedy forward selection on the consumers' view of the activation covariance,
  least-squares compensation; without data, convolutions are factorised instead);
  operators that read one tensor (Q/K/V, gate/up: the QM-FRG's same-input clusters, i.e.
  extraction's fusion groups) form one unit that may share a low-rank basis or factorise
  its members separately, whichever loses less; every other matmul or convolution is
  factorised alone. With calibration statistics every decomposition is whitened.
* ``svd``: every operator alone, plain truncated SVD (data-free even with calibration).
* ``whitened``: every operator alone, whitened truncation from the calibration data: the
  per-layer data-aware optimum of docs/DESIGN.md (the same as ``svd`` without data).
* ``magnitude`` / ``random``: the baselines prune every prunable channel group, keeping
  the channels of largest L1 norm (or random ones), the same fraction in every group,
  without compensation.

``keep`` budgets are allocated by the Lagrangian of :mod:`qmpass.plan.budget` over all
units (uniformly for the baselines); ``delta`` gives each unit its cheapest variant whose
worst member keeps at least ``exp(-delta)`` of its energy (``S(rho_q || rho) <= delta``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qmpass.algebra import lowrank_declines, shared_basis_declines
from qmpass.extract import Extraction, Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.parallel import Executor
from qmpass.plan.budget import allocate
from qmpass.plan.plan import Cost, Plan, Step
from qmpass.plan.resource import PARAMS, Resource
from qmpass.plan.units import (
    Built,
    Candidate,
    StatsKey,
    StatsLike,
    channel_candidate,
    cluster_candidate,
    input_key,
    lowrank_candidate,
    pruned_resource,
)

__all__ = [
    "METHODS", "Method", "PlanConfig", "Planned", "make_plan", "stats_requests",
    "unit_candidates",
]

Method = Literal["qmfrg", "svd", "whitened", "magnitude", "random"]
METHODS: tuple[Method, ...] = ("qmfrg", "svd", "whitened", "magnitude", "random")
_PRUNING: tuple[Method, ...] = ("magnitude", "random")


@dataclass(frozen=True)
class PlanConfig:
    """``keep``: fraction of the compressible operators' weight parameters to keep;
    ``delta``: relative-entropy bound per unit instead (exactly one of the two).

    ``resource``: what ``keep`` counts (:mod:`qmpass.plan.resource`): weight parameters
    by default, or a target's cycles.

    ``align``: ranks and kept channel counts are multiples of it. onnxruntime's CPU
    convolutions take a blocked fast path only for some channel counts: the CNN fixture
    pruned to counts that are not multiples of 8 ran about 2x *slower* than the original,
    with 8-aligned counts faster (docs/RESULTS.md, part C). ``convs``: whether a
    calibrated ``qmfrg`` plan prunes the channel groups of convolutions or factorises
    the convolutions.
    """

    method: Method = "qmfrg"
    keep: float | None = None
    delta: float | None = None
    seed: int = 0
    align: int = 1
    convs: Literal["prune", "factorise"] = "prune"
    resource: Resource = PARAMS

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.delta is None):
            raise ValueError("give exactly one of keep and delta")
        if self.align < 1:
            raise ValueError("align must be a positive integer")


@dataclass(frozen=True)
class Planned:
    """A plan, the new weights of its steps, and per unit the variant chosen and the
    milder ones to fall back to when verification rejects it."""

    plan: Plan
    tensors: tuple[dict[str, np.ndarray], ...]
    units: tuple[PlannedUnit, ...]


@dataclass(frozen=True)
class PlannedUnit:
    candidate: Candidate
    chosen: int
    steps: tuple[int, ...]  # indices into plan.steps

    def fallbacks(self, most: int = 4) -> Iterator[Built]:
        """Up to ``most`` milder variants' steps, evenly spread from the least to the most
        conservative (each costs the caller a verification run), mildest last; each is
        built only when asked for."""
        milder = self.candidate.milder(self.chosen)
        if len(milder) > most:
            picks = np.unique(np.linspace(0, len(milder) - 1, most).round().astype(int))
            milder = [milder[i] for i in picks]
        for index in milder:
            yield self.candidate.variants[index].build()


def stats_requests(
    extraction: Extraction, groups: Sequence[ChannelGroup], method: Method
) -> dict[str, StatsKey]:
    """The statistics a data-aware plan of ``method`` reads, keyed as the planner looks
    them up: compressible operators' inputs (receptive fields for a Conv) and the
    activations of prunable groups' consumers along the channel axis."""
    wanted: dict[str, StatsKey] = {}
    if method in ("qmfrg", "whitened"):
        for op in extraction.operators:
            if lowrank_declines(op) is None:
                key = input_key(op)
                wanted[key.key] = key
    if method in ("qmfrg", *_PRUNING):
        for group in groups:
            if group.reason is None:
                for consumer in group.consumers:
                    key = _channel_key(group, consumer.activation)
                    wanted[key.key] = key
    return wanted


def _channel_key(group: ChannelGroup, activation: str) -> StatsKey:
    return StatsKey(activation, "vectors", group.channel_axis)


def make_plan(
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    values: Mapping[str, np.ndarray],
    stats: Mapping[str, StatsLike] | None,
    config: PlanConfig,
    model_name: str = "model",
    memo: dict[tuple[str, ...], Candidate | None] | None = None,
    executor: Executor | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Planned:
    """Plan ``config`` for a model. ``values`` holds the stored tensors channel groups
    name; ``stats`` the calibration statistics of :func:`stats_requests` (or None).
    Plans of one model that differ only in ``config.convs`` may share a ``memo``: their
    low-rank candidates are the same, and computed once. A parallel ``executor``
    (:mod:`qmpass.parallel`) computes the low-rank candidates the plan needs side by side
    first (a Dask cluster reads the weights from the model file ``source``); the plan is
    the same."""
    ops = {op.name: op for op in extraction.operators}
    candidates, declined = unit_candidates(extraction, groups, values, stats, config, memo,
                                           executor, source)
    baseline = Cost.of(ops[n] for n in sorted({n for c in candidates for n in c.operators})
                       if n in ops)
    notes: list[str] = []
    choice = _choose(candidates, ops, config, baseline, notes)
    kept = None
    if config.keep is not None:
        full = _full_cost(candidates, ops, config.resource)
        kept = _exact_cost(candidates, ops, choice, config.resource) / full if full else 1.0

    steps: list[Step] = []
    tensors: list[dict[str, np.ndarray]] = []
    units: list[PlannedUnit] = []
    for candidate in candidates:
        index = choice[candidate.key]
        if index == 0:
            continue
        built = candidate.variants[index].build()
        units.append(PlannedUnit(candidate, index,
                                 tuple(range(len(steps), len(steps) + len(built)))))
        for step, arrays in built:
            steps.append(step)
            tensors.append(arrays)
    budget = {"keep": config.keep} if config.keep is not None else {"delta": config.delta}
    plan = Plan(
        model=model_name,
        method=config.method,
        budget={k: float(v) for k, v in budget.items() if v is not None},
        baseline=baseline,
        steps=tuple(steps),
        declined=tuple(sorted(declined.items())),
        resource=config.resource.name,
        notes=tuple(notes),
        kept=kept,
    )
    return Planned(plan, tuple(tensors), tuple(units))


def unit_candidates(
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    values: Mapping[str, np.ndarray],
    stats: Mapping[str, StatsLike] | None,
    config: PlanConfig,
    memo: dict[tuple[str, ...], Candidate | None] | None = None,
    executor: Executor | None = None,
    source: str | os.PathLike[str] | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """The units :func:`make_plan` budgets (each with its variants) and the operators it
    declines with why, before any budget is applied (``config.keep``/``delta`` unused);
    also what :mod:`qmpass.plan.levels` plans several budgets over. A ``memo`` holds
    every low-rank unit computed, the members of clusters included."""
    declined: dict[str, str] = {}
    candidates = _candidates(extraction, groups, values, stats, config, declined,
                             {} if memo is None else memo, executor, source)
    if config.resource is not PARAMS:  # on a target, fewer parameters can cost more cycles
        saving = [c for c in candidates
                  if min(v.cost for v in c.variants[1:]) < c.variants[0].cost]
        for c in candidates:
            if c not in saving:
                for name in c.operators:
                    declined[name] = f"no variant saves {config.resource.name}"
        candidates = saving
    return candidates, declined


def _candidates(
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    values: Mapping[str, np.ndarray],
    stats: Mapping[str, StatsLike] | None,
    config: PlanConfig,
    declined: dict[str, str],
    memo: dict[tuple[str, ...], Candidate | None],
    executor: Executor | None = None,
    source: str | os.PathLike[str] | None = None,
) -> list[Candidate]:
    method = config.method
    ops = {op.name: op for op in extraction.operators}
    candidates: list[Candidate] = []
    taken: set[str] = set()

    if method in ("qmfrg", *_PRUNING):
        for group in groups:
            if group.reason is not None:
                continue
            producers = [ops.get(p.node) for p in group.producers]
            if method == "qmfrg" and (stats is None or config.convs == "factorise" or not any(
                    op is not None and op.op_type == "Conv" for op in producers)):
                # a matmul's channels: low rank loses less than pruning them; without
                # calibration data nothing tells which channels the activation silences,
                # while low rank still has the exact weight spectrum
                continue
            channel_stats = [
                None if stats is None else stats.get(_channel_key(group, c.activation).key)
                for c in group.consumers
            ]
            candidate = channel_candidate(group, ops, values, channel_stats, method,
                                          config.align, config.seed, config.resource)
            if candidate is not None:
                candidates.append(candidate)
                taken.update(group.operators)
    if method in _PRUNING:
        pinned = {name: g.reason for g in groups if g.reason for name in g.operators}
        for op in extraction.operators:
            if op.name not in taken:
                declined[op.name] = (f"its channels cannot be pruned: {pinned[op.name]}"
                                     if op.name in pinned else
                                     "no prunable channel group touches it")
        return candidates

    whitened = method in ("qmfrg", "whitened") and stats is not None

    def op_stats(op: Operator) -> StatsLike | None:
        return stats.get(input_key(op).key) if whitened and stats is not None else None

    if executor is not None and executor.parallel:
        # the same units as the loops below ask for, computed side by side into the memo
        needed = {key: task for key, task in _lowrank_units(extraction, ops, taken, method)
                  if key not in memo}
        results = executor.map(
            _lowrank_task,
            [(members, op_stats(members[0]), config.align, fused, config.resource)
             for members, fused in needed.values()],
            source=source,
        )
        memo.update(zip(needed, results, strict=True))

    def lowrank(members: list[Operator], fused: bool) -> Candidate | None:
        key = _unit_key(members, fused)
        if key not in memo:
            memo[key] = _lowrank_task(members, op_stats(members[0]), config.align, fused,
                                      config.resource)
        return memo[key]

    def alone(op: Operator) -> Candidate | None:
        candidate = lowrank([op], fused=False)
        if candidate is None:
            declined[op.name] = (f"no rank (a multiple of {config.align}) of the "
                                 f"{op.shape[0]}x{op.shape[1]} matrix saves parameters")
        return candidate

    if method == "qmfrg":
        for members in extraction.fusion_groups:
            cluster = [ops[name] for name in members]
            if taken.intersection(members) or shared_basis_declines(cluster):
                continue
            fused = lowrank(cluster, fused=True)
            separate = [c for c in map(alone, cluster) if c is not None]
            candidate = cluster_candidate(fused, separate)
            if candidate is not None:
                candidates.append(candidate)
            taken.update(members)
    for op in extraction.operators:
        if op.name in taken:
            continue
        reason = lowrank_declines(op)
        if reason is not None:
            declined[op.name] = reason
            continue
        candidate = alone(op)
        if candidate is not None:
            candidates.append(candidate)
    return candidates


def _unit_key(members: Sequence[Operator], fused: bool) -> tuple[str, ...]:
    return (("fused",) if fused else ()) + tuple(op.name for op in members)


def _lowrank_units(
    extraction: Extraction, ops: Mapping[str, Operator], taken: set[str], method: Method,
) -> Iterator[tuple[tuple[str, ...], tuple[list[Operator], bool]]]:
    """The low-rank units (memo key, members, fused) :func:`_candidates` computes after
    the channel candidates took ``taken``, in the order it computes them."""
    grouped = set(taken)
    if method == "qmfrg":
        for members in extraction.fusion_groups:
            cluster = [ops[name] for name in members]
            if grouped.intersection(members) or shared_basis_declines(cluster):
                continue
            yield _unit_key(cluster, True), (cluster, True)
            for op in cluster:
                yield _unit_key([op], False), ([op], False)
            grouped.update(members)
    for op in extraction.operators:
        if op.name not in grouped and lowrank_declines(op) is None:
            yield _unit_key([op], False), ([op], False)


def _lowrank_task(members: list[Operator], stats: StatsLike | None, align: int, fused: bool,
                  resource: Resource) -> Candidate | None:
    """One low-rank unit, with positional arguments (the executor's task form)."""
    return lowrank_candidate(members, stats, align, fused=fused, resource=resource)


# -- choosing variants ------------------------------------------------------------------------
#: rounds of measuring and tightening a ``keep`` budget over overlapping channel groups
TIGHTENING_ROUNDS = 12


def _choose(
    candidates: Sequence[Candidate], ops: Mapping[str, Operator], config: PlanConfig,
    baseline: Cost, notes: list[str],
) -> dict[str, int]:
    """The variant index of every unit under the budget; a budget the allocation may miss
    adds a sentence to ``notes``."""
    if config.delta is not None:
        allowed = 1.0 - math.exp(-config.delta)
        return {
            c.key: min(
                (i for i, v in enumerate(c.variants) if v.worst <= allowed + 1e-12),
                key=lambda i: c.variants[i].cost,
            )
            for c in candidates
        }
    assert config.keep is not None
    resource = config.resource
    full = _full_cost(candidates, ops, resource)
    target = config.keep * full
    if config.method in _PRUNING:
        return _uniform(candidates, ops, target, resource)
    # Channel groups may share operators (a conv consumes one and produces the next), so
    # their full costs overlap; budget the *savings*, which add up but for the product of
    # two groups' removed channels, corrected by measuring and tightening.
    units = [c.unit for c in candidates]
    budget = sum(u.options[0].cost for u in units) - (full - target)
    choice: dict[str, int] = {}
    for _ in range(TIGHTENING_ROUNDS):
        choice = {key: option.value for key, option in allocate(units, budget).items()}
        spent = _exact_cost(candidates, ops, choice, resource)
        if spent <= target + 0.5:
            break
        budget -= spent - target
    else:
        notes.append(
            f"the keep budget may be missed: after {TIGHTENING_ROUNDS} rounds of tightening, "
            f"the plan spends {spent:,.0f} {resource.name} of the compressible operators' "
            f"{full:,.0f}, above the {target:,.0f} that keep={config.keep:g} allows"
        )
    return choice


def _uniform(candidates: Sequence[Candidate], ops: Mapping[str, Operator], target: float,
             resource: Resource) -> dict[str, int]:
    """The baselines' allocation: the largest common fraction of channels kept in every
    group that meets ``target`` (each count rounded to its nearest allowed value)."""
    def pick(fraction: float) -> dict[str, int]:
        choice = {}
        for c in candidates:
            full = c.group.channels if c.group is not None else 1
            choice[c.key] = min(
                range(len(c.variants)),
                key=lambda i: (abs(_kept(c, i) - fraction * full), -_kept(c, i)),
            )
        return choice

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if _exact_cost(candidates, ops, pick(middle), resource) <= target:
            low = middle
        else:
            high = middle
    return pick(low)


def _kept(candidate: Candidate, index: int) -> int:
    assert candidate.group is not None
    return candidate.group.channels if index == 0 else candidate.variants[index].label


def _full_cost(candidates: Sequence[Candidate], ops: Mapping[str, Operator],
               resource: Resource) -> float:
    """``resource`` spent by all the candidates' operators as they are (what ``keep`` is
    a fraction of)."""
    return resource.operators([ops[n] for n in sorted({n for c in candidates
                                                       for n in c.operators}) if n in ops])


def _exact_cost(
    candidates: Sequence[Candidate], ops: Mapping[str, Operator], choice: Mapping[str, int],
    resource: Resource,
) -> float:
    """``resource`` spent by all the candidates' operators after the chosen variants
    (channel groups counted jointly, so operators between two groups shrink on both
    sides)."""
    kept: dict[ChannelGroup, int] = {}
    total = 0.0
    for c in candidates:
        if c.group is not None:
            kept[c.group] = _kept(c, choice[c.key])
        else:
            total += c.variants[choice[c.key]].cost
    return total + pruned_resource(resource, kept, ops)

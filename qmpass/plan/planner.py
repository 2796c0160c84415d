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
  per-layer data-aware optimum of docs/DESIGN.md (the same as ``svd`` without data), the
  anchor of SVD-LLM.
* ``asvd``: every operator alone, activation-aware SVD (:class:`ActivationScaled`).
* The low-rank baselines (``svd``, ``whitened``, ``asvd``) keep the same fraction of
  every operator (as their papers do), not the Lagrangian's allocation.
* ``magnitude`` / ``random``: the baselines prune every prunable channel group, keeping
  the channels of largest L1 norm (or random ones), the same fraction in every group,
  without compensation.

``keep`` budgets are allocated by the Lagrangian of :mod:`qmpass.plan.budget` over all
units, each unit's predicted errors priced by a gain (``make_plan``'s ``gains``: with
calibration data, ``compress`` measures what the model's output feels of each unit,
:mod:`qmpass.compress.sensitivity`), then what the last step left of the budget is spent
(uniformly for the baselines); ``delta`` gives each unit its cheapest variant whose
worst member keeps at least ``exp(-delta)`` of its energy (``S(rho_q || rho) <= delta``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tqdm import tqdm

from qmpass.algebra import lowrank_declines, shared_basis_declines
from qmpass.extract import Extraction, Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.parallel import Executor
from qmpass.plan.allocation import Rule, choose, exact_cost, full_cost
from qmpass.plan.factors import ActivationScaled
from qmpass.plan.plan import Cost, Plan, Step
from qmpass.plan.resource import PARAMS, Resource
from qmpass.plan.units import (
    Built,
    Candidate,
    Proposal,
    StatsKey,
    StatsLike,
    channel_candidate,
    cluster_candidate,
    crosslayer_candidates,
    crosslayer_outcomes,
    input_key,
    lowrank_candidate,
)
from qmpass.spill import Parked

__all__ = ["ALLOCATIONS", "METHODS", "Allocation", "Method", "PlanConfig", "Planned",
           "make_plan", "stats_requests", "unit_candidates"]

Method = Literal["qmfrg", "svd", "whitened", "asvd", "magnitude", "random"]
Allocation = Literal["lagrangian", "uniform"]
ALLOCATIONS: tuple[Allocation, ...] = ("lagrangian", "uniform")
METHODS: tuple[Method, ...] = ("qmfrg", "svd", "whitened", "asvd", "magnitude", "random")
_PRUNING: tuple[Method, ...] = ("magnitude", "random")
#: the low-rank baselines keep the same fraction of every operator, as their papers do
_UNIFORM: tuple[Method, ...] = ("svd", "whitened", "asvd")


@dataclass(frozen=True)
class PlanConfig:
    """``keep``: fraction of the compressible operators' weight parameters to keep;
    ``delta``: relative-entropy bound per unit instead (exactly one of the two).

    ``allocation``: how a ``keep`` budget is shared among the units: the Lagrangian's
    (``qmfrg``'s default) or the same fraction of every unit (``uniform``, the default of
    ``svd`` and ``whitened``, as their papers do); the pruning baselines are uniform.

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
    allocation: Allocation | None = None
    crosslayer: bool = True  # qmfrg with calibration: QM-FRG groups may share a basis

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.delta is None):
            raise ValueError("give exactly one of keep and delta")
        if self.align < 1:
            raise ValueError("align must be a positive integer")

    @property
    def rule(self) -> Rule:
        """How a ``keep`` budget is shared (:data:`qmpass.plan.allocation.Rule`)."""
        if self.method in _PRUNING:
            return "channels"
        if self.allocation is None:
            return "uniform" if self.method in _UNIFORM else "lagrangian"
        return self.allocation


@dataclass(frozen=True)
class Planned:
    """A plan, the new weights of its steps, and per unit the variant chosen and the
    milder ones to fall back to when verification rejects it."""

    plan: Plan
    tensors: tuple[Mapping[str, np.ndarray], ...]  # the large ones wait on disk
    units: tuple[PlannedUnit, ...]
    candidates: tuple[Candidate, ...] = ()  # every unit the plan chose among


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
    activations of prunable groups' consumers along the channel axis (for ``qmfrg``,
    of groups a convolution produces: the only channels it prunes)."""
    wanted: dict[str, StatsKey] = {}
    if method in ("qmfrg", "whitened", "asvd"):
        for op in extraction.operators:
            if lowrank_declines(op) is None:
                key = input_key(op)
                wanted[key.key] = key
    if method in ("qmfrg", *_PRUNING):
        convs = {op.name for op in extraction.operators if op.op_type == "Conv"}
        for group in groups:
            # qmfrg prunes only convolutions' channels (see _candidates)
            if group.reason is None and (method != "qmfrg" or any(
                    p.node in convs for p in group.producers)):
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
    gains: Mapping[str, float] | None = None,
) -> Planned:
    """Plan ``config`` for a model. ``values`` holds the stored tensors channel groups
    name; ``stats`` the calibration statistics of :func:`stats_requests` (or None).
    Plans of one model that differ only in ``config.convs``, ``keep`` or ``gains`` may
    share a ``memo``: their low-rank and channel-group candidates are the same, and
    computed once. A parallel ``executor``
    (:mod:`qmpass.parallel`) computes the low-rank candidates the plan needs side by side
    first (a Dask cluster reads the weights from the model file ``source``); the plan is
    the same. ``gains`` (by unit key) scale each unit's predicted errors before the
    ``keep`` budget is allocated: what the model's output feels of a unit's own error
    (:mod:`qmpass.compress.sensitivity` measures them); 1 where absent."""
    ops = {op.name: op for op in extraction.operators}
    candidates, declined = unit_candidates(extraction, groups, values, stats, config, memo,
                                           executor, source)
    proposals: list[Proposal] = []  # cross-layer bases (plan/units/crosslayer.py), measured
    if config.method == "qmfrg" and config.crosslayer and config.resource is PARAMS:
        candidates, proposals = crosslayer_candidates(candidates, ops, stats, config.align,
                                                      memo, executor=executor, source=source)
    baseline = Cost.of(ops[n] for n in sorted({n for c in candidates for n in c.operators})
                       if n in ops)
    notes: list[str] = []
    choice = choose(candidates, ops, keep=config.keep, delta=config.delta, rule=config.rule,
                    resource=config.resource, notes=notes, gains=gains or {})
    kept = None
    if config.keep is not None:
        full = full_cost(candidates, ops, config.resource)
        kept = exact_cost(candidates, ops, choice, config.resource) / full if full else 1.0

    steps: list[Step] = []
    tensors: list[Mapping[str, np.ndarray]] = []
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
            tensors.append(Parked(arrays))
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
        shared_bases=crosslayer_outcomes(proposals, steps),
    )
    return Planned(plan, tuple(tensors), tuple(units), tuple(candidates))


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
            key = ("channels", *group.operators)  # plans of one model share the memo
            if key not in memo:
                channel_stats = [
                    None if stats is None else stats.get(_channel_key(group, c.activation).key)
                    for c in group.consumers
                ]
                memo[key] = channel_candidate(group, ops, values, channel_stats, method,
                                              config.align, config.seed, config.resource)
            candidate = memo[key]
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

    whitened = method in ("qmfrg", "whitened", "asvd") and stats is not None

    def op_stats(op: Operator) -> StatsLike | None:
        found = stats.get(input_key(op).key) if whitened and stats is not None else None
        return ActivationScaled(found) if method == "asvd" and found is not None else found

    if executor is not None:
        # the same units as the loops below ask for, computed (side by side when the
        # executor is parallel) into the memo, with a progress bar on a terminal
        needed = {key: task for key, task in _lowrank_units(extraction, ops, taken, method)
                  if key not in memo}
        with tqdm(total=len(needed), desc="low-rank units", unit="unit", disable=None,
                  leave=False) as bar:
            results = executor.map(
                _lowrank_task,
                [(members, op_stats(members[0]), config.align, fused, config.resource)
                 for members, fused in needed.values()],
                source=source, on_done=bar.update,
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

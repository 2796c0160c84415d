"""Cross-layer shared bases: units that read *different* tensors of one width, proposed
by the QM-FRG (:mod:`qmpass.frg.crosslayer`), sharing one input-side basis stored once.

The fit (Basis Sharing, Wang et al., ICLR 2025, adapted to per-operator whitening). The
paper whitens the horizontally stacked weights with one ``S`` from the concatenated
inputs of the layers and takes a joint SVD. Here each member ``i`` reads its own tensor
with covariance ``C_i``, so no single whitening is every member's. What qmpass does:

1. **Basis** from a joint SVD under the *pooled* whitening ``S = C_pool^(1/2)``,
   ``C_pool = mean_t C_t / tr(C_t)`` over the distinct input tensors ``t`` (each tensor
   counts once, whatever its scale), of the stacked members weighted by
   ``1/||W_i S||_F`` (:func:`qmpass.plan.factors.projection`, the shared basis of
   docs/DESIGN.md): ``first`` (``q x d_in``) spans the top-``q`` input directions of the
   group as the pooled data sees them.
2. **Coefficients** per member under its *own* covariance: for that basis ``F``, the
   ``second_i`` minimising ``E||(W_i - second_i F)(x_i - mu_i)||^2`` is the weighted
   least-squares solution ``second_i = W_i C_i F^T (F C_i F^T)^+``, and the bias takes
   the mean of what was cut, ``b_i' = b_i + (W_i - second_i F) mu_i``. So each member is
   optimal for the shared basis on its own data; the basis is a compromise, refined in 3.
3. **Refinement** (:func:`refine`): the pooled basis is only a compromise, so the basis
   and the coefficients are then alternately re-fitted to the summed relative error
   under each member's own covariance (the basis by conjugate gradients on its normal
   equations, the coefficients as in 2), while the error drops.
4. **Error**: member ``i``'s relative output error on the calibration statistics,
   ``tr(D_i C_i D_i^T) / tr(W_i C_i W_i^T)`` with ``D_i = W_i - second_i F``, exact for a
   linear map and the same measure as the per-operator variants' tail energy.

A group's unit offers the separate path (the members' own units along their joint
Lagrangian path, as :func:`~qmpass.plan.units.lowrank.cluster_candidate` walks them)
plus the shared-basis variants that **win**: those below the separate lower hull at
their cost (fewer parameters for the same error). A group none of whose variants wins is
declined with the measured margin. Groups nest (the QM-FRG's average-linkage tree is
walked closest merge first): a merge's separate path walks the units that cover it now
(its two parts, or their parts where a part was declined), so the shared bases its parts
won stay on offer.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from qmpass.algebra import decline_crosslayer_rank, factored_linear_declines, reader_groups
from qmpass.extract import Operator
from qmpass.frg.crosslayer import (
    CROSSLAYER_THRESHOLD,
    CrossLayerMerge,
    crosslayer_graph,
    crosslayer_merges,
)
from qmpass.parallel import Executor
from qmpass.plan.budget import lower_hull
from qmpass.plan.factors import Projection, projection
from qmpass.plan.plan import Cost, Step
from qmpass.plan.units.common import Built, Candidate, StatsLike, Variant, input_key, unchanged
from qmpass.plan.units.lowrank import certificate, cluster_candidate

__all__ = ["Proposal", "crosslayer_candidates", "crosslayer_outcomes", "crosslayer_verified",
           "pooled_projection", "refine", "shared_fit"]


@dataclass(frozen=True)
class Proposal:
    """One QM-FRG group tried as a cross-layer basis: its operators, the mean Bures angle,
    and per rank tried ``(rank, cost, shared error, separate error at that cost)``;
    ``reason`` when it was declined."""

    operators: tuple[str, ...]
    units: int
    bures: float
    measured: tuple[tuple[int, float, float, float], ...] = ()
    reason: str | None = None
    key: str | None = None  # the unit that offers it, when some rank wins


@dataclass(frozen=True)
class SharedFit:
    """The factors of one rank: ``first`` (shared), ``second`` and ``bias`` stacked in
    member order, each member's relative error and its weight and bias changes."""

    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray
    errors: np.ndarray
    changes: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # per member dW, db, radius

    @property
    def certificate(self) -> dict[str, float]:
        """The terms of every member's bound, each the largest over the members: every
        member's output moves by at most ``bound`` (inputs no longer than its own
        radius, which is at most ``radius``)."""
        terms = [certificate(*change) for change in self.changes]
        return {k: max(t[k] for t in terms) for k in terms[0]}


def pooled_projection(members: Sequence[Operator], stats: Sequence[StatsLike]) -> Projection:
    """Step 1 of the module docstring: the members' joint decomposition under the pooled
    whitening (every rank's basis is a leading part of it)."""
    by_tensor = {op.input: np.asarray(s.cov, dtype=np.float64)
                 for op, s in zip(members, stats, strict=True)}
    pooled = np.mean([c / max(float(np.trace(c)), 1e-300) for c in by_tensor.values()],
                     axis=0)
    return projection([op.weight for op in members], pooled)


def shared_fit(members: Sequence[Operator], stats: Sequence[StatsLike], first: np.ndarray
               ) -> SharedFit:
    """Steps 2 and 4 of the module docstring for the basis ``first`` (``q x d_in``):
    each member's least-squares coefficients under its own covariance (``stats[i]``:
    what member ``i`` reads), its bias and its relative error."""
    seconds, biases, errors, deltas = [], [], [], []
    for op, st in zip(members, stats, strict=True):
        cov = np.asarray(st.cov, dtype=np.float64)
        weight = np.asarray(op.weight, dtype=np.float64)
        gram = first @ cov @ first.T  # singular past the numerical rank: the ridge
        ridge = 1e-12 * max(float(np.trace(gram)), 1e-300)  # zeroes those coefficients
        second = scipy.linalg.solve(gram + ridge * np.eye(len(gram)),
                                    first @ cov @ weight.T, assume_a="pos").T
        delta = weight - second @ first
        original = np.zeros(op.shape[0]) if op.bias is None else np.asarray(op.bias)
        bias = original + delta @ np.asarray(st.mean)
        total = float(np.trace(weight @ cov @ weight.T))
        errors.append(float(np.trace(delta @ cov @ delta.T)) / total if total > 0 else 0.0)
        seconds.append(second)
        biases.append(bias)
        deltas.append((delta, bias - original, st.max_norm))
    return SharedFit(first, np.vstack(seconds), np.concatenate(biases),
                     np.clip(np.array(errors), 0.0, None), tuple(deltas))


#: alternating steps of :func:`refine` (each: the basis by conjugate gradients, then
#: every member's coefficients in closed form)
REFINE_STEPS = 8
_CG_STEPS = 20
#: shared ranks tried per group at most (evenly spaced multiples of the alignment)
MAX_RANKS = 16
#: widest input a cross-layer basis is planned for: its fit costs about ``d_in^2`` per
#: rank, member and refinement step (a 2048-wide group of a 1.1B decoder: minutes per
#: rank), and each rank's factors are held until the allocation has chosen
MAX_WIDTH = 1024


def refine(members: Sequence[Operator], stats: Sequence[StatsLike], fit: SharedFit,
           steps: int = REFINE_STEPS) -> SharedFit:
    """Step 3 of the module docstring: alternate between the basis and the coefficients
    to lower the summed relative error under each member's *own* covariance. For fixed
    coefficients ``B_i`` the basis minimising ``sum_i w_i ||(W_i - B_i F) S_i||_F^2``
    (``w_i = 1 / tr(W_i C_i W_i^T)``) solves the linear system
    ``sum_t A_t F C_t = sum_i w_i B_i^T W_i C_i`` with ``A_t = sum_{i reads t} w_i B_i^T B_i``
    (symmetric positive semi-definite in ``F``), solved by scipy's conjugate gradients
    from the current basis; then :func:`shared_fit` gives the coefficients for it. A step
    that does not lower the error ends the refinement, so the result is never worse than
    the pooled fit it starts from."""
    q, d_in = fit.first.shape
    groups = reader_groups(members)
    covs = [np.asarray(stats[g[0]].cov, dtype=np.float64) for g in groups]
    for _ in range(steps):
        rows = np.cumsum([0, *(op.shape[0] for op in members)])
        coeffs = [fit.second[rows[i]:rows[i + 1]] for i in range(len(members))]
        weights = [1.0 / max(float(np.trace(op.weight @ c @ op.weight.T)), 1e-300)
                   for op, c in zip(members, (np.asarray(s.cov) for s in stats), strict=True)]
        lhs = [sum(weights[i] * coeffs[i].T @ coeffs[i] for i in g) for g in groups]
        rhs = sum(weights[i] * coeffs[i].T @ members[i].weight @ covs[t]
                  for t, g in enumerate(groups) for i in g)

        def apply(flat: np.ndarray, lhs: list[np.ndarray] = lhs) -> np.ndarray:
            basis = flat.reshape(q, d_in)
            return sum((a @ basis @ c for a, c in zip(lhs, covs, strict=True)),
                       np.zeros((q, d_in))).ravel()

        operator = scipy.sparse.linalg.LinearOperator((q * d_in, q * d_in), matvec=apply,
                                                      dtype=np.float64)
        first, _ = scipy.sparse.linalg.cg(operator, np.asarray(rhs).ravel(),
                                          x0=fit.first.ravel(), maxiter=_CG_STEPS)
        better = shared_fit(members, stats, first.reshape(q, d_in))
        if not better.errors.sum() < fit.errors.sum() * (1 - 1e-6):
            break
        fit = better
    return fit


def _cost(members: Sequence[Operator], rank: int) -> Cost:
    """Weights and FLOPs per sample of ``members`` through one basis of width ``rank``
    applied once per input tensor (biases as the operators have them)."""
    d_in = members[0].shape[1]
    params = rank * (d_in + sum(op.shape[0] for op in members)) + sum(
        op.shape[0] for op in members if op.bias is not None)
    flops = 0.0
    for group in reader_groups(members):
        vectors = members[group[0]].flops / (2 * members[group[0]].shape[0] * d_in)
        flops += 2 * rank * (d_in + sum(members[i].shape[0] for i in group)) * vectors
    return Cost(params, round(flops))


def _variants(members: Sequence[Operator], stats: Sequence[StatsLike], align: int
              ) -> list[Variant]:
    """The shared-basis variants of ``members``, one per rank that saves both weights and
    work, at most ``MAX_RANKS`` of them: multiples of ``align`` (of a larger multiple
    where ``d_in / align`` would give more ranks)."""
    d_in = members[0].shape[1]
    d_outs = [op.shape[0] for op in members]
    inputs = len(reader_groups(members))
    names = tuple(op.name for op in members)
    before = Cost.of(members)
    out: list[Variant] = []
    proj = pooled_projection(members, stats)
    step = align * max(1, math.ceil(d_in / (MAX_RANKS * align)))
    for rank in range(step, d_in, step):
        if decline_crosslayer_rank(rank, d_in, d_outs, inputs) is not None:
            break
        fit = refine(members, stats, shared_fit(members, stats, proj.factors(rank)[0]))
        after = _cost(members, rank)

        def build(fit: SharedFit = fit, rank: int = rank, after: Cost = after) -> Built:
            step = Step(kind="crosslayer_basis", operators=names, before=before, after=after,
                        predicted_error=float(fit.errors.sum()), rank=rank,
                        certificate=dict(fit.certificate), data_aware=True)
            return [(step, {"first": fit.first, "second": fit.second, "bias": fit.bias})]

        out.append(Variant(float(after.params), float(fit.errors.sum()),
                           float(fit.errors.max()), rank, build))
    return out


def _separate_error(separate: Candidate, cost: float) -> float:
    """The separate path's error at ``cost``, on its lower hull (linear between hull
    points; below its cheapest point, the cheapest point's error)."""
    hull = sorted(lower_hull(separate.unit.options), key=lambda o: o.cost)
    costs = np.array([o.cost for o in hull])
    errors = np.array([o.error for o in hull])
    return float(np.interp(cost, costs, errors, left=errors[0], right=errors[-1]))


#: the last merges proposed: weak references to the operators (the same objects) they
#: were proposed for, the threshold, the merges
_LAST_MERGES: list[tuple[list[list[weakref.ref[Operator]]], float, list[CrossLayerMerge]]] = []


def _merges(units: Sequence[Sequence[Operator]], threshold: float,
            executor: Executor | None = None, source: str | os.PathLike[str] | None = None,
            ) -> list[CrossLayerMerge]:
    """:func:`~qmpass.frg.crosslayer.crosslayer_merges` of ``units``' QM-FRG. The plans of
    one compress (budgets, pricings, treatments of convolutions) ask for the same units'
    merges, and the graph's spectra and Bures angles are most of a plan's cost: the last
    answer is kept for the same operator objects (held weakly) and threshold. ``executor``
    and ``source``: :func:`~qmpass.frg.crosslayer.crosslayer_graph`'s."""
    for seen, at, merges in _LAST_MERGES:
        if at == threshold and [len(u) for u in seen] == [len(u) for u in units] and all(
                ref() is op for refs, unit in zip(seen, units, strict=True)
                for ref, op in zip(refs, unit, strict=True)):
            return merges
    graph = crosslayer_graph([op for unit in units for op in unit], threshold=threshold,
                             executor=executor, source=source)
    merges = crosslayer_merges(graph, [tuple(op.name for op in unit) for unit in units],
                               threshold)
    _LAST_MERGES[:] = [([[weakref.ref(op) for op in unit] for unit in units], threshold,
                        merges)]
    return merges


def crosslayer_candidates(
    candidates: Sequence[Candidate], ops: Mapping[str, Operator],
    stats: Mapping[str, StatsLike] | None, align: int,
    memo: dict[tuple[str, ...], Candidate | None] | None = None,
    threshold: float = CROSSLAYER_THRESHOLD,
    executor: Executor | None = None,
    source: str | os.PathLike[str] | None = None,
) -> tuple[list[Candidate], list[Proposal]]:
    """``candidates`` with the units the QM-FRG groups (and the measurement keeps)
    merged into cross-layer units, and every group tried. Needs calibration statistics
    (the comparison is measured on them): without, nothing changes. ``memo`` (the
    planner's, per alignment) keeps each group's shared-basis variants between plans.
    ``executor`` builds the QM-FRG in parallel (a Dask worker reads the operators from
    ``source``, the model file): the same graph."""
    memo = {} if memo is None else memo
    if stats is None:
        return list(candidates), []
    eligible: dict[tuple[str, ...], Candidate] = {}
    for c in candidates:
        members = [ops[n] for n in c.operators if n in ops]
        if c.group is None and len(members) == len(c.operators) and \
                len({m.input for m in members}) == 1 and \
                members[0].shape[1] <= MAX_WIDTH and \
                all(factored_linear_declines(m) is None
                    and input_key(m).key in stats for m in members):
            eligible[c.operators] = c
    if len(eligible) < 2:
        return list(candidates), []
    alive: dict[tuple[str, ...], Candidate] = dict(eligible)
    proposals: list[Proposal] = []
    for merge in _merges([[ops[n] for n in unit] for unit in eligible], threshold, executor,
                         source):
        # the units now covering the merge: its two parts, or their own parts where a
        # part was declined (the tree is nested, so they partition its operators)
        within = set(merge.operators)
        parts = [unit for unit in alive if within.issuperset(unit)]
        separate = cluster_candidate(None, [alive[unit] for unit in parts])
        assert separate is not None
        members = [ops[n] for n in merge.operators]
        cached = ("crosslayer", *merge.operators)
        if cached not in memo:
            memo[cached] = Candidate(cached[0], merge.operators, (
                unchanged(0.0),
                *_variants(members, [stats[input_key(m).key] for m in members], align)))
        found = memo[cached]
        shared = list(found.variants[1:]) if found is not None else []
        measured = tuple((v.label, v.cost, v.error, _separate_error(separate, v.cost))
                         for v in shared)
        winners = [v for v, m in zip(shared, measured, strict=True) if v.error < m[3]]
        if not winners:
            proposals.append(Proposal(merge.operators, merge.units, merge.bures, measured,
                                      _loss(measured)))
            continue
        key = f"crosslayer:{merge.operators[0]}"
        fused = Candidate(key, merge.operators,
                          (unchanged(separate.variants[0].cost), *winners))
        merged = cluster_candidate(fused, [alive.pop(unit) for unit in parts])
        assert merged is not None
        alive[merge.operators] = replace(merged, key=key)
        proposals.append(Proposal(merge.operators, merge.units, merge.bures, measured,
                                  None, key))
    merged_ops = {n for unit, c in alive.items() if c.key.startswith("crosslayer:")
                  for n in unit}
    out = [c for c in candidates if not merged_ops.intersection(c.operators)]
    out.extend(c for c in alive.values() if c.key.startswith("crosslayer:"))
    return out, proposals


def _loss(measured: Sequence[tuple[int, float, float, float]]) -> str:
    """The declining sentence: by how much sharing lost at its closest rank."""
    if not measured:
        return "no rank of a shared basis saves both weights and work"
    rank, cost, err, sep = min(measured, key=lambda m: m[2] - m[3])
    return (f"a shared basis loses at every rank tried: at its closest (rank {rank}, "
            f"{cost:,.0f} parameters) its calibration error is {err:.4g} against "
            f"{sep:.4g} for the members factorised separately at equal parameters "
            f"(+{err - sep:.4g})")


def crosslayer_outcomes(proposals: Sequence[Proposal], steps: Sequence[Step]
                        ) -> tuple[dict[str, Any], ...]:
    """What became of every proposed group in the planned ``steps``: ``shared`` (with
    its rank and the measured gain over separate factorisation at equal parameters),
    ``not_chosen`` (a rank wins, the budget spent elsewhere) or ``declined`` (with the
    measured loss)."""
    out = []
    for p in proposals:
        row: dict[str, Any] = {"operators": list(p.operators), "units": p.units,
                               "bures": p.bures}
        step = next((s for s in steps if s.kind == "crosslayer_basis"
                     and set(s.operators) == set(p.operators)), None)
        if p.reason is not None:
            row.update(status="declined", reason=p.reason)
        elif step is None:
            row.update(status="not_chosen",
                       reason="a shared basis wins at some ranks, but the budget chose "
                              "other variants of this unit")
        else:
            rank, cost, err, sep = next(m for m in p.measured if m[0] == step.rank)
            row.update(status="shared", rank=rank, params=cost, error=err,
                       separate_error=sep, gain=sep - err)
        row["measured"] = [{"rank": r, "params": c, "error": e, "separate_error": s}
                           for r, c, e, s in p.measured]
        out.append(row)
    return tuple(out)


def crosslayer_verified(bases: Sequence[dict[str, Any]], with_error: float,
                        without_error: float) -> tuple[dict[str, Any], ...]:
    """``bases`` of a plan that verification turned down for the same plan without
    cross-layer bases: the ``shared`` rows become ``not_kept``, saying both held-out
    errors of the model output."""
    out = []
    for row in bases:
        row = dict(row)
        if row["status"] == "shared":
            row.update(status="not_kept", verified_error=with_error,
                       verified_error_without=without_error, reason=(
                f"won on its own units' calibration error, but the model with the "
                f"cross-layer bases verified at a held-out relative error of "
                f"{with_error:.4g} against {without_error:.4g} without them"))
        out.append(row)
    return tuple(out)

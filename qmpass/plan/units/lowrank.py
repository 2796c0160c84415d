"""Low-rank units: one operator factorised at rank ``q``, or operators reading one tensor
(a cluster) sharing a basis or factorised separately.

* low-rank operator: one variant per rank ``q`` (a multiple of ``align``) that saves
  parameters and FLOPs; error = relative tail energy (:mod:`qmpass.plan.factors`).
* cluster: the fused shared-basis variants *and* the members factorised separately (the
  members' own Lagrangian path); the allocation picks whichever loses less for its cost,
  so a shared basis is used where it pays.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from qmpass.extract import Operator
from qmpass.plan.budget import lower_hull
from qmpass.plan.factors import HeldProjection, covariance, projection, stacked_weight
from qmpass.plan.plan import Cost, Step, StepKind
from qmpass.plan.resource import PARAMS, Resource, lowrank_cost
from qmpass.plan.units.common import Built, Candidate, StatsLike, Variant, unchanged
from qmpass.spectral import operator_norm

__all__ = ["certificate", "cluster_candidate", "lowrank_candidate"]


def certificate(delta_w: np.ndarray, delta_b: np.ndarray, radius: float | None,
                minus: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Terms of the sound bound ``R ||W - W'||_op + ||b - b'||`` on one output vector
    (``R``: the largest input norm seen in calibration, when there was calibration);
    ``W - W'`` is ``delta_w``, or ``delta_w - second @ first`` with ``minus``."""
    cert = {"op_norm": operator_norm(delta_w, minus),
            "bias_change": float(np.linalg.norm(delta_b))}
    if radius is not None:
        cert["radius"] = float(radius)
        cert["bound"] = cert["radius"] * cert["op_norm"] + cert["bias_change"]
    return cert


def _biases(ops: Sequence[Operator]) -> np.ndarray:
    return np.concatenate(
        [np.zeros(op.shape[0]) if op.bias is None else np.asarray(op.bias) for op in ops]
    )


def lowrank_candidate(
    members: Sequence[Operator], stats: StatsLike | None, align: int, *, fused: bool,
    resource: Resource = PARAMS,
) -> Candidate | None:
    """Low-rank variants of one operator (``fused=False``, one member) or of a shared
    basis for operators that read one tensor (``fused=True``). None if no rank saves
    parameters and FLOPs (ranks that save them but cost more of ``resource`` stay: the
    allocation never picks them)."""
    # the weights in their stored type: the projection converts a block at a time
    proj = projection([op.stored_weight for op in members],
                      covariance(stats))
    # built later (the chosen rank only): held within a memory budget, else its basis
    # waits on disk (or is computed again, from the statistics, not a covariance held
    # here: it may wait on disk too)
    held = HeldProjection(
        proj,
        lambda: projection([op.stored_weight for op in members],
                           covariance(stats)),
        lambda: stacked_weight([op.stored_weight for op in members]))
    before = Cost.of(members)
    full = min(members[0].shape[1], sum(op.shape[0] for op in members))
    names = tuple(op.name for op in members)
    kind: StepKind = "shared_basis" if fused else "lowrank"

    def build(rank: int) -> Built:
        proj = held.get()
        first, second = proj.factors(rank)  # W' = second @ first, never formed whole
        original = _biases(members)
        bias = original.copy()
        tensors = {"first": first, "second": second}
        if stats is not None:  # the mean of what was cut
            bias += proj.weight @ stats.mean - second @ (first @ stats.mean)
        if stats is not None or any(op.bias is not None for op in members):
            tensors["bias"] = bias
        step = Step(
            kind=kind,
            operators=names,
            before=before,
            after=lowrank_cost(members, rank),
            predicted_error=proj.tail(rank),
            rank=rank,
            certificate=certificate(proj.weight, bias - original,
                                    None if stats is None else stats.max_norm, (second, first)),
            data_aware=stats is not None,
        )
        return [(step, tensors)]

    variants = [unchanged(resource.operators(members))]
    for rank in range(align, full, align):
        cost = lowrank_cost(members, rank)
        if cost.params >= before.params or cost.flops >= before.flops:
            break
        variants.append(
            Variant(
                resource.factorised(members, rank),
                proj.tail(rank),
                float(proj.member_errors(rank).max()),
                rank,
                lambda rank=rank: build(rank),  # type: ignore[misc]
            )
        )
        if rank >= proj.rank:
            break  # lossless from here on: higher ranks only cost more
    if len(variants) == 1:
        return None
    return Candidate(f"{kind}:{names[0]}", names, tuple(variants))


def cluster_candidate(fused: Candidate | None, separate: Sequence[Candidate]) -> Candidate | None:
    """One unit for operators reading one tensor: the shared-basis variants plus the
    members factorised separately, walked along the members' own Lagrangian path (each
    step the cheapest error per saved parameter, as in :mod:`qmpass.plan.budget`)."""
    if not separate:
        return fused
    before = sum(c.variants[0].cost for c in separate)
    variants = list(fused.variants) if fused is not None else [unchanged(before)]
    hulls = [[o.value for o in lower_hull(c.unit.options)] for c in separate]
    at = [0] * len(separate)
    heap = [(_slope(c, h, 0), i) for i, (c, h) in enumerate(zip(separate, hulls, strict=True))
            if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        at[i] += 1
        if at[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, (_slope(separate[i], hulls[i], at[i]), i))
        picks = [c.variants[h[a]] for c, h, a in zip(separate, hulls, at, strict=True)]
        variants.append(
            Variant(
                sum(v.cost for v in picks),
                sum(v.error for v in picks),
                max(v.worst for v in picks),
                -1,
                lambda picks=picks: [s for v in picks for s in v.build()],  # type: ignore[misc]
            )
        )
    names = tuple(n for c in separate for n in c.operators)
    return Candidate(f"cluster:{names[0]}", names, tuple(variants))


def _slope(candidate: Candidate, hull: Sequence[int], at: int) -> float:
    a, b = candidate.variants[hull[at]], candidate.variants[hull[at + 1]]
    saved = a.cost - b.cost
    return (b.error - a.error) / saved if saved > 0 else math.inf


"""The gated low-rank step: one operator (or the members of a shared basis) whose rank is
chosen at run time by a budget level, from factors stored once at the largest rank.

Truncations of one decomposition are nested: the rank-``q`` factors
(:meth:`qmpass.plan.factors.Projection.factors`) are the first ``q`` rows of ``first``
and the first ``q`` columns of ``second`` at any larger rank, whitened or not (the
whitening sits in how ``U`` was found; ``first = U_q^T D W`` and ``second = D^-1 U_q``
are plain slices of ``U``). The bias is not nested: the whitened truncation's
``b' = b + (W - W'_q) mu`` depends on ``q``, so the record holds one bias per level
(``levels x d_out``, a few hundred numbers) and the level picks its row.

Level ``k`` computes

* ``ranks[k] is None`` (the *dense* levels, always a prefix: the budget was loose enough
  to leave the operator as it is): ``y = weight x + biases[k]``, the original map;
* otherwise ``y = second[:, :q] (first[:q] x) + biases[k]`` with ``q = ranks[k]``.

The ranks after the dense prefix never grow, so the largest one is the stored width.
Several members (``sizes``, in output order) read one ``x`` and split the stacked output,
as :class:`~qmpass.algebra.SharedBasisSplit` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qmpass.algebra.records import FactoredLinear
from qmpass.algebra.rules import (
    decline_factors,
    decline_rank,
    factored_linear_declines,
    shared_basis_declines,
)

if TYPE_CHECKING:
    from qmpass.extract.operator import Operator
    from qmpass.plan.plan import Step

__all__ = ["GatedFactors", "gated_declines", "nested_ranks_declines"]

#: how far (relative to the largest entry) a level's factor may differ from the slice of
#: the stored one and still count as that slice: BLAS rounding of the same product
NESTING_TOLERANCE = 1e-9


def gated_declines(members: Sequence[Operator]) -> str | None:
    """The rule of :class:`GatedFactors`: one MatMul/Gemm that a low-rank factorisation
    takes, or members that a shared basis takes. Convolutions are not gated."""
    if len(members) == 1:
        return factored_linear_declines(members[0])
    return shared_basis_declines(members)


def nested_ranks_declines(ranks: Sequence[int | None], d_in: int,
                          d_outs: Sequence[int]) -> str | None:
    """Why per-level ``ranks`` cannot be one gated step (None if they can): dense levels
    (None) first, then ranks that never grow, each saving weights and FLOPs."""
    factored = [q for q in ranks if q is not None]
    if not factored:
        return "every level leaves the operator dense; nothing to gate"
    if any(q is None for q in ranks[len(ranks) - len(factored):]):
        return "the dense levels must come first (a lower budget never restores an operator)"
    if any(b > a for a, b in itertools.pairwise(factored)):
        return f"the ranks {factored} grow from one level to the next; they must be nested"
    for q in factored:
        reason = decline_rank(q, d_in, d_outs)
        if reason is not None:
            return reason
    return None


@dataclass(frozen=True, eq=False)
class GatedFactors:
    """Factors at the largest rank, the rank of each level (None: dense), one bias per
    level, the dense weight (needed when some level is dense) and the members' widths."""

    first: np.ndarray  # r x d_in
    second: np.ndarray  # sum(sizes) x r
    ranks: tuple[int | None, ...]  # per level
    biases: np.ndarray  # levels x sum(sizes)
    weight: np.ndarray | None  # sum(sizes) x d_in, the original map; None: no dense level
    sizes: tuple[int, ...]

    @staticmethod
    def declines(members: Sequence[Operator]) -> str | None:
        return gated_declines(members)

    @classmethod
    def of(cls, members: Sequence[Operator],
           levels: Sequence[tuple[Step, Mapping[str, np.ndarray]] | None]) -> GatedFactors:
        """The record of ``members`` (output order) from each level's planned step and
        tensors (None at a dense level). ``ValueError`` when the ranks are not nested, a
        level's tensors do not fit, or a level's factors are not the slice of the
        largest rank's (then one stored pair cannot serve every level)."""
        sizes = tuple(op.shape[0] for op in members)
        d_in, d_out = members[0].shape[1], sum(sizes)
        ranks = tuple(None if level is None else level[0].rank for level in levels)
        reason = nested_ranks_declines(ranks, d_in, sizes)
        if reason is not None:
            raise ValueError(f"cannot gate {', '.join(op.name for op in members)}: {reason}")
        original = np.concatenate([np.zeros(op.shape[0]) if op.bias is None
                                   else np.asarray(op.bias, dtype=np.float64) for op in members])
        widest = next(level for level in levels if level is not None)
        first = np.asarray(widest[1]["first"], dtype=np.float64)
        second = np.asarray(widest[1]["second"], dtype=np.float64)
        biases = []
        for level in levels:
            if level is None:
                biases.append(original)
                continue
            step, tensors = level
            q = step.rank
            assert q is not None
            why = decline_factors(tensors, q, d_in, d_out, needs_bias=False)
            if why is None and not (_is_slice(tensors["first"], first[:q])
                                    and _is_slice(tensors["second"], second[:, :q])):
                why = (f"its rank-{q} factors are not the first {q} directions of the "
                       f"rank-{first.shape[0]} ones (not nested)")
            if why is not None:
                raise ValueError(f"cannot gate {', '.join(op.name for op in members)}: {why}")
            bias = tensors.get("bias")
            biases.append(original if bias is None else np.asarray(bias, dtype=np.float64))
        weight = (np.vstack([np.asarray(op.weight, dtype=np.float64) for op in members])
                  if ranks[0] is None else None)
        return cls(first, second, ranks, np.vstack(biases), weight, sizes)

    @property
    def levels(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """The stored width (the largest rank of any level)."""
        return int(self.first.shape[0])

    @property
    def dense_levels(self) -> int:
        """How many levels (the first ones) leave the operator dense."""
        return sum(q is None for q in self.ranks)

    def at(self, level: int) -> FactoredLinear:
        """The stacked map level ``level`` computes (a dense level as ``second = I``)."""
        q = self.ranks[level]
        if q is None:
            assert self.weight is not None
            return FactoredLinear(self.weight, np.eye(self.weight.shape[0]), self.biases[level])
        return FactoredLinear(self.first[:q], self.second[:, :q], self.biases[level])

    def __call__(self, x: np.ndarray, level: int) -> np.ndarray:
        """The stacked output of level ``level`` on the rows of ``x``."""
        return self.at(level)(x)


def _is_slice(array: np.ndarray, stored: np.ndarray) -> bool:
    array = np.asarray(array, dtype=np.float64)
    if array.shape != stored.shape:
        return False
    scale = max(float(np.abs(stored).max(initial=0.0)), 1.0)
    return bool(np.abs(array - stored).max(initial=0.0) <= NESTING_TOLERANCE * scale)

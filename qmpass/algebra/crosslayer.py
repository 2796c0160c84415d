"""The record of a cross-layer shared basis: one input-side basis for operators that read
*different* tensors of one width (Basis Sharing, Wang et al., ICLR 2025).

Members ``i = 1..n`` map rows ``x_i`` (each its own tensor, ``d_in`` wide; several
members may read one tensor) to ``y_i = W_i x_i + b_i``. The record replaces every
``W_i`` by ``second_i @ first``: ``first`` (``q x d_in``) is stored once and is the same
for every member, ``second_i`` (``d_out_i x q``) are the member's own coefficients. In
the row form the ONNX printer uses, ``y_i = (x_i V) C_i + b_i`` with ``V = first^T``
(``d_in x q``, one initializer) and ``C_i = second_i^T``. Members that read one tensor
are printed as one ``x V`` and a fused second factor with a ``Split``
(:class:`SharedBasisSplit` for that tensor), so ``x V`` is computed once per tensor.

Stored parameters: ``q d_in + sum_i q d_out_i`` (plus the biases), against
``sum_i d_in d_out_i``. Work per input vector of tensor ``t``: ``q d_in`` once, then
``q d_out_i`` per member reading it. The rule is
:func:`~qmpass.algebra.rules.crosslayer_basis_declines`; the tensors are those of a
shared basis (``first``, the stacked ``second`` and ``bias`` in member order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qmpass.algebra.records import FactoredLinear, SharedBasisSplit
from qmpass.algebra.rules import crosslayer_basis_declines, decline_factors

if TYPE_CHECKING:
    from qmpass.extract.operator import Operator
    from qmpass.plan.plan import Step

__all__ = ["CrossLayerBasis", "reader_groups"]


def reader_groups(members: Sequence[Operator]) -> tuple[tuple[int, ...], ...]:
    """Indices of ``members`` grouped by the tensor they read, in order of first reading."""
    groups: dict[str, list[int]] = {}
    for index, op in enumerate(members):
        groups.setdefault(op.input, []).append(index)
    return tuple(tuple(g) for g in groups.values())


@dataclass(frozen=True, eq=False)
class CrossLayerBasis:
    """One basis ``first`` shared by members reading different tensors; per member its
    rows of ``second`` and ``bias`` (see the module docstring)."""

    first: np.ndarray  # q x d_in, stored once
    second: np.ndarray  # sum(sizes) x q, members stacked in step order
    bias: np.ndarray | None  # sum(sizes)
    sizes: tuple[int, ...]  # d_out_i
    readers: tuple[tuple[int, ...], ...]  # member indices per input tensor

    @staticmethod
    def declines(members: Sequence[Operator]) -> str | None:
        return crosslayer_basis_declines(members)

    @classmethod
    def of(cls, step: Step, members: Sequence[Operator], tensors: Mapping[str, np.ndarray]
           ) -> CrossLayerBasis:
        """The record of a ``crosslayer_basis`` step of ``members`` (in step order);
        ``ValueError`` when the members or the tensors do not fit."""
        reason = crosslayer_basis_declines(members)
        sizes = tuple(op.shape[0] for op in members)
        if reason is None:
            reason = decline_factors(tensors, step.rank, members[0].shape[1], sum(sizes),
                                     needs_bias=any(op.bias is not None for op in members))
        if reason is not None:
            raise ValueError(f"cannot build the {step.kind} of {', '.join(step.operators)}: "
                             f"{reason}")
        bias = tensors.get("bias")
        return cls(np.asarray(tensors["first"]), np.asarray(tensors["second"]),
                   None if bias is None else np.asarray(bias), sizes, reader_groups(members))

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    def _rows(self, index: int) -> slice:
        lo = int(sum(self.sizes[:index]))
        return slice(lo, lo + self.sizes[index])

    def member(self, index: int) -> FactoredLinear:
        """Member ``index``'s own map ``second_i (first x) + b_i``."""
        rows = self._rows(index)
        return FactoredLinear(self.first, self.second[rows],
                              None if self.bias is None else self.bias[rows])

    def reader(self, group: int) -> SharedBasisSplit:
        """The members reading the ``group``-th tensor as one fused map with a split
        (the basis is the shared ``first``)."""
        members = [self.member(i) for i in self.readers[group]]
        bias = None if self.bias is None else np.concatenate(
            [m.bias for m in members if m.bias is not None])
        return SharedBasisSplit(self.first, np.vstack([m.second for m in members]), bias,
                                tuple(self.sizes[i] for i in self.readers[group]))

    @property
    def stored(self) -> int:
        """Weights stored (biases excluded): ``q d_in + q sum_i d_out_i``."""
        return int(self.first.size + self.second.size)

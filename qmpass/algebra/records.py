"""What a rewritten operator *is*, in matrix terms: one frozen record per rewrite kind.

Each record is built from a planned :class:`~qmpass.plan.Step` and its tensors (matrix
views, float64, made by :mod:`qmpass.plan.factors`) and says what the backends print;
``declines`` is its rule (:mod:`qmpass.algebra.rules`). Activations are rows ``x``
(``d_in``) of the operator's input, as in :class:`~qmpass.extract.Operator`.

* :class:`FactoredLinear` (a MatMul pair): ``y' = second (first x) + bias`` with
  ``first`` ``q x d_in`` and ``second`` ``d_out x q``; ``second @ first`` replaces the
  ``d_out x d_in`` matrix view.
* :class:`FactoredConv` (a conv pair): the same product for a Conv's view
  (``Cout x Cin*prod(kernel)``), as convolutions: ``first`` as ``q`` thin filters
  ``(q, Cin, *kernel)`` with the operator's geometry, then a 1x1 convolution
  ``second`` ``(Cout, q, 1, ...)`` and the bias. The reshape from matrix rows (input
  channel, then kernel positions) to kernels happens here, once.
* :class:`SharedBasisSplit` (a shared basis with a split): members ``y_i = W_i x + b_i``
  reading one ``x``, stacked ``W = [W_1; ...; W_n]``; ``first`` is the shared basis
  (``q x d_in``), ``second`` the fused coefficients (``sum d_out_i x q``), ``bias`` the
  stacked biases, and the output splits into ``sizes`` on the last axis.
* :class:`PrunedGroup` (a pruned channel group with its compensation): the ``kept``
  channels of ``C`` and, per consumer, the least-squares map ``x ~= M x_kept + s``.
  Producers keep their ``kept`` output rows; a consumer reading the group at
  ``[offset, offset + C)`` on an input axis gets ``W_g M`` there (its ``kept`` slices
  without ``M``) and ``W_g s`` summed over kernel taps on its bias, since
  ``W x = (W M) x_kept + W s``. Prune steps compose (a consumer of one group is often
  the producer of the next), so the record edits the weights it is given, the current
  ones, rather than holding a copy of the original ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qmpass.algebra.fold import conv_kernel
from qmpass.algebra.rules import (
    decline_compensation,
    decline_factors,
    decline_kept,
    factored_conv_declines,
    factored_linear_declines,
    shared_basis_declines,
)

if TYPE_CHECKING:
    from qmpass.extract.channels import ChannelGroup
    from qmpass.extract.operator import ConvGeometry, Operator
    from qmpass.plan.plan import Step

__all__ = ["Compensation", "FactoredConv", "FactoredLinear", "PrunedGroup", "SharedBasisSplit"]

StepTensors = Mapping[str, np.ndarray]


def _factors(step: Step, d_in: int, d_out: int, needs_bias: bool, tensors: StepTensors
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    reason = decline_factors(tensors, step.rank, d_in, d_out, needs_bias=needs_bias)
    if reason is not None:
        raise ValueError(f"cannot build the {step.kind} of {', '.join(step.operators)}: "
                         f"{reason}")
    bias = tensors.get("bias")
    return (np.asarray(tensors["first"]), np.asarray(tensors["second"]),
            None if bias is None else np.asarray(bias))


@dataclass(frozen=True, eq=False)
class FactoredLinear:
    """``y' = second (first x) + bias`` (see the module docstring)."""

    first: np.ndarray  # q x d_in
    second: np.ndarray  # d_out x q
    bias: np.ndarray | None  # d_out

    @staticmethod
    def declines(op: Operator) -> str | None:
        return factored_linear_declines(op)

    @classmethod
    def of(cls, step: Step, op: Operator, tensors: StepTensors) -> FactoredLinear:
        """The record of a ``lowrank`` step of ``op``; ``ValueError`` when the tensors do
        not fit (:func:`~qmpass.algebra.decline_factors` says why)."""
        d_out, d_in = op.shape
        return cls(*_factors(step, d_in, d_out, op.bias is not None, tensors))

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    @property
    def matrix(self) -> np.ndarray:
        """The ``d_out x d_in`` matrix that replaces the operator's view."""
        return self.second @ self.first

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The rewritten map on the rows of ``x`` (last axis ``d_in``)."""
        y = (x @ self.first.T) @ self.second.T
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True, eq=False)
class FactoredConv:
    """A thin convolution ``first`` with the operator's geometry, a 1x1 convolution
    ``second``, then ``bias`` per output channel (see the module docstring)."""

    first: np.ndarray  # (q, Cin, *kernel)
    second: np.ndarray  # (Cout, q, 1, ...)
    bias: np.ndarray | None  # (Cout,)
    geometry: ConvGeometry

    @staticmethod
    def declines(op: Operator) -> str | None:
        return factored_conv_declines(op)

    @classmethod
    def of(cls, step: Step, op: Operator, tensors: StepTensors) -> FactoredConv:
        """The record of a ``lowrank`` step of the Conv ``op``; ``ValueError`` when the
        operator is not an ungrouped Conv or the tensors do not fit."""
        geometry = op.geometry
        if geometry is None or geometry.groups != 1:
            raise ValueError(f"cannot rewrite '{op.name}': not an ungrouped Conv")
        d_out, d_in = op.shape
        first, second, bias = _factors(step, d_in, d_out, op.bias is not None, tensors)
        kernel = tuple(geometry.kernel_shape)
        q = first.shape[0]
        return cls(conv_kernel(first, kernel), second.reshape(d_out, q, *((1,) * len(kernel))),
                   bias, geometry)

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    @property
    def linear(self) -> FactoredLinear:
        """The same record on the matrix view (one receptive field per row)."""
        return FactoredLinear(self.first.reshape(self.rank, -1),
                              self.second.reshape(self.second.shape[0], self.rank), self.bias)


@dataclass(frozen=True, eq=False)
class SharedBasisSplit:
    """One basis, one fused second factor, stacked biases, then a split of the last
    axis into the members' widths ``sizes`` (see the module docstring)."""

    first: np.ndarray  # q x d_in
    second: np.ndarray  # sum(sizes) x q
    bias: np.ndarray | None  # sum(sizes)
    sizes: tuple[int, ...]

    @staticmethod
    def declines(members: Sequence[Operator]) -> str | None:
        return shared_basis_declines(members)

    @classmethod
    def of(cls, step: Step, members: Sequence[Operator], tensors: StepTensors
           ) -> SharedBasisSplit:
        """The record of a ``shared_basis`` step of ``members`` (in output order)."""
        sizes = tuple(op.shape[0] for op in members)
        needs_bias = any(op.bias is not None for op in members)
        first, second, bias = _factors(step, members[0].shape[1], sum(sizes), needs_bias,
                                       tensors)
        return cls(first, second, bias, sizes)

    @property
    def fused(self) -> FactoredLinear:
        """The stacked map, before the split."""
        return FactoredLinear(self.first, self.second, self.bias)

    @property
    def split_points(self) -> tuple[int, ...]:
        """Where the fused output is cut (the cumulative sizes but the last)."""
        return tuple(int(c) for c in np.cumsum(self.sizes)[:-1])

    def member(self, index: int) -> FactoredLinear:
        """Member ``index``'s own map: its rows of ``second`` and ``bias``."""
        lo = ([0, *self.split_points])[index]
        hi = lo + self.sizes[index]
        return FactoredLinear(self.first, self.second[lo:hi],
                              None if self.bias is None else self.bias[lo:hi])


@dataclass(frozen=True)
class Compensation:
    """A consumer's least-squares view of the pruned group: ``x ~= mix x_kept + shift``
    (``mix`` ``C x k``, ``shift`` ``C``; either may be absent)."""

    mix: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class PrunedGroup:
    """Keep ``kept`` of the ``channels`` of one group; compensate consumers by node name
    (see the module docstring)."""

    channels: int
    kept: np.ndarray  # sorted int64 indices into 0..channels-1
    compensations: Mapping[str, Compensation]

    @staticmethod
    def declines(step: Step, group: ChannelGroup) -> str | None:
        """The rule of a prune step: the group may be pruned, the step fits it and keeps a
        valid, non-empty set of its channels."""
        if group.reason is not None:
            return f"channel group '{group.name}' is pinned: {group.reason}"
        if step.channels is not None and step.channels != group.channels:
            return (f"the step prunes {step.channels} channels, group '{group.name}' has "
                    f"{group.channels}")
        return decline_kept(step.kept, group.channels)

    @staticmethod
    def declines_tensors(step: Step, group: ChannelGroup, tensors: StepTensors) -> str | None:
        """Why the compensation tensors ``mix:N``/``shift:N`` do not fit the group."""
        return decline_compensation(step, [c.node for c in group.consumers], group.channels,
                                    tensors)

    @classmethod
    def of(cls, step: Step, group: ChannelGroup, tensors: StepTensors) -> PrunedGroup:
        """The record of a prune step on ``group``; ``ValueError`` if it does not fit."""
        reason = cls.declines(step, group) or cls.declines_tensors(step, group, tensors)
        if reason is not None:
            raise ValueError(f"cannot prune group '{group.name}': {reason}")

        def get(key: str) -> np.ndarray | None:
            value = tensors.get(key)
            return None if value is None else np.asarray(value, dtype=np.float64)

        compensations = {c.node: Compensation(get(f"mix:{c.node}"), get(f"shift:{c.node}"))
                         for c in group.consumers}
        return cls(group.channels, np.asarray(step.kept, dtype=np.int64), compensations)

    @property
    def selection(self) -> np.ndarray:
        """The ``k x C`` matrix that picks the kept channels: ``x_kept = P x``."""
        select = np.zeros((len(self.kept), self.channels))
        select[np.arange(len(self.kept)), self.kept] = 1.0
        return select

    def indices(self, size: int, offset: int = 0) -> np.ndarray:
        """Indices along an axis of ``size`` holding the group at ``[offset, offset + C)``:
        everything outside the group's block stays."""
        return np.concatenate([np.arange(offset), offset + self.kept,
                               np.arange(offset + self.channels, size)])

    def keep(self, array: np.ndarray, axis: int, offset: int = 0) -> np.ndarray:
        """``array`` with only the kept channels of the group's block on ``axis``: a
        producer's output rows, its bias, folded BatchNorm parameters, depthwise filters."""
        return np.take(array, self.indices(array.shape[axis], offset), axis=axis)

    def consumer(self, node: str, weight: np.ndarray, axis: int, offset: int = 0
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """A consumer's new weight and the change of its bias.

        ``weight`` has the consumer's input channels on ``axis`` (the group at
        ``[offset, offset + C)``) and its outputs on the first other axis, then any
        kernel taps. Returns ``W'`` (the group's slice ``W_g`` replaced by ``W_g M``, or
        by its kept slices without ``M``) and ``W_g s`` summed over the taps, one value
        per output (None without ``s``). For a Conv the bias change is exact except
        where zero padding at the borders drops taps."""
        comp = self.compensations.get(node, Compensation())
        rows = np.moveaxis(weight.astype(np.float64), axis, 0)  # input channels first
        block = rows[offset:offset + self.channels]
        if comp.mix is None:
            new = self.keep(weight, axis, offset)
        else:  # W'[o, j, ...] = sum_c W[o, c, ...] M[c, j]
            mixed = np.tensordot(comp.mix, block, axes=([0], [0]))  # M^T W_g: k x rest
            new = np.moveaxis(
                np.concatenate([rows[:offset], mixed, rows[offset + self.channels:]], axis=0),
                0, axis)
        if comp.shift is None:
            return new, None
        delta = np.tensordot(comp.shift, block, axes=([0], [0]))  # outputs, then taps
        return new, delta.reshape(delta.shape[0], -1).sum(axis=1)

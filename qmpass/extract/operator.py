"""Records produced by extraction: one :class:`Operator` per weight-bearing node.

An operator is seen as the affine map ``y = W x + b`` that it applies to one input vector:

* MatMul / Gemm with a constant right operand: ``x`` is a row of the activation,
  ``W`` is ``d_out x d_in`` (the transpose of the ONNX ``B``, after ``transB``/``alpha``);
  with a constant *left* operand, ``x`` is a column of the activation.
* Conv: ``x`` is one receptive field (``Cin/groups * prod(kernel)`` values per group);
  ``W`` is the block-diagonal matrix of the per-group ``Cout/groups x Cin/groups*k``
  blocks, so its singular values are those of all groups together.
* ConvTranspose: the adjoint of a convolution; ``W`` maps the ``Cin`` channels of one
  input pixel to ``Cout * prod(kernel)`` output values (block-diagonal over groups) and
  the bias is repeated over the kernel positions.

A ``BatchNormalization`` that alone consumes a Conv's output is folded into ``W`` and
``b`` (``scale = gamma / sqrt(var + eps)``), as inference engines do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qmpass.extdata import ConvertedArray, LazyArray
from qmpass.spill import ArrayField

__all__ = ["ConvGeometry", "Operator", "Skipped"]


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a Conv/ConvTranspose, with ONNX defaults filled in."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int
    auto_pad: str = "NOTSET"


@dataclass(frozen=True, eq=False)
class Operator:
    """One weight-bearing node, as an affine map ``y = W x + b`` (see module docstring).

    ``weight`` and ``bias`` are read-only float64 arrays of the (folded) constants.
    ``params`` counts the values the node (and a folded BatchNormalization) stores in
    ONNX, not the zeros of the block-diagonal view; ``flops`` is 2 x MACs for one sample
    at the reference shapes (dynamic dimensions taken as 1).
    """

    name: str
    op_type: str
    graph: str
    input: str
    output: str
    weight_name: str
    weight_source: str
    weight: np.ndarray  # an array or a LazyArray: see ArrayField, installed below
    bias: np.ndarray | None
    bias_source: str | None
    flops: int
    params: int
    geometry: ConvGeometry | None = None
    weight_side: str = "right"
    folded_batchnorm: str | None = None
    notes: tuple[str, ...] = field(default=())
    #: the activation is read transposed (a Gemm with ``transA=1`` and its weight on the
    #: right, or ``transB=1`` with it on the left): its vectors are columns, not rows
    transposed_input: bool = False
    #: a Gemm's C that is not a constant per-output vector: it is not part of ``b``, so
    #: ``W x + b`` is not the node's whole output (rewrites and lowering leave it alone)
    unfolded_bias: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the matrix view (without reading a lazy weight)."""
        stored = self.__dict__["_weight"]
        rows, cols = stored.shape
        return int(rows), int(cols)

    @property
    def stored_weight(self) -> np.ndarray:
        """``weight``'s values in the type the model stores them in (float32, float16;
        an external tensor as a memory map), not converted to float64, where extraction
        holds the weight so (:class:`~qmpass.extdata.HeldArray`,
        :class:`~qmpass.extdata.LazyArray`, unscaled); otherwise ``weight`` itself. For
        products that convert a block at a time (:mod:`qmpass.plan.factors`): VGG's first
        FC layer is 0.41 GB stored and 0.82 GB converted."""
        held = self.__dict__["_weight"]
        view = held.stored_view() if isinstance(held, ConvertedArray) else None
        return self.weight if view is None else view

    @property
    def lazy(self) -> bool:
        """Whether the weight is read from the model's files each time it is used."""
        return isinstance(self.__dict__["_weight"], LazyArray)

    @property
    def in_subgraph(self) -> bool:
        return "/" in self.graph


setattr(Operator, "weight", ArrayField("weight"))  # noqa: B010  (after the dataclass is made)


@dataclass(frozen=True)
class Skipped:
    """A node that looks weight-bearing but was not analysed, and why."""

    name: str
    op_type: str
    graph: str
    reason: str

"""The rewrite algebra, once, in numpy: what a rewritten operator *is*.

Every rewrite kind is a small frozen record (:mod:`qmpass.algebra.records`) built from a
planned :class:`~qmpass.plan.Step` and its tensors, together with its precondition
``declines(operator) -> reason | None`` (:mod:`qmpass.algebra.rules`) that the planner,
the ONNX rewriters (:mod:`qmpass.rewrite`), the Relax pass (:mod:`qmpass.tvm`) and
``qmpass lower`` all consult. The backends only *print* records into their IR (nodes,
Relax calls, kernels): the factors, conv kernels, compensations and biases are computed
here, so both IRs compute the same function by construction.

Nothing here imports onnx, onnx-graphsurgeon or TVM.
"""

from qmpass.algebra.crosslayer import CrossLayerBasis, reader_groups
from qmpass.algebra.fold import conv_kernel, fold_batchnorm
from qmpass.algebra.gated import GatedFactors, gated_declines, nested_ranks_declines
from qmpass.algebra.records import (
    Compensation,
    FactoredConv,
    FactoredLinear,
    PrunedGroup,
    SharedBasisSplit,
)
from qmpass.algebra.rules import (
    crosslayer_basis_declines,
    decline_crosslayer_rank,
    decline_factors,
    decline_kept,
    decline_rank,
    factored_conv_declines,
    factored_linear_declines,
    lowrank_declines,
    lowrank_record,
    row_linear_declines,
    shared_basis_declines,
    subgraph_declines,
)

__all__ = [
    "Compensation",
    "CrossLayerBasis",
    "FactoredConv",
    "FactoredLinear",
    "GatedFactors",
    "PrunedGroup",
    "SharedBasisSplit",
    "conv_kernel",
    "crosslayer_basis_declines",
    "decline_crosslayer_rank",
    "decline_factors",
    "decline_kept",
    "decline_rank",
    "factored_conv_declines",
    "factored_linear_declines",
    "fold_batchnorm",
    "gated_declines",
    "lowrank_declines",
    "lowrank_record",
    "nested_ranks_declines",
    "reader_groups",
    "row_linear_declines",
    "shared_basis_declines",
    "subgraph_declines",
]

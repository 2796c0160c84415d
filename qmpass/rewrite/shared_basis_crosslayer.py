"""One input-side basis stored once for MatMul/Gemm operators that read *different*
tensors of one width (a cross-layer shared basis, Basis Sharing, ICLR 2025).

Member ``i`` maps rows ``x_i`` to ``y_i = W_i x_i + b_i``; the planner replaces ``W_i`` by
``second_i @ first`` with one ``first`` (``q x d_in``) for all members. The graph gets one
initializer ``V = first^T`` (``d_in x q``), consumed by one MatMul per input tensor:

    x_t -> MatMul(V) -> MatMul(C_i) -> Add(b_i) -> y_i              (one member reads x_t)
    x_t -> MatMul(V) -> MatMul([C_i ...]) -> Add -> Split -> y_i... (several read x_t)

with ``C_i = second_i^T``. Stored weights: ``q d_in + q sum_i d_out_i`` instead of
``sum_i d_in d_out_i``. The algebra and the rule are
:class:`qmpass.algebra.CrossLayerBasis`'s; this module prints it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qmpass.algebra import (
    CrossLayerBasis,
    FactoredLinear,
    decline_crosslayer_rank,
    reader_groups,
)
from qmpass.extract import Operator
from qmpass.plan.plan import Step, StepKind
from qmpass.rewrite.base import (
    StepTensors,
    add_node,
    detach_output,
    new_constant,
    unique_name,
    weight_dtype,
)
from qmpass.rewrite.shared_basis import SharedBasis, split_outputs

__all__ = ["CrossLayerSharedBasis"]


class CrossLayerSharedBasis(SharedBasis):
    """Replace MatMul/Gemm operators reading different tensors by one shared basis
    ``V`` (one initializer) and per-operator coefficients.

    ``step.operators`` are the members (the order of ``second`` and ``bias``),
    ``step.rank`` the width q of the basis. Tensors (matrix views, float64): ``"first"``
    (``q x d_in``), ``"second"`` (``sum d_out_i x q``) and ``"bias"`` (``sum d_out_i``),
    the last required when any member has a bias; they become a
    :class:`~qmpass.algebra.CrossLayerBasis`, whose rule says which members are taken.
    The checks are :class:`~qmpass.rewrite.shared_basis.SharedBasis`'s with this rule
    and :func:`~qmpass.algebra.decline_crosslayer_rank`.
    """

    kind: ClassVar[StepKind] = "crosslayer_basis"
    what: ClassVar[str] = "cross-layer shared basis"

    @staticmethod
    def declines(members: Sequence[Operator]) -> str | None:
        return CrossLayerBasis.declines(members)

    @staticmethod
    def decline_rank(rank: int | None, members: Sequence[Operator]) -> str | None:
        return decline_crosslayer_rank(rank, members[0].shape[1],
                                       [op.shape[0] for op in members],
                                       len(reader_groups(members)))

    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        members = [ops[name] for name in step.operators]
        record = CrossLayerBasis.of(step, members, tensors)
        dtype = weight_dtype(graph, members[0])
        base = f"{members[0].name}/crosslayer_basis"
        basis = new_constant(graph, f"{base}/V", record.first.T, dtype)  # stored once
        for group, readers in enumerate(record.readers):
            first = members[readers[0]]
            x = graph.tensors()[first.input]
            outputs = [detach_output(graph, members[i].output) for i in readers]
            hidden = gs.Variable(unique_name(graph, f"{first.name}/crosslayer_hidden"),
                                 dtype=dtype)
            add_node(graph, "MatMul", f"{first.name}/crosslayer_MatMul_basis", [x, basis],
                     [hidden])
            shared = record.reader(group)
            if len(readers) == 1:
                _coefficients(graph, first.name, hidden, outputs[0], shared.member(0), dtype)
            else:
                fused = gs.Variable(unique_name(graph, f"{first.name}/crosslayer_fused"),
                                    dtype=dtype)
                _coefficients(graph, first.name, hidden, fused, shared.fused, dtype)
                split_outputs(graph, f"{first.name}/crosslayer", fused, outputs, shared.sizes)


def _coefficients(graph: gs.Graph, name: str, hidden: gs.Tensor, output: gs.Variable,
                  record: FactoredLinear, dtype: np.dtype) -> None:
    """``hidden -> MatMul(second^T) [-> Add(bias)] -> output`` (``first`` is the basis
    already applied)."""
    second_t = new_constant(graph, f"{name}/crosslayer_C", record.second.T, dtype)
    if record.bias is None:
        add_node(graph, "MatMul", f"{name}/crosslayer_MatMul_C", [hidden, second_t], [output])
        return
    product = gs.Variable(unique_name(graph, f"{name}/crosslayer_product"), dtype=dtype)
    add_node(graph, "MatMul", f"{name}/crosslayer_MatMul_C", [hidden, second_t], [product])
    bias = new_constant(graph, f"{name}/crosslayer_bias", record.bias, dtype)
    add_node(graph, "Add", f"{name}/crosslayer_Add_bias", [product, bias], [output])

"""Low-rank factorisation of a MatMul or Gemm: ``y = W x + b`` becomes ``y' = B (A x) + b``.

The planner replaces the ``d_out x d_in`` matrix view ``W`` of an operator by the product
``second @ first`` of ``first`` (``q x d_in``) and ``second`` (``d_out x q``); for a
truncated SVD ``W = U S V^T`` that is e.g. ``first = S_q V_q^T``, ``second = U_q``. A row
``x`` of the activation then maps as

    y' = second (first x) + b  =  x @ first^T @ second^T + b

ONNX MatMul multiplies the activation from the left, hence the transposes: the rewrite
stores ``first^T`` (``d_in x q``) and ``second^T`` (``q x d_out``) and emits
``x -> MatMul -> MatMul [-> Add(bias)] -> op.output``. MatMul broadcasts over leading
dimensions, so N-D activations (batch, tokens, d_in) and dynamic batch sizes need nothing
more. A Gemm (2-D input, ``transA=0``) becomes the same chain: its ``alpha``, ``beta``
and ``transB`` are folded into the matrix view by extraction already.

Error: ``||y - y'|| = ||(W - second first) x|| <= ||W - second first||_op ||x||``, which
is ``sigma_{q+1}`` for the truncated SVD (docs/DESIGN.md, "The math"). Cost per input vector:
``q (d_in + d_out)`` weights and multiply-adds instead of ``d_in d_out``; a rank that
does not make both smaller is declined.

The algebra is :class:`qmpass.algebra.FactoredLinear` (and its rule); this module prints
it. The printer :func:`matmul_pair` is shared with :mod:`qmpass.rewrite.shared_basis`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qmpass.algebra import FactoredLinear
from qmpass.extract import Operator
from qmpass.plan.plan import Step
from qmpass.rewrite.base import (
    OperatorFactorisation,
    StepTensors,
    add_node,
    detach_output,
    new_constant,
    unique_name,
    weight_dtype,
)

__all__ = ["LowRankMatMul", "matmul_pair"]


class LowRankMatMul(OperatorFactorisation):
    """Replace one MatMul/Gemm (with its bias ``Add``) by two thinner MatMuls and an Add.

    ``step.operators`` is one operator, ``step.rank`` the inner width q. Tensors (matrix
    views, float64): ``"first"`` (``q x d_in``), ``"second"`` (``d_out x q``) and
    ``"bias"`` (``d_out``), the last required when the operator has a bias; they become
    a :class:`~qmpass.algebra.FactoredLinear`, whose rule says which operators are taken.
    Belongs before any fusion of the model's MatMuls (e.g. Relax
    ``CombineParallelMatmul``), after extraction named the nodes
    (:func:`qmpass.rewrite.base.name_nodes`).
    """

    record: ClassVar[type[FactoredLinear]] = FactoredLinear

    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        op = ops[step.operators[0]]
        x = graph.tensors()[op.input]
        output = detach_output(graph, op.output)
        matmul_pair(graph, f"{op.name}/lowrank", x, output, FactoredLinear.of(step, op, tensors),
                    weight_dtype(graph, op))


def matmul_pair(
    graph: gs.Graph,
    base: str,
    x: gs.Tensor,
    output: gs.Variable,
    record: FactoredLinear,
    dtype: np.dtype,
) -> None:
    """Print ``record`` as ``x -> MatMul(first^T) -> MatMul(second^T) [-> Add(bias)] ->
    output`` (MatMul multiplies the activation from the left, hence the stored
    transposes); names start with ``base``, weights are stored in ``dtype``. Shared with
    :mod:`qmpass.rewrite.shared_basis`."""
    first_t = new_constant(graph, f"{base}/first", record.first.T, dtype)
    second_t = new_constant(graph, f"{base}/second", record.second.T, dtype)
    hidden = gs.Variable(unique_name(graph, f"{base}/hidden"), dtype=dtype)
    add_node(graph, "MatMul", f"{base}/MatMul_first", [x, first_t], [hidden])
    if record.bias is None:
        add_node(graph, "MatMul", f"{base}/MatMul_second", [hidden, second_t], [output])
        return
    product = gs.Variable(unique_name(graph, f"{base}/product"), dtype=dtype)
    add_node(graph, "MatMul", f"{base}/MatMul_second", [hidden, second_t], [product])
    bias_c = new_constant(graph, f"{base}/bias", record.bias, dtype)
    add_node(graph, "Add", f"{base}/Add_bias", [product, bias_c], [output])

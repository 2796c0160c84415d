"""One shared basis for the MatMul/Gemm operators that read the same tensor (Q/K/V).

Members ``i = 1..n`` map the same row ``x`` (``d_in``) to ``y_i = W_i x + b_i``. Stacking
them, ``[y_1; ...; y_n] = W x + b`` with ``W = [W_1; ...; W_n]`` (``sum d_out_i x d_in``).
The planner replaces ``W`` by ``second @ first``: ``first`` (``q x d_in``) is a basis of
the input space shared by all members (e.g. the top right singular vectors of ``W``, or
the top eigenvectors of the cluster's mixed state ``rho_C``), ``second`` stacks each
member's ``d_out_i x q`` coefficients in member order. The graph becomes

    x -> MatMul(first^T) -> MatMul(second^T) -> Add(b) -> Split(axis=-1) -> y_1 ... y_n

Error: ``||y - y'|| <= ||W - second first||_op ||x||`` for the stacked output, hence for
every member. Cost per input vector: ``q (d_in + sum d_out_i)`` weights and
multiply-adds instead of ``d_in sum d_out_i``; a rank that saves nothing is declined.
Split takes its sizes as an int64 input from opset 13 on, as an attribute before. The
algebra and the rule are :class:`qmpass.algebra.SharedBasisSplit`'s; this module prints it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qmpass.algebra import SharedBasisSplit, decline_factors, decline_rank
from qmpass.extract import Operator
from qmpass.plan.plan import Step, StepKind
from qmpass.rewrite.base import (
    Rewrite,
    StepTensors,
    add_node,
    decline_node,
    detach_output,
    new_constant,
    unique_name,
    weight_dtype,
)
from qmpass.rewrite.lowrank_matmul import matmul_pair

__all__ = ["SharedBasis", "split_outputs", "split_pair"]

_SPLIT_SIZES_AS_INPUT = 13  # opset from which Split reads its sizes from an input


class SharedBasis(Rewrite):
    """Replace n MatMul/Gemm operators reading one tensor by two MatMuls, an Add and a Split.

    ``step.operators`` are the members in output order (``Extraction.fusion_groups``
    lists candidates), ``step.rank`` the width q of the shared basis. Tensors (matrix
    views, float64): ``"first"`` (``q x d_in``), ``"second"`` (``sum d_out_i x q``) and
    ``"bias"`` (``sum d_out_i``, zeros for members without one), the last required when
    any member has a bias; they become a :class:`~qmpass.algebra.SharedBasisSplit`,
    whose rule says which members are taken.
    """

    kind: ClassVar[StepKind] = "shared_basis"
    #: what the rewrite is called in a declining sentence
    what: ClassVar[str] = "shared-basis fusion"

    def check(self, graph: gs.Graph, step: Step, ops: Mapping[str, Operator]) -> str | None:
        if step.kind != self.kind:
            return f"a '{step.kind}' step is not a {self.what}"
        for name in step.operators:
            if name not in ops:
                return f"member '{name}' is declined: {decline_node(graph, ops, name)}"
        members = [ops[name] for name in step.operators]
        reason = self.declines(members)
        if reason is not None:
            return reason
        for name in step.operators:
            reason = decline_node(graph, ops, name)
            if reason is not None:
                return f"member '{name}' is declined: {reason}"
        dtypes = {weight_dtype(graph, op) for op in members}
        if len(dtypes) > 1:
            return f"members store weights in different types ({', '.join(map(str, dtypes))})"
        return self.decline_rank(step.rank, members)

    @staticmethod
    def declines(members: Sequence[Operator]) -> str | None:
        """The record's rule."""
        return SharedBasisSplit.declines(members)

    @staticmethod
    def decline_rank(rank: int | None, members: Sequence[Operator]) -> str | None:
        """Why ``rank`` saves nothing for ``members``."""
        return decline_rank(rank, members[0].shape[1], [op.shape[0] for op in members])

    def check_tensors(
        self, step: Step, ops: Mapping[str, Operator], tensors: StepTensors
    ) -> str | None:
        """``None`` when ``tensors`` fit the step's members; otherwise why not.

        :meth:`apply` raises ``ValueError`` with this sentence when they do not fit.
        """
        members = [ops[name] for name in step.operators]
        d_in = members[0].shape[1]
        d_out = sum(op.shape[0] for op in members)
        needs_bias = any(op.bias is not None for op in members)
        return decline_factors(tensors, step.rank, d_in, d_out, needs_bias=needs_bias)

    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        members = [ops[name] for name in step.operators]
        record = SharedBasisSplit.of(step, members, tensors)
        dtype = weight_dtype(graph, members[0])
        base = f"{members[0].name}/shared_basis"
        x = graph.tensors()[members[0].input]
        outputs = [detach_output(graph, op.output) for op in members]
        split_pair(graph, base, x, outputs, record, dtype)


def split_pair(
    graph: gs.Graph,
    base: str,
    x: gs.Tensor,
    outputs: list[gs.Variable],
    record: SharedBasisSplit,
    dtype: np.dtype,
) -> None:
    """Print ``record`` as the fused MatMul pair (:func:`matmul_pair`) and a ``Split``
    of the last axis into ``outputs`` (sizes as an int64 input from opset 13 on, as an
    attribute before)."""
    fused = gs.Variable(unique_name(graph, f"{base}/fused"), dtype=dtype)
    matmul_pair(graph, base, x, fused, record.fused, dtype)
    split_outputs(graph, base, fused, outputs, record.sizes)


def split_outputs(graph: gs.Graph, base: str, fused: gs.Tensor, outputs: list[gs.Variable],
                  sizes_: tuple[int, ...]) -> None:
    """A ``Split`` of ``fused``'s last axis into ``outputs`` of ``sizes_`` (sizes as an
    int64 input from opset 13 on, as an attribute before). Shared with
    :mod:`qmpass.rewrite.shared_basis_crosslayer`."""
    sizes = list(sizes_)
    if graph.opset >= _SPLIT_SIZES_AS_INPUT:
        split = new_constant(graph, f"{base}/split", np.array(sizes), np.dtype(np.int64))
        add_node(graph, "Split", f"{base}/Split", [fused, split], outputs, {"axis": -1})
    else:
        attrs = {"axis": -1, "split": sizes}
        add_node(graph, "Split", f"{base}/Split", [fused], outputs, attrs)

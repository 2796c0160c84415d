"""One precondition per rewrite rule: ``declines(...) -> reason | None``.

The planner budgets only what a rule accepts, the ONNX rewriters and the Relax pass
check the same rule before they print a record, and ``qmpass lower`` shares the parts
about reading an operator row-wise. A reason is a sentence for the report ("Gemm with
transA=1 is not rewritten"), never a bare False.

The rules look at the :class:`~qmpass.extract.Operator` (the matrix view extraction
made); whether the graph still holds the operator is the backend's business
(:func:`qmpass.rewrite.base.decline_node`, the Relax site match).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qmpass.algebra.records import FactoredConv, FactoredLinear
    from qmpass.extract.operator import Operator
    from qmpass.plan.plan import Step

__all__ = [
    "crosslayer_basis_declines",
    "decline_compensation",
    "decline_crosslayer_rank",
    "decline_factors",
    "decline_kept",
    "decline_rank",
    "factored_conv_declines",
    "factored_linear_declines",
    "lowrank_declines",
    "lowrank_record",
    "row_linear_declines",
    "shared_basis_declines",
    "subgraph_declines",
]


# -- operators ---------------------------------------------------------------------------------
def subgraph_declines(op: Operator, fate: str = "left untouched") -> str | None:
    """Operators inside subgraphs (ONNX control flow, Relax functions other than
    ``main``) are not rewritten (``fate`` says what happens to them instead)."""
    if op.graph != "main":
        return f"operator inside a subgraph ({op.graph}) is {fate}"
    return None


def row_linear_declines(op: Operator, action: str | None = None) -> str | None:
    """Why ``op`` (a MatMul/Gemm) is not ``y = W x + b`` on the rows ``x`` of its input:
    its weight must be on the right and its activation read as it is (no ``transA``).
    ``action`` names what is refused (default: factorised, rewritten)."""
    if op.weight_side != "right":
        return (
            f"'{op.name}' has its weight on the left (W @ x); only x @ W operators are "
            f"{action or 'factorised'}"
        )
    if op.transposed_input:
        return f"Gemm with transA=1 is not {action or 'rewritten'}"
    return None


def factored_linear_declines(op: Operator) -> str | None:
    """The rule of :class:`~qmpass.algebra.FactoredLinear` (and of each member of a
    :class:`~qmpass.algebra.SharedBasisSplit`): a MatMul/Gemm in the main graph, read
    row-wise, whose whole affine map is the matrix view (a Gemm's C that extraction could
    not fold as a per-output vector would be lost)."""
    reason = subgraph_declines(op)
    if reason is not None:
        return reason
    if op.op_type not in ("MatMul", "Gemm"):
        return f"'{op.name}' is a {op.op_type}; this rewrite handles MatMul and Gemm"
    reason = row_linear_declines(op)
    if reason is not None:
        return reason
    # extraction notes a C it analysed without (not constant, or not per output)
    if op.unfolded_bias:
        return (
            f"bias C of Gemm '{op.name}' is not a constant per-output vector; "
            "the node is left untouched"
        )
    return None


def factored_conv_declines(op: Operator) -> str | None:
    """The rule of :class:`~qmpass.algebra.FactoredConv`: an ungrouped Conv in the main
    graph (grouped and depthwise views are block-diagonal; ConvTranspose is an adjoint)."""
    reason = subgraph_declines(op)
    if reason is not None:
        return reason
    if op.op_type == "ConvTranspose":
        return "ConvTranspose is not factorised"
    if op.op_type != "Conv" or op.geometry is None:
        return f"'{op.name}' is a {op.op_type}; this rewrite handles Conv"
    groups = op.geometry.groups
    if groups != 1:
        c_in = op.shape[1] // prod(op.geometry.kernel_shape)
        if groups == c_in:
            return f"depthwise conv (groups={groups}) is not factorised"
        return f"grouped conv (groups={groups}) is not factorised"
    return None


def lowrank_record(op: Operator) -> type[FactoredLinear] | type[FactoredConv]:
    """The record a ``lowrank`` step of ``op`` becomes: a conv pair for convolutions,
    a MatMul pair otherwise (whose rule then says why not)."""
    from qmpass.algebra.records import FactoredConv, FactoredLinear

    return FactoredConv if op.op_type in ("Conv", "ConvTranspose") else FactoredLinear


def lowrank_declines(op: Operator) -> str | None:
    """Why ``op`` is not factorised alone (the rule of the record it would become)."""
    return lowrank_record(op).declines(op)


def _decline_basis_members(members: Sequence[Operator], what: str) -> str | None:
    """What every shared-basis rule asks of its members: two or more distinct MatMul/Gemm
    operators, each factorisable, of one input width (``what`` names the basis)."""
    names = [op.name for op in members]
    if len(names) < 2:
        return f"a {what} needs two or more operators, not {len(names)}"
    if len(set(names)) != len(names):
        return "the step names an operator more than once"
    for op in members:
        reason = factored_linear_declines(op)
        if reason is not None:
            return f"member '{op.name}' is declined: {reason}"
    return None


def _decline_widths(members: Sequence[Operator]) -> str | None:
    widths = sorted({op.shape[1] for op in members})
    if len(widths) > 1:
        return f"members differ in input width ({', '.join(map(str, widths))})"
    return None


def shared_basis_declines(members: Sequence[Operator]) -> str | None:
    """The rule of :class:`~qmpass.algebra.SharedBasisSplit`: two or more distinct
    MatMul/Gemm operators that each factorise and read one tensor of one width."""
    reason = _decline_basis_members(members, "shared basis")
    if reason is not None:
        return reason
    inputs = sorted({op.input for op in members})
    if len(inputs) > 1:
        return f"members read different tensors ({', '.join(repr(t) for t in inputs)})"
    return _decline_widths(members)


def crosslayer_basis_declines(members: Sequence[Operator]) -> str | None:
    """The rule of :class:`~qmpass.algebra.CrossLayerBasis`: two or more distinct
    MatMul/Gemm operators that each factorise, of one input width, reading two or more
    different tensors (operators reading one tensor are a plain shared basis)."""
    reason = _decline_basis_members(members, "cross-layer basis") or _decline_widths(members)
    if reason is None and len({op.input for op in members}) < 2:
        return "the members read one tensor: that is a shared basis, not a cross-layer one"
    return reason


def decline_crosslayer_rank(rank: int | None, d_in: int, d_outs: Sequence[int],
                            inputs: int) -> str | None:
    """Why a basis of width ``rank`` shared by members of outputs ``d_outs`` over
    ``inputs`` different tensors saves neither weights nor work per input vector.

    Weights: ``rank (d_in + sum(d_outs))`` against ``d_in sum(d_outs)``; work: the basis
    is applied once per tensor, ``rank (inputs d_in + sum(d_outs))``."""
    if rank is None or rank < 1:
        return f"step has no usable rank ({rank})"
    total = sum(d_outs)
    if rank * (d_in + total) >= d_in * total:
        return (f"rank {rank} shared by {len(d_outs)} operators saves no weights: "
                f"{rank}*({d_in}+{total}) >= {d_in}*{total}")
    if rank * (inputs * d_in + total) >= d_in * total:
        return (f"rank {rank} shared over {inputs} inputs saves no work: "
                f"{rank}*({inputs}*{d_in}+{total}) >= {d_in}*{total}")
    return None


# -- steps and their tensors -------------------------------------------------------------------
def decline_rank(rank: int | None, d_in: int, d_outs: Sequence[int]) -> str | None:
    """Why ``rank`` does not reduce both weights and FLOPs of ``d_in -> sum(d_outs)``.

    Both are ``rank * (d_in + sum(d_outs))`` against ``d_in * sum(d_outs)`` per input
    vector (biases are the same on both sides).
    """
    if rank is None or rank < 1:
        return f"step has no usable rank ({rank})"
    total = sum(d_outs)
    if rank * (d_in + total) >= d_in * total:
        if len(d_outs) == 1:
            return (
                f"rank {rank} of a {total}x{d_in} matrix saves nothing: "
                f"{rank}*({d_in}+{total}) >= {total}*{d_in}"
            )
        return (
            f"rank {rank} shared by {len(d_outs)} operators saves nothing: "
            f"{rank}*({d_in}+{total}) >= {d_in}*{total}"
        )
    return None


def decline_factors(
    tensors: Mapping[str, np.ndarray], rank: int | None, d_in: int, d_out: int, *,
    needs_bias: bool,
) -> str | None:
    """Why ``tensors`` are not factors ``first`` (q x d_in), ``second`` (d_out x q) and
    ``bias`` (d_out) of a ``d_out x d_in`` matrix view at rank ``q = rank``."""
    missing = [k for k in ("first", "second") if k not in tensors]
    if needs_bias and "bias" not in tensors:
        missing.append("bias")
    if missing:
        return f"the step's tensors lack {', '.join(repr(k) for k in missing)}"
    q = rank if rank is not None else np.shape(tensors["first"])[0]
    expected: dict[str, tuple[int, ...]] = {"first": (q, d_in), "second": (d_out, q)}
    if "bias" in tensors:
        expected["bias"] = (d_out,)
    for key, shape in expected.items():
        array = np.asarray(tensors[key])
        if array.shape != shape:
            return f"tensor '{key}' has shape {array.shape}, expected {shape}"
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            return f"tensor '{key}' is not a finite floating-point array"
    return None


def decline_kept(kept: Sequence[int] | None, channels: int) -> str | None:
    """Why ``kept`` is not a valid choice of channels of a group of ``channels``."""
    if not kept:
        return "the step keeps no channel; a group cannot be removed entirely"
    values = list(kept)
    if any(not isinstance(k, (int, np.integer)) for k in values):
        return "kept channels must be integers"
    if values != sorted(set(values)):
        return "kept channels must be sorted and distinct"
    if values[0] < 0 or values[-1] >= channels:
        return f"kept channels must lie in 0..{channels - 1}, not {values[0]}..{values[-1]}"
    return None


def decline_compensation(
    step: Step, consumers: Sequence[str], channels: int, tensors: Mapping[str, np.ndarray]
) -> str | None:
    """Why the ``mix:N``/``shift:N`` tensors of a prune step do not fit its consumers."""
    kept = len(step.kept or ())
    for node in consumers:
        mix = tensors.get(f"mix:{node}")
        if mix is not None and (mix.shape != (channels, kept) or not np.isfinite(mix).all()):
            return (f"mix:{node} must be a finite {channels}x{kept} matrix, "
                    f"not of shape {mix.shape}")
        shift = tensors.get(f"shift:{node}")
        if shift is not None and (shift.shape != (channels,) or not np.isfinite(shift).all()):
            return (f"shift:{node} must be a finite vector of {channels}, "
                    f"not of shape {shift.shape}")
    return None

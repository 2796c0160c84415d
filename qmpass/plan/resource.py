"""What a budget counts: weight parameters (the default) or a target's cycles.

The planner spends a budget of one *resource*. Every unit's variants are priced in it:
an operator as it is, operators through a rank-``q`` factorisation (one operator: two
thinner ones; several reading one tensor: a shared basis and one fused operator), and an
operator whose input and output channels were pruned. :data:`PARAMS` prices in stored
weight values; :class:`Cycles` in the cycles that a target's cost model
(:mod:`hw_targets`) predicts for the kernels each form lowers to, at the model's shapes
(a dynamic batch taken as ``--batch``, 1 by default), so ``--keep F --target T`` keeps
``F`` of the compressible operators' cycles on ``T`` and the Lagrangian trades error per
cycle saved.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import hw_targets
from qmpass.errors import QmpassInputError
from qmpass.extract import Operator
from qmpass.plan.plan import Cost

__all__ = ["PARAMS", "Cycles", "Resource", "Scale", "lowrank_cost"]


@dataclass(frozen=True)
class Scale:
    """The kept fractions of an operator's output and input channels after pruning."""

    output: float = 1.0
    input: float = 1.0
    depthwise: bool = False

    @property
    def weight(self) -> float:
        """The kept fraction of the weights (a depthwise conv's follow its channels)."""
        return self.output if self.depthwise else self.output * self.input


class Resource(Protocol):
    name: str

    def operators(self, ops: Sequence[Operator]) -> float:
        """The operators as they are."""
        ...

    def factorised(self, ops: Sequence[Operator], rank: int) -> float:
        """``ops`` (reading one input) through a rank-``rank`` basis."""
        ...

    def scaled(self, op: Operator, scale: Scale) -> float:
        """``op`` with its channels pruned to ``scale``."""
        ...


def lowrank_cost(ops: Sequence[Operator], rank: int) -> Cost:
    """Parameters and FLOPs of ``ops`` (reading one input) through a shared
    rank-``rank`` basis; for one operator, its plain factorisation. FLOPs scale with the
    vectors each one maps."""
    d_in = ops[0].shape[1]
    vectors = ops[0].flops / (2 * ops[0].shape[0] * d_in)
    outputs = sum(op.shape[0] for op in ops)
    biases = sum(op.shape[0] for op in ops if op.bias is not None)
    return Cost(rank * (d_in + outputs) + biases, round(2 * rank * (d_in + outputs) * vectors))


class _Params:
    name = "params"

    def operators(self, ops: Sequence[Operator]) -> float:
        return float(Cost.of(ops).params)

    def factorised(self, ops: Sequence[Operator], rank: int) -> float:
        return float(lowrank_cost(ops, rank).params)

    def scaled(self, op: Operator, scale: Scale) -> float:
        """Weights scale with both fractions (a depthwise conv's with its channels),
        biases and a folded BatchNorm with the output's."""
        rows, cols = op.shape
        weight = rows * cols // (op.geometry.groups if op.geometry is not None else 1)
        return float(round(weight * scale.weight + (op.params - weight) * scale.output))


PARAMS: Resource = _Params()


class Cycles:
    """Cycles of a target's cost model for the kernels every form lowers to.

    ``input_shapes`` maps each operator's input tensor to its shape (from shape
    inference): a dynamic first dimension is taken as ``batch``, any other dynamic one as
    1. Kernels are costed, not simulated.
    """

    def __init__(self, target: str, input_shapes: Mapping[str, Sequence[int | str | None]],
                 batch: int = 1):
        self.name = f"cycles:{target}"
        self.module = hw_targets.get_target(target)
        self.target = self.module.TARGET
        self.batch = batch
        self.shapes = {
            k: tuple(d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1)
                     for i, d in enumerate(v))
            for k, v in input_shapes.items()
        }
        # extraction counted FLOPs with dynamic dimensions as 1
        self.batched = {k for k, v in input_shapes.items()
                        if v and not (isinstance(v[0], int) and v[0] > 0)}
        # Kernel costs memoised per instance (the planner prices the same shapes many
        # times). Not ``lru_cache`` on the methods: that cache is one per class, keyed on
        # ``self``, so it would keep every Cycles alive (compress makes two per call: the
        # plan's, and one that prices the result) until evicted.
        self._matmul = functools.lru_cache(maxsize=4096)(self._matmul_cycles)
        self._conv = functools.lru_cache(maxsize=4096)(self._conv_cycles)

    # -- the resource -------------------------------------------------------------------
    def operators(self, ops: Sequence[Operator]) -> float:
        return float(sum(self.scaled(op, Scale()) for op in ops))

    def factorised(self, ops: Sequence[Operator], rank: int) -> float:
        first = ops[0]
        bias = any(op.bias is not None for op in ops)
        d_in = first.shape[1]
        d_out = sum(op.shape[0] for op in ops)
        if first.op_type in ("MatMul", "Gemm"):
            rows = self._rows(first)
            return float(self._matmul(rows, d_in, rank, False) +
                         self._matmul(rows, rank, d_out, bias))
        x = self._conv_input(first)
        geometry = first.geometry
        assert geometry is not None
        spatial = self._conv(x, rank, geometry.kernel_shape, geometry.strides,
                             geometry.pads, geometry.dilations, 1, False)
        out_hw = self._out_hw(x, geometry.kernel_shape, geometry.strides, geometry.pads,
                              geometry.dilations)
        pointwise = self._conv((x[0], rank, *out_hw), d_out, (1, 1), (1, 1), (0, 0, 0, 0),
                               (1, 1), 1, bias)
        return float(spatial + pointwise)

    def scaled(self, op: Operator, scale: Scale) -> float:
        d_out, d_in = op.shape
        out = max(1, round(d_out * scale.output))
        if op.op_type in ("MatMul", "Gemm"):
            return float(self._matmul(self._rows(op), max(1, round(d_in * scale.input)), out,
                                      op.bias is not None))
        geometry = op.geometry
        if op.op_type != "Conv" or geometry is None or len(geometry.kernel_shape) != 2:
            return 0.0  # not lowered: never a unit of a cycle budget
        x = self._conv_input(op)
        if scale.depthwise:
            channels, groups = out, out
        else:
            channels = max(1, round(x[1] * scale.input))
            groups = geometry.groups
        return float(self._conv((x[0], channels, x[2], x[3]), out, geometry.kernel_shape,
                                geometry.strides, geometry.pads, geometry.dilations, groups,
                                op.bias is not None))

    # -- shapes and kernels ----------------------------------------------------------------
    def _rows(self, op: Operator) -> int:
        rows = max(1, op.flops // (2 * op.shape[0] * op.shape[1]))
        return rows * self.batch if op.input in self.batched else rows

    def _conv_input(self, op: Operator) -> tuple[int, int, int, int]:
        shape = self.shapes.get(op.input)
        if shape is None or len(shape) != 4:
            raise QmpassInputError(
                f"conv '{op.name}' has no known 4-D input shape; a cycle budget needs the "
                "model's shapes (run onnx shape inference, or fix the input's dimensions)."
            )
        return shape[0], shape[1], shape[2], shape[3]

    @staticmethod
    def _out_hw(x: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                pads: Sequence[int], dilations: Sequence[int]) -> tuple[int, int]:
        ho = (x[2] + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
        wo = (x[3] + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
        return ho, wo

    def _matmul_cycles(self, rows: int, k: int, n: int, bias: bool) -> int:
        return hw_targets.lower_matmul(self.module, self.target, "g", rows, k, n, bias).cycles()

    def _conv_cycles(self, x: tuple[int, ...], out: int, kernel: tuple[int, ...],
                     strides: tuple[int, ...], pads: tuple[int, ...],
                     dilations: tuple[int, ...], groups: int, bias: bool) -> int:
        return hw_targets.lower_conv(
            self.module, self.target, "c", (x[0], x[1], x[2], x[3]), out,
            (kernel[0], kernel[1]), (strides[0], strides[1]),
            (pads[0], pads[1], pads[2], pads[3]), (dilations[0], dilations[1]), groups, bias,
        ).cycles()

"""Low-rank factorisation of a Conv: a ``k``-tap Conv with q filters, then a 1x1 Conv.

For ``groups == 1`` the matrix view of a Conv is ``W`` (``Cout x Cin*prod(kernel)``): row
``o`` is filter ``o`` flattened in ONNX order (input channel, then kernel positions), and
each output pixel is ``W p + b`` for its receptive field ``p``. Replacing ``W`` by
``second @ first`` (``first``: ``q x Cin*prod(kernel)``, ``second``: ``Cout x q``) gives

    y'[:, pixel] = second (first p) + b

which is two convolutions: ``first`` reshaped to ``(q, Cin, *kernel)`` with the
operator's geometry (strides, pads or auto_pad, dilations) and no bias, then a 1x1
convolution with weight ``second`` as ``(Cout, q, 1, ...)`` and bias ``b``. Both see the
same pixels as the original, so the output shape is unchanged; 1-D, 2-D and 3-D
kernels are the same code. A folded ``BatchNormalization`` disappears: the matrix view
and bias include it and ``op.output`` is its output.

The algebra (the reshape of the factors into kernels) is
:class:`qmpass.algebra.FactoredConv`; this module prints it.

Error: per output pixel ``||y - y'|| <= ||W - second first||_op ||p||`` (``sigma_{q+1}``
for a truncated SVD). Cost per output pixel: ``q (Cin*prod(kernel) + Cout)`` weights and
multiply-adds instead of ``Cout Cin prod(kernel)``; a rank that saves nothing is
declined. Grouped and depthwise convolutions (block-diagonal views) and ConvTranspose are
not factorised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qmpass.algebra import FactoredConv
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

__all__ = ["LowRankConv", "conv_pair"]


class LowRankConv(OperatorFactorisation):
    """Replace one Conv (with a folded BatchNormalization) by a thin Conv and a 1x1 Conv.

    ``step.operators`` is one Conv, ``step.rank`` the number q of intermediate channels.
    Tensors (matrix views, float64): ``"first"`` (``q x Cin*prod(kernel)``), ``"second"``
    (``Cout x q``) and ``"bias"`` (``Cout``), the last required when the operator has a
    bias (its own or a folded BatchNormalization's); they become a
    :class:`~qmpass.algebra.FactoredConv`, whose rule says which convolutions are taken.
    """

    record: ClassVar[type[FactoredConv]] = FactoredConv

    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        op = ops[step.operators[0]]
        record = FactoredConv.of(step, op, tensors)
        x = graph.tensors()[op.input]
        output = detach_output(graph, op.output)
        conv_pair(graph, f"{op.name}/lowrank", x, output, record, weight_dtype(graph, op))


def conv_pair(
    graph: gs.Graph,
    base: str,
    x: gs.Tensor,
    output: gs.Variable,
    record: FactoredConv,
    dtype: np.dtype,
) -> None:
    """Print ``record`` as ``x -> Conv(first, geometry) -> Conv(second, 1x1, bias) ->
    output``; names start with ``base``, weights are stored in ``dtype``."""
    geometry = record.geometry
    kernel = list(geometry.kernel_shape)
    first_w = new_constant(graph, f"{base}/first", record.first, dtype)
    second_w = new_constant(graph, f"{base}/second", record.second, dtype)
    hidden = gs.Variable(unique_name(graph, f"{base}/hidden"), dtype=dtype)
    attrs: dict[str, object] = {
        "kernel_shape": kernel,
        "strides": list(geometry.strides),
        "dilations": list(geometry.dilations),
        "group": 1,
    }
    if geometry.auto_pad == "NOTSET":
        attrs["pads"] = list(geometry.pads)
    else:
        attrs["auto_pad"] = geometry.auto_pad
    add_node(graph, "Conv", f"{base}/Conv_first", [x, first_w], [hidden], attrs)
    inputs: list[gs.Tensor] = [hidden, second_w]
    if record.bias is not None:
        inputs.append(new_constant(graph, f"{base}/bias", record.bias, dtype))
    add_node(graph, "Conv", f"{base}/Conv_second", inputs, [output],
             {"kernel_shape": [1] * len(kernel)})

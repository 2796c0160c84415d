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

Error: per output pixel ``||y - y'|| <= ||W - second first||_op ||p||`` (``sigma_{q+1}``
for a truncated SVD). Cost per output pixel: ``q (Cin*prod(kernel) + Cout)`` weights and
multiply-adds instead of ``Cout Cin prod(kernel)``; a rank that saves nothing is
declined. Grouped and depthwise convolutions (block-diagonal views) and ConvTranspose are
not factorised.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

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

__all__ = ["LowRankConv"]


class LowRankConv(OperatorFactorisation):
    """Replace one Conv (with a folded BatchNormalization) by a thin Conv and a 1x1 Conv.

    ``step.operators`` is one Conv, ``step.rank`` the number q of intermediate channels.
    Tensors (matrix views, float64): ``"first"`` (``q x Cin*prod(kernel)``), ``"second"``
    (``Cout x q``) and ``"bias"`` (``Cout``), the last required when the operator has a
    bias (its own or a folded BatchNormalization's).
    """

    def decline(self, graph: gs.Graph, op: Operator) -> str | None:
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

    def _rewrite(
        self,
        graph: gs.Graph,
        step: Step,
        ops: Mapping[str, Operator],
        tensors: StepTensors,
    ) -> None:
        op = ops[step.operators[0]]
        geometry = op.geometry
        if geometry is None or geometry.groups != 1:
            raise ValueError(f"cannot rewrite '{op.name}': not an ungrouped Conv")
        kernel = tuple(geometry.kernel_shape)
        d_out, d_in = op.shape
        c_in = d_in // prod(kernel)
        first = np.asarray(tensors["first"])
        q = first.shape[0]
        second = np.asarray(tensors["second"])
        bias = tensors.get("bias")
        dtype = weight_dtype(graph, op)
        base = f"{op.name}/lowrank"

        x = graph.tensors()[op.input]
        output = detach_output(graph, op.output)
        first_w = new_constant(graph, f"{base}/first", first.reshape(q, c_in, *kernel), dtype)
        ones = (1,) * len(kernel)
        second_w = new_constant(graph, f"{base}/second", second.reshape(d_out, q, *ones), dtype)
        hidden = gs.Variable(unique_name(graph, f"{base}/hidden"), dtype=dtype)
        attrs: dict[str, object] = {
            "kernel_shape": list(kernel),
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
        if bias is not None:
            inputs.append(new_constant(graph, f"{base}/bias", np.asarray(bias), dtype))
        add_node(
            graph, "Conv", f"{base}/Conv_second", inputs, [output], {"kernel_shape": list(ones)}
        )

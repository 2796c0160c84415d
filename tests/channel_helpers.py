"""Node builders shared by the channel-group and channel-pruning tests, and the residual
graph both use: conv weights from the trained ResNet, small biases from the transformer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from conftest import const, make_model, tensor, trained_conv, trained_matrix
from onnx import helper


def bias(n: int) -> np.ndarray:
    return 0.1 * trained_matrix(1, n)[0]


def conv(
    name: str, x: str, w: str, y: str, b: str | None = None, **attrs: object
) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] if b is None else [x, w, b], [y], name=name, **attrs)


def relu(x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Relu", [x], [y], name=f"relu_{y}")


def zero_rows(w: np.ndarray, rows: Sequence[int], axis: int = 0) -> np.ndarray:
    w = np.moveaxis(w.copy(), axis, 0)
    w[list(rows)] = 0.0
    return np.moveaxis(w, 0, axis)


def residual_model(*, size: int = 8, dead: Sequence[int] = ()) -> onnx.ModelProto:
    """a -> relu -> [b1 -> relu -> b2] + skip -> relu -> c (a 1x1 conv head), on a
    ``size x size`` image; the channels ``dead`` of a and b2 (the residual group's
    producers) have zero weights and biases."""
    wa, ba = zero_rows(trained_conv(8, 3, 3), dead), zero_rows(bias(8), dead)
    wb2, bb2 = zero_rows(trained_conv(8, 8, 3)[::-1], dead), zero_rows(bias(8)[::-1], dead)
    return make_model(
        [
            conv("a", "x", "wa", "h", "ba", pads=[1, 1, 1, 1]),
            relu("h", "r"),
            conv("b1", "r", "wb1", "t", "bb1", pads=[1, 1, 1, 1]),
            relu("t", "tr"),
            conv("b2", "tr", "wb2", "u", "bb2", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["u", "r"], ["s"], name="add"),
            relu("s", "sr"),
            conv("c", "sr", "wc", "y"),
        ],
        [tensor("x", ["batch", 3, size, size])],
        [tensor("y", ["batch", 4, size, size])],
        [
            const("wa", wa), const("ba", ba),
            const("wb1", trained_conv(8, 8, 3)), const("bb1", bias(8)),
            const("wb2", wb2), const("bb2", bb2),
            const("wc", trained_conv(4, 8, 1)),
        ],
    )

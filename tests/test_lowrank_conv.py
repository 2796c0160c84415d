"""LowRankConv: Conv [+ BatchNormalization] -> Conv(q filters, same geometry) -> 1x1 Conv.

Each test asserts how many places matched, the structure of the rewritten graph, and
numerical agreement in onnxruntime within the certificate, per receptive field p: every
output pixel satisfies ||y' - y|| <= sigma_{q+1} ||p|| (plus float32 rounding), where
sigma_{q+1} = ||W - W_q||_op of the Cout x Cin*prod(kernel) matrix view. Receptive fields
come from an independent numpy im2col, itself checked against onnxruntime's Conv.
"""

from __future__ import annotations

from collections import Counter
from math import ceil, prod
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_conv, trained_matrix
from onnx import TensorProto, helper
from rewrite_helpers import (
    assert_envelope_kept,
    factors_for,
    initializer_shapes,
    lowrank_step,
    op_types,
)

import models
from qmpass.extract import ConvGeometry, Operator, extract_operators
from qmpass.rewrite.base import export_like, name_nodes
from qmpass.rewrite.lowrank_conv import LowRankConv
from qmpass.verify import run_model

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2
RNG = np.random.default_rng(11)


# -- helpers ------------------------------------------------------------------------------------


def rewrite(
    model: onnx.ModelProto, ops: list[Operator], ranks: list[int], *, checked: bool = True
) -> tuple[onnx.ModelProto, dict[str, float]]:
    graph = gs.import_onnx(model)
    by_name = {op.name: op for op in ops}
    rule = LowRankConv()
    sigmas = {}
    for op, q in zip(ops, ranks, strict=True):
        tensors, sigmas[op.name] = factors_for(op, q)
        step = lowrank_step(op, q, sigmas[op.name])
        if checked:
            assert rule.check(graph, step, by_name) is None
        rule.apply(graph, step, by_name, tensors)
    return export_like(graph, model), sigmas


def receptive_fields(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """im2col: ``(N, pixels, Cin*prod(kernel))``, columns in ONNX weight order."""
    rank = len(g.kernel_shape)
    spatial = x.shape[2:]
    if g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [
            max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            for n, s, k, d in zip(spatial, g.strides, g.kernel_shape, g.dilations, strict=True)
        ]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        begins, ends = (small, big) if g.auto_pad == "SAME_UPPER" else (big, small)
    elif g.auto_pad == "VALID":
        begins, ends = [0] * rank, [0] * rank
    else:
        begins, ends = list(g.pads[:rank]), list(g.pads[rank:])
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *zip(begins, ends, strict=True)])
    window = [(k - 1) * d + 1 for k, d in zip(g.kernel_shape, g.dilations, strict=True)]
    view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=tuple(range(2, 2 + rank)))
    strided = [slice(None, None, s) for s in g.strides]
    dilated = [slice(None, None, d) for d in g.dilations]
    view = view[tuple([slice(None), slice(None), *strided, *dilated])]
    pixels = prod(view.shape[2:2 + rank])
    view = np.moveaxis(view, 1, 1 + rank)  # (N, *positions, C, *kernel)
    return view.reshape(x.shape[0], pixels, -1)


def pixels_last(y: np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` -> ``(N, pixels, C)``."""
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).astype(np.float64)


def slack(op: Operator, q: int, patch_norm: np.ndarray) -> np.ndarray:
    """Float32 rounding of both models, to first order (Higham, gamma_n = n u): dot
    products of length d_in (original), d_in and q (factors), relative to
    ||W||_F ||p||, plus the rounding of the stored weights and of the bias (and of the
    BatchNormalization the original computes separately)."""
    d_in = op.shape[1]
    b_norm = 0.0 if op.bias is None else float(np.linalg.norm(op.bias))
    return (2 * d_in + q + 8) * UNIT_ROUNDOFF * (np.linalg.norm(op.weight) * patch_norm + b_norm)


def assert_certified(
    x: np.ndarray, y: np.ndarray, y_new: np.ndarray, op: Operator, q: int, sigma_next: float
) -> float:
    """Per output pixel: ||y' - y|| <= sigma_{q+1} ||p|| + slack, where ``y`` is the
    original operator on ``x``. Returns the largest error relative to sigma_{q+1} ||p||."""
    assert op.geometry is not None
    patches = receptive_fields(x, op.geometry)
    bias = 0.0 if op.bias is None else op.bias
    # the im2col reference reproduces the original operator as onnxruntime ran it
    patch_norm = np.linalg.norm(patches, axis=2)
    np.testing.assert_array_less(
        np.linalg.norm(patches @ op.weight.T + bias - pixels_last(y), axis=2),
        slack(op, 0, patch_norm) + 1e-30,
    )
    err = np.linalg.norm(pixels_last(y_new) - pixels_last(y), axis=2)
    bound = sigma_next * patch_norm + slack(op, q, patch_norm)
    assert np.all(err <= bound), float(np.max(err - bound))
    return float(np.max(err / np.maximum(sigma_next * patch_norm, 1e-30)))


def conv_model(
    weight: np.ndarray, spatial: list[int], *, bias: bool = True, **attrs: Any
) -> onnx.ModelProto:
    c_out, c_in = weight.shape[:2]
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [const("w", weight)]
    if bias:
        inits.append(const("b", trained_matrix(c_out + 1, c_out + 1)[1, :c_out]))
    model = make_model(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
        [tensor("x", ["batch", c_in, *spatial])],
        [tensor("y", ["batch", c_out, *(f"out{i}" for i in range(len(spatial)))])],
        inits,
    )
    return name_nodes(model)


# -- Conv 2-D with every geometry -------------------------------------------------------------

GEOMETRIES = {
    "same-size": {"pads": [1, 1, 1, 1]},
    "strided-dilated-asymmetric": {"strides": [2, 2], "dilations": [2, 2], "pads": [0, 1, 1, 0]},
    "auto-pad": {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv2d_keeps_geometry_and_certificate(geometry: dict[str, Any]) -> None:
    model = conv_model(trained_conv(16, 8, 3), [9, 9], **geometry)
    (op,) = extract_operators(model).operators
    assert op.shape == (16, 72)
    q = 6
    new, sigmas = rewrite(model, [op], [q])

    assert op_types(new) == Counter({"Conv": 2})
    assert "conv" not in {n.name for n in new.graph.node}
    assert initializer_shapes(new) == [(6, 8, 3, 3), (16,), (16, 6, 1, 1)]
    first, second = new.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["kernel_shape"] == [3, 3] and attrs["group"] == 1
    for key in ("strides", "dilations", "pads"):
        if key in geometry:
            assert attrs[key] == geometry[key]
    if "auto_pad" in geometry:
        assert attrs["auto_pad"] == b"SAME_UPPER" and "pads" not in attrs
    assert (first.input[0], second.input[0], second.output[0]) == ("x", first.output[0], "y")
    assert len(first.input) == 2 and len(second.input) == 3  # bias on the 1x1 conv only
    assert_envelope_kept(model, new)

    tightness = []
    for batch in (1, 3):  # dynamic batch
        x = RNG.standard_normal((batch, 8, 9, 9)).astype(np.float32)
        (y,) = run_model(model, {"x": x})
        (y_new,) = run_model(new, {"x": x})
        assert y_new.shape == y.shape
        tightness.append(assert_certified(x, y, y_new, op, q, sigmas[op.name]))
    assert 0.05 < max(tightness) <= 1.0


def _conv3d_weight() -> np.ndarray:
    """(16, 8, 3, 3, 3): three trained 3x3 slices of 8 input channels each as depth."""
    w = trained_conv(16, 24, 3)
    return np.ascontiguousarray(w.reshape(16, 3, 8, 3, 3).transpose(0, 2, 1, 3, 4))


@pytest.mark.parametrize(
    ("weight", "spatial", "pads"),
    [
        (trained_conv(16, 8, 3)[:, :, 1, :].copy(), [20], [1, 1]),
        (_conv3d_weight(), [5, 6, 7], [1, 0, 1, 1, 0, 1]),
    ],
    ids=["conv1d", "conv3d"],
)
def test_conv1d_and_conv3d(weight: np.ndarray, spatial: list[int], pads: list[int]) -> None:
    model = conv_model(weight, spatial, pads=pads)
    (op,) = extract_operators(model).operators
    kernel = weight.shape[2:]
    q = 5
    new, sigmas = rewrite(model, [op], [q])
    assert op_types(new) == Counter({"Conv": 2})
    assert initializer_shapes(new) == sorted(
        [(5, 8, *kernel), (16, 5, *(1,) * len(kernel)), (16,)]
    )
    assert_envelope_kept(model, new)
    x = RNG.standard_normal((2, 8, *spatial)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (y_new,) = run_model(new, {"x": x})
    assert assert_certified(x, y, y_new, op, q, sigmas[op.name]) > 0.05


def test_conv_without_bias_has_no_bias_input() -> None:
    model = conv_model(trained_conv(16, 8, 3), [6, 6], bias=False)
    (op,) = extract_operators(model).operators
    new, sigmas = rewrite(model, [op], [4])
    assert [len(n.input) for n in new.graph.node] == [2, 2]
    assert initializer_shapes(new) == [(4, 8, 3, 3), (16, 4, 1, 1)]
    x = RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (y_new,) = run_model(new, {"x": x})
    assert_certified(x, y, y_new, op, 4, sigmas[op.name])


def test_full_rank_factors_reproduce_the_conv_to_float32_precision() -> None:
    model = conv_model(trained_conv(16, 8, 3), [7, 7], strides=[2, 2], pads=[1, 1, 1, 1])
    (op,) = extract_operators(model).operators
    step = lowrank_step(op, 16)
    assert LowRankConv().check(gs.import_onnx(model), step, {op.name: op}) == (
        "rank 16 of a 16x72 matrix saves nothing: 16*(72+16) >= 16*72"
    )
    new, sigmas = rewrite(model, [op], [16], checked=False)
    assert sigmas[op.name] == 0.0
    x = RNG.standard_normal((2, 8, 7, 7)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (y_new,) = run_model(new, {"x": x})
    assert_certified(x, y, y_new, op, 16, 0.0)


# -- the trained ResNet with BatchNormalization ------------------------------------------------


def _intermediates(
    model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Values of ``names`` in ``model`` (feeds included), exposed as extra graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output} | set(feeds)
    for name in names:
        if name not in known:
            exposed.graph.output.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            )
            known.add(name)
    outputs = [o.name for o in exposed.graph.output]
    return {**feeds, **dict(zip(outputs, run_model(exposed, feeds), strict=True))}


def test_every_conv_of_the_trained_resnet_with_batchnorm() -> None:
    """All eight Conv+BatchNormalization pairs become two Convs each; every rewritten
    operator's output is within its certificate for the input it sees in the rewritten
    model (calibration digits)."""
    model = name_nodes(onnx.load(str(fixture_path("resnet_digits_bn"))))
    extraction = extract_operators(model)
    convs = [op for op in extraction.operators if op.op_type == "Conv"]
    assert len(convs) == 8 and all(op.folded_batchnorm for op in convs)
    # half the largest rank that still saves: q (d_in + d_out) < d_in d_out
    ranks = [max(1, (op.shape[0] * op.shape[1] - 1) // sum(op.shape) // 2) for op in convs]
    new, sigmas = rewrite(model, convs, ranks)

    before, after = op_types(model), op_types(new)
    assert before["BatchNormalization"] == 8 and after["BatchNormalization"] == 0
    assert after["Conv"] == 2 * before["Conv"] == 16
    # the exporter's Identity (one BN bias shared by value with another) fed a folded
    # BatchNormalization only, so cleanup drops it too
    assert after - Counter({"Conv": 16}) == before - Counter(
        {"Conv": 8, "BatchNormalization": 8, "Identity": 1}
    )
    assert_envelope_kept(model, new)
    assert sum(int(np.prod(i.dims)) for i in new.graph.initializer) < sum(
        int(np.prod(i.dims)) for i in model.graph.initializer
    )

    feeds = {"input": models.load_calib("resnet_digits_bn")["input"][:16]}
    seen = _intermediates(new, [t for op in convs for t in (op.input, op.output)], feeds)
    for op, q in zip(convs, ranks, strict=True):
        assert op.geometry is not None
        x = seen[op.input]
        patches = receptive_fields(x, op.geometry)
        exact = patches @ op.weight.T + op.bias  # the original Conv+BN on this input
        err = np.linalg.norm(pixels_last(seen[op.output]) - exact, axis=2)
        patch_norm = np.linalg.norm(patches, axis=2)
        bound = sigmas[op.name] * patch_norm + slack(op, q, patch_norm)
        assert np.all(err <= bound), op.name


# -- declines ----------------------------------------------------------------------------------


def _check(model: onnx.ModelProto, q: int) -> str | None:
    model = name_nodes(model)
    ops = {op.name: op for op in extract_operators(model).operators}
    (op,) = ops.values()
    return LowRankConv().check(gs.import_onnx(model), lowrank_step(op, q), ops)


def test_declines_grouped_and_depthwise_convs() -> None:
    grouped = conv_model(trained_conv(16, 4, 3), [8, 8], group=4)  # 16 in, 4 per group
    assert extract_operators(grouped).operators[0].shape == (16, 144)
    assert _check(grouped, 2) == "grouped conv (groups=4) is not factorised"
    depthwise = conv_model(trained_conv(16, 1, 3), [8, 8], group=16)
    assert _check(depthwise, 2) == "depthwise conv (groups=16) is not factorised"


def test_declines_conv_transpose_a_useless_rank_and_a_matmul() -> None:
    transpose = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up")],
        [tensor("x", ["batch", 8, 4, 4])], [tensor("y", ["batch", 4, 6, 6])],
        [const("w", trained_conv(8, 4, 3))],
    )
    assert _check(transpose, 2) == "ConvTranspose is not factorised"
    conv = conv_model(trained_conv(16, 8, 3), [8, 8])
    assert _check(conv, 14) == "rank 14 of a 16x72 matrix saves nothing: 14*(72+16) >= 16*72"
    assert _check(conv, 13) is None
    matmul = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 16])], [tensor("y", ["batch", 8])],
        [const("w", trained_matrix(16, 8))],
    )
    assert _check(matmul, 2) == "'mm' is a MatMul; this rewrite handles Conv"

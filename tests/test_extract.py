"""Extraction on graphs written the way exporters write them.

Where an operator's matrix view can be checked against onnxruntime running the original
graph, it is: ``W x + b`` of the record must equal what the node computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import const, make_model, tensor, trained_conv, trained_matrix
from onnx import helper, numpy_helper

from qmpass import QmpassInputError, analyze
from qmpass.extract import extract_operators


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


RNG = np.random.default_rng(0)
X = RNG.standard_normal((5, 16)).astype(np.float32)


def check_affine(model: onnx.ModelProto, x: np.ndarray, rows: bool = True) -> None:
    """The single operator of ``model`` maps ``x`` as ORT does."""
    (op,) = extract_operators(model).operators
    (expected,) = run(model, {"x": x})
    bias = 0.0 if op.bias is None else op.bias
    if rows:
        got = x.astype(np.float64) @ op.weight.T + bias
    else:
        got = (
            op.weight @ x.astype(np.float64) + bias[:, None]
            if op.bias is not None
            else op.weight @ x.astype(np.float64)
        )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_matmul_with_initializer_and_bias_add() -> None:
    w, b = trained_matrix(8, 16), trained_matrix(1, 8)[0]
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["y"], name="bias"),
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
        [const("w", w.T), const("b", b)],
    )
    (op,) = extract_operators(model).operators
    assert (op.op_type, op.shape, op.weight_source, op.bias_source, op.output) == (
        "MatMul",
        (8, 16),
        "initializer",
        "Add",
        "y",
    )
    assert op.params == 8 * 16 + 8
    check_affine(model, X)


def test_matmul_weight_in_constant_node() -> None:
    w = trained_matrix(8, 16)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=const("w", w.T)),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
    )
    (op,) = extract_operators(model).operators
    assert op.weight_source == "constant_node" and op.bias is None
    check_affine(model, X)


def test_weight_behind_transpose_and_reshape_is_folded() -> None:
    w = trained_matrix(8, 16)  # stored as (8, 16), transposed at run time, as some exporters do
    flat = w.reshape(-1)
    model = make_model(
        [
            helper.make_node("Reshape", ["wflat", "shape"], ["w_oi"]),
            helper.make_node("Transpose", ["w_oi"], ["w"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
        [const("wflat", flat), numpy_helper.from_array(np.array([8, 16], np.int64), "shape")],
    )
    (op,) = extract_operators(model).operators
    assert op.weight_source == "folded(Transpose)"
    check_affine(model, X)


def test_constant_of_shape_weight() -> None:
    model = make_model(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["w"],
                value=numpy_helper.from_array(np.array([0.25], np.float32)),
            ),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 4])],
        [numpy_helper.from_array(np.array([16, 4], np.int64), "shape")],
    )
    (op,) = extract_operators(model).operators
    assert op.weight_source == "folded(ConstantOfShape)"
    assert np.linalg.matrix_rank(op.weight) == 1
    check_affine(model, X)


def test_a_constant_of_shape_is_folded_without_its_memory_and_a_bad_one_not_at_all() -> None:
    """The folded value is a read-only broadcast of the one value (ONNX's light test
    models make every weight so: 0.55 GB on VGG-19); a negative dimension or a missing
    shape is not folded."""
    from qmpass.extract.constants import ConstantScope

    def scope(shape: list[int]) -> ConstantScope:
        node = helper.make_node("ConstantOfShape", ["shape"], ["w"],
                                value=numpy_helper.from_array(np.array([0.25], np.float32)))
        graph = helper.make_graph([node], "g", [], [tensor("w", [])],
                                  [numpy_helper.from_array(np.array(shape, np.int64), "shape")])
        return ConstantScope(graph, {"": 17})

    folded = scope([4096, 4096]).value("w")
    assert folded is not None and folded.shape == (4096, 4096) and folded.dtype == np.float32
    assert folded.strides == (0, 0) and not folded.flags.writeable
    assert np.all(folded == np.float32(0.25))
    assert scope([4, -1]).value("w") is None
    inputless = helper.make_node("ConstantOfShape", [], ["w"])  # breaks the spec
    graph = helper.make_graph([inputless], "g", [], [tensor("w", [])])
    assert ConstantScope(graph, {"": 17}).value("w") is None


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb_alpha_beta_bias(trans_b: int) -> None:
    w, c = trained_matrix(8, 16), trained_matrix(1, 8)[0]
    stored = w if trans_b else w.T
    model = make_model(
        [
            helper.make_node(
                "Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0
            )
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
        [const("w", stored), const("c", c)],
    )
    (op,) = extract_operators(model).operators
    assert op.bias_source == "Gemm C" and op.shape == (8, 16)
    check_affine(model, X)


def test_gemm_transa_keeps_rows_of_the_transposed_input() -> None:
    w = trained_matrix(8, 16)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1, transB=1)],
        [tensor("x", [16, 5])],
        [tensor("y", [5, 8])],
        [const("w", w)],
    )
    (op,) = extract_operators(model).operators
    (expected,) = run(model, {"x": X.T.copy()})
    np.testing.assert_allclose(X @ op.weight.T, expected, rtol=1e-5, atol=1e-5)


def test_weight_on_the_left_of_matmul() -> None:
    w = trained_matrix(8, 16)
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
        [tensor("x", [16, 5])],
        [tensor("y", [8, 5])],
        [const("w", w)],
    )
    (op,) = extract_operators(model).operators
    assert op.weight_side == "left" and op.input == "x"
    check_affine(model, X.T.copy(), rows=False)


def test_activation_matmul_is_skipped_with_reason() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "x2"], ["y"], name="qk")],
        [tensor("x", [4, 16]), tensor("x2", [16, 4])],
        [tensor("y", [4, 4])],
    )
    extraction = extract_operators(model)
    assert not extraction.operators
    assert extraction.skipped[0].reason == "both operands are activations (no weight)"


def _conv_patches(x: np.ndarray, k: int) -> np.ndarray:
    """(pixels, C*k*k) receptive fields of a stride-1, unpadded 2-D convolution."""
    windows = np.lib.stride_tricks.sliding_window_view(x[0], (k, k), axis=(1, 2))
    c, h, w = windows.shape[:3]
    return windows.transpose(1, 2, 0, 3, 4).reshape(h * w, c * k * k)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_grouped_and_depthwise_matrix_view(group: int) -> None:
    c_in = c_out = 8
    w = trained_conv(c_out, c_in // group, 3)
    b = trained_matrix(1, c_out)[0]
    model = make_model(
        [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["y"], name="conv", group=group, kernel_shape=[3, 3]
            )
        ],
        [tensor("x", ["N", c_in, 6, 6])],
        [tensor("y", ["N", c_out, 4, 4])],
        [const("w", w), const("b", b)],
    )
    (op,) = extract_operators(model).operators
    assert op.geometry is not None and op.geometry.groups == group
    assert op.params == w.size + b.size
    assert op.flops == 2 * 16 * w.size
    x = RNG.standard_normal((1, c_in, 6, 6)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    # group g reads channels [g*C/G, (g+1)*C/G): the block-diagonal view needs per-group
    # patches laid out group after group, which is what channel-major patches already are
    got = _conv_patches(x, 3).astype(np.float64) @ op.weight.T + op.bias
    np.testing.assert_allclose(got.T.reshape(c_out, 4, 4), expected[0], rtol=1e-4, atol=1e-4)
    # singular values of the whole operator are those of all groups together
    blocks = w.reshape(group, c_out // group, -1).astype(np.float64)
    per_group = np.sort(np.concatenate([np.linalg.svd(b_, compute_uv=False) for b_ in blocks]))
    np.testing.assert_allclose(
        np.sort(np.linalg.svd(op.weight, compute_uv=False)), per_group, rtol=1e-10
    )


def test_conv_followed_by_batchnorm_is_folded() -> None:
    w = trained_conv(8, 4, 3)
    stats = [
        np.abs(trained_matrix(1, 8)[0]) + 0.5,
        trained_matrix(2, 8)[1],
        trained_matrix(3, 8)[2],
        np.abs(trained_matrix(4, 8)[3]) + 0.1,
    ]
    names = ["gamma", "beta", "mean", "var"]
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn", epsilon=1e-3),
        ],
        [tensor("x", ["N", 4, 6, 6])],
        [tensor("y", ["N", 8, 6, 6])],
        [const("w", w), *(const(n, s) for n, s in zip(names, stats, strict=True))],
    )
    (op,) = extract_operators(model).operators
    assert (op.folded_batchnorm, op.bias_source, op.output) == ("bn", "BatchNormalization", "y")
    folded = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        [tensor("x", ["N", 4, 6, 6])],
        [tensor("y", ["N", 8, 6, 6])],
        [const("w", op.weight.reshape(w.shape)), const("b", op.bias)],
    )
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("rank", [1, 3])
def test_conv_1d_and_3d_with_dilation(rank: int) -> None:
    w = trained_matrix(6, 4 * 3**rank).reshape(6, 4, *([3] * rank))
    spatial = [7] * rank
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", dilations=[2] * rank)],
        [tensor("x", ["N", 4, *spatial])],
        [tensor("y", ["N", 6, *([3] * rank)])],
        [const("w", w)],
    )
    (op,) = extract_operators(model).operators
    assert op.shape == (6, 4 * 3**rank)
    assert op.geometry is not None and op.geometry.dilations == (2,) * rank
    assert op.flops == 2 * 3**rank * w.size  # output is 3 wide per spatial axis


def test_conv_transpose_is_the_adjoint_view() -> None:
    w = trained_conv(4, 6, 2)  # ConvTranspose weight: (Cin=4, Cout=6, 2, 2)
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])],
        [tensor("x", ["N", 4, 3, 3])],
        [tensor("y", ["N", 6, 6, 6])],
        [const("w", w)],
    )
    (op,) = extract_operators(model).operators
    assert op.shape == (6 * 4, 4)
    x = RNG.standard_normal((1, 4, 3, 3)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    # stride == kernel: output pixels of different input pixels never overlap
    pixel = op.weight @ x[0, :, 1, 2].astype(np.float64)
    np.testing.assert_allclose(pixel.reshape(6, 2, 2), expected[0, :, 2:4, 4:6], atol=1e-5)


def test_operators_in_if_branches_are_listed() -> None:
    w1, w2 = trained_matrix(8, 16), trained_matrix(8, 16)[::-1].copy()
    branch = [
        helper.make_graph(
            [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}")],
            f"branch_{name}",
            [],
            [tensor(f"y_{name}", ["batch", 8])],
        )
        for name in ("w1", "w2")
    ]
    model = make_model(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=branch[0], else_branch=branch[1]
            )
        ],
        [
            tensor("x", ["batch", 16]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [tensor("y", ["batch", 8])],
        [const("w1", w1.T), const("w2", w2.T)],
    )
    ops = extract_operators(model).operators
    assert sorted((op.name, op.graph) for op in ops) == [
        ("mm_w1", "main/if.then_branch"),
        ("mm_w2", "main/if.else_branch"),
    ]
    assert all(op.in_subgraph for op in ops)


def test_custom_domain_op_is_reported_not_fatal() -> None:
    w = trained_matrix(8, 16)
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], name="fused", domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [tensor("x", [2, 16])], [tensor("y", [2, 8])], initializer=[const("w", w.T)]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    extraction = extract_operators(model)
    assert not extraction.operators
    assert [(u.name, u.reason) for u in extraction.unsupported] == [
        ("fused", "op of domain 'com.microsoft' left untouched")
    ]


def test_nan_weights_are_bad_input() -> None:
    w = trained_matrix(8, 16)
    w[3, 3] = np.nan
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
        [const("w", w.T)],
    )
    with pytest.raises(QmpassInputError, match="NaN or Inf"):
        extract_operators(model)


def test_external_data_is_read_and_its_absence_is_bad_input(tmp_path) -> None:
    w = trained_matrix(64, 64)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 64])],
        [tensor("y", ["batch", 64])],
        [const("w", w.T)],
    )
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    (op,) = analyze(path).operators
    assert op.weight_source == "external_data"
    np.testing.assert_array_equal(op.weight, w.astype(np.float64))
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(QmpassInputError, match="external data"):
        analyze(path)


def test_dynamic_batch_counts_flops_per_sample() -> None:
    w = trained_matrix(8, 16)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 10, 16])],
        [tensor("y", ["batch", 10, 8])],
        [const("w", w.T)],
    )
    (op,) = extract_operators(model).operators
    assert op.flops == 2 * 10 * 8 * 16


def test_fusion_groups_are_operators_reading_one_tensor(fixture_names) -> None:
    from conftest import fixture_path

    groups = extract_operators(onnx.load(str(fixture_path("transformer_digits")))).fusion_groups
    assert len(groups) == 2
    for group in groups:
        assert [name.rsplit("/", 2)[-2] for name in group] == ["q_proj", "k_proj", "v_proj"]


def test_extraction_does_not_modify_the_model() -> None:
    from conftest import fixture_path

    model = onnx.load(str(fixture_path("resnet_digits_bn")))
    before = model.SerializeToString()
    analyze(model)
    assert model.SerializeToString() == before


def test_operators_in_a_loop_body_are_listed() -> None:
    w = trained_matrix(16, 16)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_mm"], name="loop_mm"),
         helper.make_node("Relu", ["h_mm"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         tensor("h_in", [1, 16])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         tensor("h_out", [1, 16])],
    )
    model = make_model(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)],
        [tensor("x", [1, 16]), helper.make_tensor_value_info("trip", onnx.TensorProto.INT64, [])],
        [tensor("y", [1, 16])],
        [const("w", w.T)],
    )
    (op,) = extract_operators(model).operators
    assert (op.name, op.graph, op.weight_source) == ("loop_mm", "main/loop.body", "initializer")
    (expected,) = run(model, {"x": X[:1], "trip": np.array(1, np.int64)})
    np.testing.assert_allclose(np.maximum(X[:1] @ op.weight.T, 0), expected, atol=1e-5)


def test_a_node_that_breaks_the_spec_is_skipped_not_fatal() -> None:
    w = trained_matrix(8, 16)
    broken = helper.make_node("Gemm", ["x"], ["h"], name="broken")  # B is missing
    graph = helper.make_graph(
        [broken, helper.make_node("MatMul", ["x", "w"], ["y"], name="ok")], "g",
        [tensor("x", [2, 16])], [tensor("y", [2, 8]), tensor("h", [2, 8])],
        initializer=[const("w", w.T)],
    )
    extraction = extract_operators(helper.make_model(graph))
    assert [op.name for op in extraction.operators] == ["ok"]
    assert extraction.skipped[0].name == "broken"
    assert extraction.skipped[0].reason.startswith("not understood (IndexError")


def test_gemm_with_a_full_matrix_c_is_analysed_without_bias() -> None:
    w = trained_matrix(8, 16)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)],
        [tensor("x", [5, 16])], [tensor("y", [5, 8])],
        [const("w", w), const("c", trained_matrix(5, 8))],
    )
    (op,) = extract_operators(model).operators
    assert op.bias is None
    assert op.notes == ("bias C of shape (5, 8) is not per-output; analysed without it",)


def test_rank3_constant_operand_is_skipped_with_reason() -> None:
    w = trained_matrix(32, 16).reshape(2, 16, 16)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")],
        [tensor("x", [2, 5, 16])], [tensor("y", [2, 5, 16])], [const("w", w)],
    )
    extraction = extract_operators(model)
    assert not extraction.operators
    assert extraction.skipped[0].reason == (
        "constant operand has rank 3; only 2-D weights are analysed"
    )


def test_flops_follow_shapes_through_exporter_reshapes() -> None:
    """The exporter rebuilds out_proj's input with Shape/Gather/Concat/Reshape for a
    dynamic batch; the 8 tokens of a sample must still be counted."""
    from conftest import fixture_path

    ops = extract_operators(onnx.load(str(fixture_path("transformer_digits")))).operators
    flops = {op.name.rsplit("/", 2)[-2]: op.flops for op in ops if "layers.0" in op.name}
    tokens, width = 8, 64
    assert flops["out_proj"] == flops["q_proj"] == 2 * tokens * width * width
    assert flops["mlp.0"] == 2 * tokens * width * 2 * width


def test_bias_cast_like_the_graph_input_is_constant() -> None:
    """torch's dynamo exporter (optimize=False) writes a Conv bias as
    ``Expand(CastLike(0, input), Shape(weight)[:1])``: constant, though it names the input."""
    w = trained_conv(8, 4, 3)
    model = make_model(
        [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0))),
         helper.make_node("CastLike", ["zero", "x"], ["zero_f"]),
         helper.make_node("Shape", ["w"], ["w_shape"], end=1),
         helper.make_node("Expand", ["zero_f", "w_shape"], ["b"]),
         helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 8, 4, 4])], [const("w", w)],
    )
    (op,) = extract_operators(model).operators
    assert op.bias_source == "Conv B"
    np.testing.assert_array_equal(op.bias, np.zeros(8))

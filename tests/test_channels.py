"""Coupled channel groups on graphs written the way exporters write them, and on the
trained fixtures: which channels are pruned together, what is sliced, and what pins."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from channel_helpers import bias, conv, relu, residual_model
from conftest import const, fixture_path, make_model, tensor, trained_conv, trained_matrix
from onnx import TensorProto, helper

from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.rewrite.base import name_nodes


def groups_of(model: onnx.ModelProto) -> dict[str, ChannelGroup]:
    return {g.name: g for g in channel_groups(name_nodes(model))}


def prunable(groups: dict[str, ChannelGroup]) -> set[str]:
    return {name for name, g in groups.items() if g.reason is None}


X = tensor("x", ["batch", 3, 6, 6])


def test_residual_add_unites_both_branches() -> None:
    groups = groups_of(residual_model(size=6))
    assert list(groups) == ["x", "a", "b1", "c"]
    assert prunable(groups) == {"a", "b1"}
    a = groups["a"]
    assert (a.channels, a.channel_axis) == (8, 1)
    assert [(p.node, p.tensor, p.axis) for p in a.producers] == [("a", "wa", 0), ("b2", "wb2", 0)]
    assert [(s.node, s.input_index, s.axis) for s in a.sliced] == [("a", 2, 0), ("b2", 2, 0)]
    assert [(c.node, c.activation, c.axis, c.width) for c in a.consumers] == [
        ("b1", "r", 1, 8), ("c", "sr", 1, 8)
    ]
    assert set(a.tensors) == {"h", "r", "u", "s", "sr"}
    assert a.operators == ("a", "b2", "b1", "c")
    # one channel: a's row (27) and bias, b2's row (72) and bias, b1's column (72), c's (4)
    assert a.params_per_channel == 27 + 1 + 72 + 1 + 72 + 4
    assert [c.node for c in groups["b1"].consumers] == ["b2"]
    assert groups["x"].reason == "no weight produces its channels ('x' is a graph input)"
    assert groups["c"].reason == "tensor 'y' is a graph output"


def concat_model(after: str | None = None) -> onnx.ModelProto:
    nodes = [
        conv("a", "x", "wa", "ha", "ba"),
        relu("ha", "ra"),
        conv("b", "x", "wb", "hb", "bb"),
        relu("hb", "rb"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
        conv("c", "cat" if after is None else "after", "wc", "y", "bc"),
    ]
    if after is not None:
        nodes.insert(5, helper.make_node(after, ["cat"], ["after"], name="after"))
    return make_model(
        nodes,
        [X],
        [tensor("y", ["batch", 5, 4, 4])],
        [
            const("wa", trained_conv(4, 3, 3)), const("ba", bias(4)),
            const("wb", trained_conv(6, 3, 3)[::-1]), const("bb", bias(6)),
            const("wc", trained_conv(5, 10, 1)), const("bc", bias(5)),
        ],
    )


def test_concat_maps_each_input_at_its_offset() -> None:
    groups = groups_of(concat_model())
    assert prunable(groups) == {"a", "b"}
    assert "cat" not in groups  # the concat output is not a group of its own
    for name, offset, channels in (("a", 0, 4), ("b", 4, 6)):
        (consumer,) = groups[name].consumers
        assert (consumer.node, consumer.activation, consumer.offset, consumer.width) == (
            "c", "cat", offset, 10
        )
        assert groups[name].channels == channels


def test_concat_read_by_another_op_pins_its_inputs() -> None:
    groups = groups_of(concat_model(after="Sigmoid"))
    assert prunable(groups) == set()
    assert "output 'cat' of Concat 'concat' is used by more than weight consumers" in str(
        groups["a"].reason
    )


def test_depthwise_conv_joins_its_input_group() -> None:
    model = make_model(
        [
            conv("a", "x", "wa", "h", "ba", pads=[1, 1, 1, 1]),
            relu("h", "r"),
            conv("dw", "r", "wdw", "d", "bdw", group=8, pads=[1, 1, 1, 1]),
            relu("d", "dr"),
            conv("c", "dr", "wc", "y"),
        ],
        [X],
        [tensor("y", ["batch", 4, 6, 6])],
        [
            const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)),
            const("wdw", trained_conv(8, 1, 3)), const("bdw", bias(8)),
            const("wc", trained_conv(4, 8, 1)),
        ],
    )
    groups = groups_of(model)
    assert prunable(groups) == {"a"}
    a = groups["a"]
    assert [(s.node, s.input_index, s.tensor, s.axis) for s in a.sliced] == [
        ("a", 2, "ba", 0), ("dw", 1, "wdw", 0), ("dw", 2, "bdw", 0)
    ]
    assert [c.node for c in a.consumers] == ["c"]
    assert {"h", "r", "d", "dr"} == set(a.tensors)


def test_grouped_conv_consumer_pins() -> None:
    model = make_model(
        [
            conv("a", "x", "wa", "h", "ba"),
            relu("h", "r"),
            conv("g", "r", "wg", "y", group=2),
        ],
        [X],
        [tensor("y", ["batch", 8, 2, 2])],
        [const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)),
         const("wg", trained_conv(8, 4, 3))],
    )
    groups = groups_of(model)
    assert prunable(groups) == set()
    assert groups["a"].reason == "tensor 'r' is read by grouped Conv 'g' (group=2)"


def test_batchnorm_after_conv_is_sliced() -> None:
    c = 8
    model = make_model(
        [
            conv("a", "x", "wa", "h"),
            helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["n"], name="bn"),
            relu("n", "r"),
            conv("c", "r", "wc", "y"),
        ],
        [X],
        [tensor("y", ["batch", 4, 4, 4])],
        [
            const("wa", trained_conv(c, 3, 3)), const("g", 1 + bias(c)), const("be", bias(c)),
            const("m", bias(c)[::-1]), const("v", 1 + np.abs(bias(c))),
            const("wc", trained_conv(4, c, 1)),
        ],
    )
    a = groups_of(model)["a"]
    assert a.reason is None
    assert [(s.node, s.input_index, s.tensor) for s in a.sliced] == [
        ("bn", 1, "g"), ("bn", 2, "be"), ("bn", 3, "m"), ("bn", 4, "v")
    ]


def mlp_nodes(out: str = "y") -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["b1", "h"], ["hb"], name="bias1"),
        relu("hb", "r"),
        helper.make_node("MatMul", ["r", "w2"], [out], name="mm2"),
    ]


def test_bias_add_after_matmul_is_sliced_on_the_last_axis() -> None:
    model = make_model(
        mlp_nodes(),
        [tensor("x", ["batch", 5, 16])],
        [tensor("y", ["batch", 5, 4])],
        [const("w1", trained_matrix(8, 16).T), const("b1", bias(8)),
         const("w2", trained_matrix(4, 8).T)],
    )
    groups = groups_of(model)
    g = groups["mm1"]
    assert (g.reason, g.channels, g.channel_axis) == (None, 8, -1)
    assert [(p.node, p.axis) for p in g.producers] == [("mm1", 1)]
    assert [(s.node, s.input_index, s.tensor, s.axis) for s in g.sliced] == [
        ("bias1", 0, "b1", 0)
    ]
    assert [(c.node, c.axis, c.width) for c in g.consumers] == [("mm2", 0, 8)]


def test_graph_output_pins() -> None:
    model = make_model(
        [conv("a", "x", "wa", "h", "ba"), relu("h", "r"), conv("c", "r", "wc", "y")],
        [X],
        [tensor("y", ["batch", 4, 4, 4]), tensor("r", ["batch", 8, 4, 4])],
        [const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)),
         const("wc", trained_conv(4, 8, 1))],
    )
    assert groups_of(model)["a"].reason == "tensor 'r' is a graph output"


def test_shared_weight_pins() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
            relu("h", "r"),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm2"),
        ],
        [tensor("x", ["batch", 8])],
        [tensor("y", ["batch", 8])],
        [const("w", trained_matrix(8, 8))],
    )
    reason = groups_of(model)["mm1"].reason
    assert reason == "weight 'w' of MatMul 'mm1' is shared with mm2; " \
        "weight 'w' of MatMul 'mm2' is shared with mm1"


def test_constant_node_weights_are_handled_and_computed_ones_pin() -> None:
    w1 = trained_matrix(8, 16).T
    stored = make_model(
        [helper.make_node("Constant", [], ["w1"], name="cst",
                          value=onnx.numpy_helper.from_array(w1, "w1")), *mlp_nodes()],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 4])],
        [const("b1", bias(8)), const("w2", trained_matrix(4, 8).T)],
    )
    g = groups_of(stored)["mm1"]
    assert g.reason is None
    assert g.producers[0].tensor == "w1"
    computed = make_model(
        [helper.make_node("Transpose", ["w1t"], ["w1"], name="tr"), *mlp_nodes()],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 4])],
        [const("w1t", w1.T), const("b1", bias(8)), const("w2", trained_matrix(4, 8).T)],
    )
    assert groups_of(computed)["mm1"].reason == (
        "weight of MatMul 'mm1': 'w1' is computed by Transpose 'tr', not stored"
    )


def test_tensor_captured_by_a_subgraph_pins() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["o"], name="then_id")], "then", [],
        [tensor("o", ["batch", 8, 4, 4])])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["o2"], name="else_neg")], "else", [],
        [tensor("o2", ["batch", 8, 4, 4])])
    model = make_model(
        [
            conv("a", "x", "wa", "h", "ba"),
            relu("h", "r"),
            conv("c", "r", "wc", "y"),
            helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_branch,
                             else_branch=else_branch),
        ],
        [X, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [tensor("y", ["batch", 4, 4, 4]), tensor("z", ["batch", 8, 4, 4])],
        [const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)),
         const("wc", trained_conv(4, 8, 1))],
    )
    assert groups_of(model)["a"].reason == "tensor 'r' is read inside a subgraph of If 'if'"


# -- the trained fixtures ----------------------------------------------------------------------


def fixture(name: str) -> dict[str, ChannelGroup]:
    return groups_of(onnx.load(str(fixture_path(name))))


RESNET_PRUNABLE = {
    "/0/0.0/Conv",
    "/2/body/body.0/body.0.0/Conv",
    "/3/body/body.0/body.0.0/Conv",
    "/3/body/body.2/body.2.0/Conv",
    "/4/body/body.0/body.0.0/Conv",
}


def check_resnet(groups: dict[str, ChannelGroup]) -> None:
    assert prunable(groups) == RESNET_PRUNABLE
    stem = groups["/0/0.0/Conv"]
    assert [p.node for p in stem.producers] == ["/0/0.0/Conv", "/2/body/body.2/body.2.0/Conv"]
    assert [c.node for c in stem.consumers] == [
        "/2/body/body.0/body.0.0/Conv", "/3/body/body.0/body.0.0/Conv",
        "/3/shortcut/shortcut.0/Conv",
    ]
    last = groups["/3/body/body.2/body.2.0/Conv"]
    assert [p.node for p in last.producers] == [
        "/3/body/body.2/body.2.0/Conv", "/3/shortcut/shortcut.0/Conv",
        "/4/body/body.2/body.2.0/Conv",
    ]
    assert [(c.node, c.activation, c.axis) for c in last.consumers] == [
        ("/4/body/body.0/body.0.0/Conv", "/3/relu/Relu_output_0", 1),
        ("/7/Gemm", "/6/Flatten_output_0", 1),  # GAP -> Flatten: the classifier head
    ]
    for name in ("/2", "/3", "/4"):
        hidden = groups[f"{name}/body/body.0/body.0.0/Conv"]
        assert [c.node for c in hidden.consumers] == [f"{name}/body/body.2/body.2.0/Conv"]
    assert groups["/7/Gemm"].reason == "tensor 'logits' is a graph output"


def test_resnet_fixture() -> None:
    groups = fixture("resnet_digits")
    check_resnet(groups)
    assert groups["/3/body/body.2/body.2.0/Conv"].channels == 32


def test_resnet_bn_fixture_slices_batchnorm_and_identity_biases() -> None:
    groups = fixture("resnet_digits_bn")
    check_resnet(groups)
    last = groups["/3/body/body.2/body.2.0/Conv"]
    assert len(last.sliced) == 12  # three BatchNorms, four parameters each
    # the exporter stored the shortcut BN's bias as Identity of an equal initializer
    assert ("/3/shortcut/shortcut.1/BatchNormalization", 2, "3.body.2.1.bias") in {
        (s.node, s.input_index, s.tensor) for s in last.sliced
    }


def test_transformer_fixture() -> None:
    groups = fixture("transformer_digits")
    assert prunable(groups) == {
        "/layers/layers.0/mlp/mlp.0/MatMul", "/layers/layers.1/mlp/mlp.0/MatMul"
    }
    mlp = groups["/layers/layers.0/mlp/mlp.0/MatMul"]
    assert (mlp.channels, mlp.channel_axis) == (128, -1)
    assert [(c.node, c.activation) for c in mlp.consumers] == [
        ("/layers/layers.0/mlp/mlp.2/MatMul", "/layers/layers.0/mlp/mlp.1/Mul_1_output_0")
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        reason = groups[f"/layers/layers.0/attn/{proj}/MatMul"].reason
        assert reason is not None and "Reshape" in reason
    stream = groups["/embed/MatMul"]  # the residual stream: every block adds into it
    assert len(stream.producers) == 5
    assert stream.reason is not None and "LayerNormalization" in stream.reason


def test_mlp_fixture() -> None:
    groups = fixture("mlp_digits")
    assert prunable(groups) == {"/0/Gemm", "/2/Gemm"}
    hidden = groups["/0/Gemm"]
    assert [(p.node, p.axis) for p in hidden.producers] == [("/0/Gemm", 0)]  # transB=1
    assert [(c.node, c.axis, c.width) for c in hidden.consumers] == [("/2/Gemm", 1, 128)]
    assert hidden.params_per_channel == 64 + 1 + 64  # a row of W1, a bias, a column of W2


def test_analysis_does_not_modify_the_model() -> None:
    model = name_nodes(onnx.load(str(fixture_path("resnet_digits_bn"))))
    before = model.SerializeToString()
    channel_groups(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("head", ["Flatten", "Reshape", "Squeeze", "ReduceMean"])
def test_pooled_classifier_heads_consume_the_last_group(head: str) -> None:
    """GAP then [N, C]: the ways exporters write a classifier head's input."""
    nodes = [
        conv("a", "x", "wa", "h", "ba"),
        relu("h", "r"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
    ]
    initializers = [const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)),
                    const("wf", trained_matrix(10, 8)), const("bf", bias(10))]
    if head == "Flatten":
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="head", axis=1))
    elif head == "Reshape":
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["f"], name="head"))
        initializers.append(onnx.numpy_helper.from_array(np.array([0, -1]), "shape"))
    elif head == "Squeeze":
        nodes.append(helper.make_node("Squeeze", ["p", "axes"], ["f"], name="head"))
        initializers.append(onnx.numpy_helper.from_array(np.array([2, 3]), "axes"))
    else:
        nodes[-1] = helper.make_node("ReduceMean", ["r"], ["f"], name="head", axes=[2, 3],
                                     keepdims=0)
    nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1))
    model = make_model(nodes, [X], [tensor("y", ["batch", 10])], initializers)
    a = groups_of(model)["a"]
    assert a.reason is None
    assert [(c.node, c.activation, c.axis, c.width) for c in a.consumers] == [
        ("fc", "f", 1, 8)
    ]
    assert a.channel_axis == 1

"""Structured channel pruning: how many places change, the shapes after pruning, and
agreement in onnxruntime with the original model.

Exactness is built into the weights, not hoped for: channels whose producer rows are
zero carry nothing, and channels that are positive multiples (or constants) of kept ones
are exactly what least-squares compensation from a covariance reconstructs. Those cases
must agree to float32 rounding: ``TOL`` is the relative error of a few float32
reductions over at most a few hundred terms (eps = 1.2e-7), with a margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from channel_helpers import bias, conv, relu, residual_model, zero_rows
from conftest import const, fixture_path, make_model, tensor, trained_conv, trained_matrix
from onnx import TensorProto, helper, numpy_helper

import models
from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.plan.plan import Cost, Step
from qmpass.rewrite.base import export_like, name_nodes
from qmpass.rewrite.prune_channels import PruneChannels
from qmpass.verify import run_model

TOL = 2e-6
RNG = np.random.default_rng(7)
X_CONV = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
X_ROWS = RNG.standard_normal((64, 16)).astype(np.float32)
X_TOKENS = RNG.standard_normal((16, 5, 16)).astype(np.float32)


# -- helpers -------------------------------------------------------------------------------


def step_for(group: ChannelGroup, kept: Sequence[int]) -> Step:
    return Step(
        kind="prune_channels",
        operators=group.operators,
        before=Cost(0, 0),
        after=Cost(0, 0),
        predicted_error=0.0,
        group=group.name,
        channels=group.channels,
        kept=tuple(kept),
    )


def prune(
    model: onnx.ModelProto,
    steps: Sequence[tuple[str, Sequence[int], Mapping[str, np.ndarray]]],
) -> onnx.ModelProto:
    """Apply the steps ``(group, kept, tensors)`` in order, as a driver would, and return
    the exported model after checking it in full."""
    named = name_nodes(model)
    groups = {g.name: g for g in channel_groups(named)}
    rewrite = PruneChannels(list(groups.values()))
    graph = gs.import_onnx(named)
    for name, kept, tensors in steps:
        step = step_for(groups[name], kept)
        assert rewrite.check(graph, step, {}) is None
        rewrite.apply(graph, step, {}, tensors)
        assert rewrite.check(graph, step, {}) is not None  # the group is pruned now
    pruned = export_like(graph, named)
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.graph.input == named.graph.input
    assert pruned.graph.output == named.graph.output
    return pruned


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def shapes(model: onnx.ModelProto, *names: str) -> list[tuple[int, ...]]:
    found = weights(model)
    return [tuple(found[name].shape) for name in names]


def rel_error(model: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> float:
    (before,) = run_model(model, {"x": x})[:1]
    (after,) = run_model(pruned, {"x": x})[:1]
    return float(np.linalg.norm(after - before) / np.linalg.norm(before))


def activation(model: onnx.ModelProto, name: str, x: np.ndarray, axis: int) -> np.ndarray:
    """Samples x channels of tensor ``name`` (channels on ``axis``) on input ``x``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    values = run_model(probe, {"x": x})[-1].astype(np.float64)
    values = np.moveaxis(values, axis, -1)
    return values.reshape(-1, values.shape[-1])


def compensation(h: np.ndarray, kept: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Least squares from the covariance: ``h ~= mix @ h[kept] + shift`` per sample."""
    mean = h.mean(axis=0)
    cov = np.cov(h, rowvar=False, bias=True)
    index = np.asarray(kept)
    mix = cov[:, index] @ np.linalg.pinv(cov[np.ix_(index, index)])
    return mix, mean - mix @ mean[index]


def redundant(w: np.ndarray, b: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Producer weights with channels 5 = 0.5 x channel 1, 7 = 2 x channel 2 (exact after a
    Relu, as the scale is positive) and 6 = the constant relu(0.7)."""
    w, b = np.moveaxis(w.copy(), axis, 0), b.copy()
    w[5], b[5] = 0.5 * w[1], 0.5 * b[1]
    w[7], b[7] = 2.0 * w[2], 2.0 * b[2]
    w[6], b[6] = 0.0, 0.7
    return np.moveaxis(w, 0, axis), b


REMOVED = (5, 6, 7)
KEPT = (0, 1, 2, 3, 4)


# -- (a) channels whose producers are zero: pruning them changes nothing ---------------------


def test_residual_group_with_zero_channels_prunes_exactly() -> None:
    model = residual_model(dead=REMOVED)
    pruned = prune(model, [("a", KEPT, {})])
    # both residual branches and both readers changed, nothing else
    assert shapes(pruned, "wa", "ba", "wb2", "bb2", "wb1", "wc", "bb1") == [
        (5, 3, 3, 3), (5,), (5, 8, 3, 3), (5,), (8, 5, 3, 3), (4, 5, 1, 1), (8,)
    ]
    assert len(pruned.graph.node) == len(model.graph.node)
    assert rel_error(model, pruned, X_CONV) < TOL


def test_batchnorm_and_depthwise_are_sliced_with_their_group() -> None:
    dead = [1, 4]
    gamma, beta = zero_rows(1 + bias(8), dead), zero_rows(bias(8), dead)
    model = make_model(
        [
            conv("a", "x", "wa", "h", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["n"],
                             name="bn"),
            relu("n", "r"),
            conv("dw", "r", "wdw", "d", "bdw", group=8, pads=[1, 1, 1, 1]),
            relu("d", "dr"),
            conv("c", "dr", "wc", "y", "bc"),
        ],
        [tensor("x", ["batch", 3, 8, 8])],
        [tensor("y", ["batch", 4, 8, 8])],
        [
            const("wa", trained_conv(8, 3, 3)), const("g", gamma), const("be", beta),
            const("m", bias(8)[::-1]), const("v", 1 + np.abs(bias(8))),
            const("wdw", trained_conv(8, 1, 3)), const("bdw", zero_rows(bias(8), dead)),
            const("wc", trained_conv(4, 8, 1)), const("bc", bias(4)),
        ],
    )
    kept = [0, 2, 3, 5, 6, 7]
    pruned = prune(model, [("a", kept, {})])
    assert shapes(pruned, "wa", "g", "be", "m", "v", "wdw", "bdw", "wc", "bc") == [
        (6, 3, 3, 3), (6,), (6,), (6,), (6,), (6, 1, 3, 3), (6,), (4, 6, 1, 1), (4,)
    ]
    (dw,) = [n for n in pruned.graph.node if n.name == "dw"]
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 6
    assert rel_error(model, pruned, X_CONV) < TOL


def concat_model(dead_a: Sequence[int] = (), dead_b: Sequence[int] = (),
                 wb: np.ndarray | None = None, bb: np.ndarray | None = None) -> onnx.ModelProto:
    return make_model(
        [
            conv("a", "x", "wa", "ha", "ba"),
            relu("ha", "ra"),
            conv("b", "x", "wb", "hb", "bb"),
            relu("hb", "rb"),
            helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
            conv("c", "cat", "wc", "y", "bc"),
        ],
        [tensor("x", ["batch", 3, 8, 8])],
        [tensor("y", ["batch", 5, 6, 6])],
        [
            const("wa", zero_rows(trained_conv(4, 3, 3), dead_a)),
            const("ba", zero_rows(bias(4), dead_a)),
            const("wb", zero_rows(trained_conv(8, 3, 3)[::-1], dead_b) if wb is None else wb),
            const("bb", zero_rows(bias(8), dead_b) if bb is None else bb),
            const("wc", trained_conv(5, 12, 1)), const("bc", bias(5)),
        ],
    )


def test_both_inputs_of_a_concat_pruned_one_after_the_other() -> None:
    model = concat_model(dead_a=[0, 2], dead_b=[1, 6, 7])
    # the second step slices the consumer at b's offset as it is after the first step
    pruned = prune(model, [("a", [1, 3], {}), ("b", [0, 2, 3, 4, 5], {})])
    assert shapes(pruned, "wa", "wb", "wc") == [(2, 3, 3, 3), (5, 3, 3, 3), (5, 7, 1, 1)]
    assert rel_error(model, pruned, X_CONV) < TOL


def test_transformer_mlp_with_zero_channels_prunes_exactly() -> None:
    """The fixture's MLP: MatMul + bias Add -> GELU as Div/Erf/Add/Mul/Mul -> MatMul."""
    model = onnx.load(str(fixture_path("transformer_digits")))
    group = "/layers/layers.0/mlp/mlp.0/MatMul"
    named = name_nodes(model)
    g = {g.name: g for g in channel_groups(named)}[group]
    (producer,), (bias_add,) = g.producers, g.sliced
    dead = list(range(0, 128, 3))
    for init in model.graph.initializer:  # GELU(0) = 0: these channels carry nothing
        if init.name in (producer.tensor, bias_add.tensor):
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(zero_rows(value, dead, axis=value.ndim - 1),
                                                  init.name))
    kept = [c for c in range(128) if c not in dead]
    pruned = prune(model, [(group, kept, {})])
    (consumer,) = g.consumers
    assert shapes(pruned, producer.tensor, bias_add.tensor, consumer.weight) == [
        (64, 85), (85,), (85, 64)
    ]
    x = models.load_calib("transformer_digits")["input"][:64]
    before, after = run_model(model, {"input": x})[0], run_model(pruned, {"input": x})[0]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < TOL


def test_weights_in_constant_nodes_and_identity_biases_are_replaced() -> None:
    """Exporters store weights in Constant nodes and deduplicate equal tensors through
    Identity; the pruned node gets a new initializer, other readers keep the old value."""
    dead = [2, 5]
    w1 = zero_rows(trained_matrix(8, 16).T, dead, axis=1)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w1"], name="cst",
                             value=numpy_helper.from_array(w1, "w1")),
            helper.make_node("Identity", ["b1"], ["b1_copy"], name="dedup"),
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1_copy"], ["hb"], name="bias1"),
            relu("hb", "r"),
            helper.make_node("MatMul", ["r", "w2"], ["h2"], name="mm2"),
            helper.make_node("Add", ["h2", "b1"], ["y"], name="bias2"),  # b1 read here too
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 8])],
        [const("b1", zero_rows(bias(8), dead)), const("w2", trained_matrix(8, 8).T)],
    )
    pruned = prune(model, [("mm1", [0, 1, 3, 4, 6, 7], {})])
    assert [n.op_type for n in pruned.graph.node] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    (mm1, bias1) = pruned.graph.node[:2]
    assert shapes(pruned, mm1.input[1], bias1.input[1], "w2", "b1") == [
        (16, 6), (6,), (6, 8), (8,)
    ]
    assert rel_error(model, pruned, X_ROWS) < TOL


# -- (b) removed channels that are combinations of kept ones: compensation is exact ---------


def test_gemm_consumer_compensated_from_covariance() -> None:
    w1, b1 = redundant(trained_matrix(8, 16), bias(8))
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
            relu("h", "r"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2", transB=1,
                             alpha=0.5, beta=2.0),
        ],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 4])],
        [const("w1", w1), const("b1", b1), const("w2", trained_matrix(4, 8)),
         const("b2", bias(4))],
    )
    mix, shift = compensation(activation(model, "r", X_ROWS, -1), KEPT)
    assert np.abs(mix[6]).max() < 1e-9 and shift[6] == pytest.approx(0.7)  # constant
    plain = prune(model, [("g1", KEPT, {})])
    pruned = prune(model, [("g1", KEPT, {"mix:g2": mix, "shift:g2": shift})])
    assert shapes(pruned, "w1", "b1", "w2", "b2") == [(5, 16), (5,), (4, 5), (4,)]
    assert rel_error(model, plain, X_ROWS) > 0.01  # the removed channels mattered
    assert rel_error(model, pruned, X_ROWS) < TOL


def test_conv_consumer_without_bias_gets_one() -> None:
    wa, ba = redundant(trained_conv(8, 3, 3), bias(8))
    model = make_model(
        [
            conv("a", "x", "wa", "h", "ba", pads=[1, 1, 1, 1]),
            relu("h", "r"),
            # no padding: the shift adds W s at every tap, exact only where no tap is cut
            conv("c", "r", "wc", "y"),
        ],
        [tensor("x", ["batch", 3, 8, 8])],
        [tensor("y", ["batch", 4, 6, 6])],
        [const("wa", wa), const("ba", ba), const("wc", trained_conv(4, 8, 3))],
    )
    mix, shift = compensation(activation(model, "r", X_CONV, 1), KEPT)
    assert rel_error(model, prune(model, [("a", KEPT, {})]), X_CONV) > 0.01
    pruned = prune(model, [("a", KEPT, {"mix:c": mix, "shift:c": shift})])
    (c,) = [n for n in pruned.graph.node if n.name == "c"]
    assert len(c.input) == 3  # a bias B was added
    assert shapes(pruned, "wa", "ba", "wc", c.input[2]) == [
        (5, 3, 3, 3), (5,), (4, 5, 3, 3), (4,)
    ]
    assert rel_error(model, pruned, X_CONV) < TOL


def test_concat_consumer_compensated_at_its_offset() -> None:
    wb, bb = redundant(trained_conv(8, 3, 3)[::-1], bias(8))
    model = concat_model(wb=wb, bb=bb)
    cat = activation(model, "cat", X_CONV, 1)[:, 4:]  # b's channels sit at 4..11
    mix, shift = compensation(cat, KEPT)
    assert rel_error(model, prune(model, [("b", KEPT, {})]), X_CONV) > 0.01
    pruned = prune(model, [("b", KEPT, {"mix:c": mix, "shift:c": shift})])
    assert shapes(pruned, "wa", "wb", "bb", "wc", "bc") == [
        (4, 3, 3, 3), (5, 3, 3, 3), (5,), (5, 9, 1, 1), (5,)
    ]
    assert rel_error(model, pruned, X_CONV) < TOL


def matmul_chain(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x -> MatMul + bias Add -> Relu -> MatMul (no bias) -> Relu -> MatMul, on tokens."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
            relu("hb", "r"),
            helper.make_node("MatMul", ["r", "w2"], ["h2"], name="mm2"),
            relu("h2", "r2"),
            helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
        ],
        [tensor("x", ["batch", 5, 16])],
        [tensor("y", ["batch", 5, 4])],
        [const("w1", w1), const("b1", b1), const("w2", w2),
         const("w3", trained_matrix(4, 6).T)],
    )


def test_matmul_consumer_gets_a_bias_add_that_a_later_step_slices() -> None:
    w1, b1 = redundant(trained_matrix(8, 16).T, bias(8), axis=1)
    dead = [0, 3]
    w2 = zero_rows(trained_matrix(6, 8).T, dead, axis=1)
    model = matmul_chain(w1, b1, w2)
    mix, shift = compensation(activation(model, "r", X_TOKENS, -1), KEPT)
    pruned = prune(model, [
        ("mm1", KEPT, {"mix:mm2": mix, "shift:mm2": shift}),
        ("mm2", [1, 2, 4, 5], {}),  # mm2's output channels, and the bias it was given
    ])
    adds = [n for n in pruned.graph.node if n.op_type == "Add"]
    assert [n.name for n in adds] == ["bias1", "mm2/prune_bias"]
    assert shapes(pruned, "w1", "b1", "w2", adds[1].input[1], "w3") == [
        (16, 5), (5,), (5, 4), (4,), (4, 4)
    ]
    assert rel_error(model, pruned, X_TOKENS) < TOL


# -- (c) pruning real channels changes the output, and the model stays valid ----------------


def test_plain_pruning_of_real_channels_changes_the_output() -> None:
    model = residual_model()
    pruned = prune(model, [("a", KEPT, {}), ("b1", [0, 2, 4, 6], {})])
    assert shapes(pruned, "wa", "wb1", "wb2", "wc") == [
        (5, 3, 3, 3), (4, 5, 3, 3), (5, 4, 3, 3), (4, 5, 1, 1)
    ]
    error = rel_error(model, pruned, X_CONV)
    assert 0.01 < error < 10 and np.isfinite(error)


@pytest.mark.parametrize(
    "name", ["resnet_digits", "resnet_digits_bn", "mlp_digits", "transformer_digits"]
)
def test_every_prunable_group_of_a_fixture(name: str) -> None:
    model = onnx.load(str(fixture_path(name)))
    groups = [g for g in channel_groups(name_nodes(model)) if g.reason is None]
    steps = [(g.name, [*range(0, g.channels, 4), g.channels - 1], {}) for g in groups]
    pruned = prune(model, steps)
    params = sum(w.size for w in weights(pruned).values())
    assert params < sum(w.size for w in weights(model).values())
    x = models.load_calib(name)["input"][:32]
    before, after = run_model(model, {"input": x})[0], run_model(pruned, {"input": x})[0]
    assert after.shape == before.shape and np.isfinite(after).all()
    assert not np.allclose(after, before)


# -- check says why not ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def residual() -> tuple[PruneChannels, gs.Graph, dict[str, ChannelGroup]]:
    named = name_nodes(residual_model())
    groups = {g.name: g for g in channel_groups(named)}
    return PruneChannels(list(groups.values())), gs.import_onnx(named), groups


def test_check_declines_with_a_reason(
    residual: tuple[PruneChannels, gs.Graph, dict[str, ChannelGroup]],
) -> None:
    rewrite, graph, groups = residual
    a = groups["a"]
    cases = {
        "nope": replace(step_for(a, KEPT), group="nope"),
        "out of range": step_for(a, [0, 8]),
        "empty": step_for(a, []),
        "unsorted": step_for(a, [3, 1]),
        "pinned": step_for(groups["c"], [0]),
    }
    reasons = {key: rewrite.check(graph, step, {}) for key, step in cases.items()}
    assert reasons == {
        "nope": "no channel group 'nope' in this model",
        "out of range": "kept channels must lie in 0..7, not 0..8",
        "empty": "the step keeps no channel; a group cannot be removed entirely",
        "unsorted": "kept channels must be sorted and distinct",
        "pinned": "channel group 'c' is pinned: tensor 'y' is a graph output",
    }


def test_apply_refuses_compensation_of_the_wrong_shape(
    residual: tuple[PruneChannels, gs.Graph, dict[str, ChannelGroup]],
) -> None:
    rewrite, graph, groups = residual
    step = step_for(groups["a"], KEPT)
    with pytest.raises(ValueError, match=r"mix:b1 must be a finite 8x5 matrix"):
        rewrite.apply(graph, step, {}, {"mix:b1": np.eye(8)})


@pytest.mark.parametrize("target", [[-1, 8], [0, 8], [0, -1]])
def test_a_head_reshape_with_the_width_written_out_follows_the_pruning(target: list[int]
                                                                       ) -> None:
    """torch's dynamo exporter writes ``x.flatten(1)`` after a global pooling as
    ``Reshape(x, [-1, C])``: the target must shrink with the channels, or the batch
    would be folded into them."""
    wa, ba = zero_rows(trained_conv(8, 3, 3), REMOVED), zero_rows(bias(8), REMOVED)
    head = trained_matrix(4, 8)
    model = make_model(
        [
            conv("a", "x", "wa", "h", "ba", pads=[1, 1, 1, 1]),
            relu("h", "r"),
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
            helper.make_node("Reshape", ["p", "target"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "wh", "bh"], ["y"], name="head", transB=1),
        ],
        [tensor("x", ["batch", 3, 8, 8])],
        [tensor("y", ["batch", 4])],
        [const("wa", wa), const("ba", ba), const("wh", head), const("bh", bias(4)),
         numpy_helper.from_array(np.array(target, dtype=np.int64), "target")],
    )
    pruned = prune(model, [("a", KEPT, {})])
    assert shapes(pruned, "wa", "wh") == [(5, 3, 3, 3), (4, 5)]
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    new_target = weights(pruned)[reshape.input[1]].tolist()
    assert new_target == ([target[0], 5] if target[1] > 0 else target)
    assert rel_error(model, pruned, X_CONV) < TOL

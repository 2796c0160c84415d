"""LowRankMatMul: MatMul/Gemm -> MatMul(first^T) -> MatMul(second^T) [-> Add].

Each test asserts how many places matched, the structure of the rewritten graph, and
numerical agreement in onnxruntime within the certificate: for every input vector x,
||y' - y|| <= sigma_{q+1} ||x|| (plus float32 rounding), where sigma_{q+1} =
||W - W_q||_op for the truncated SVD computed here with numpy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import TensorProto, helper, numpy_helper
from rewrite_helpers import (
    assert_envelope_kept,
    factors_for,
    initializer_shapes,
    lowrank_step,
    op_types,
)

import models
from qmpass.extract import Operator, extract_operators
from qmpass.plan.plan import Cost, Step
from qmpass.rewrite.base import export_like, name_nodes
from qmpass.rewrite.lowrank_matmul import LowRankMatMul
from qmpass.verify import run_model

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2
RNG = np.random.default_rng(7)


# -- helpers ------------------------------------------------------------------------------------


def rewrite(
    model: onnx.ModelProto, steps: list[Step], ops: Mapping[str, Operator],
    tensors: list[dict[str, np.ndarray]], *, checked: bool = True,
) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    rule = LowRankMatMul()
    for step, arrays in zip(steps, tensors, strict=True):
        if checked:
            assert rule.check(graph, step, ops) is None
        assert rule.check_tensors(step, ops, arrays) is None
        rule.apply(graph, step, ops, arrays)
    return export_like(graph, model)


def slack(w: np.ndarray, q: int, x_norm: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Float32 rounding of both models, to first order (Higham, gamma_n = n u): the dot
    products of length d_in (original), d_in and q (factors) each err by at most n u
    relative to ||W||_F ||x||, plus the rounding of the stored weights and of the bias."""
    d_in = w.shape[1]
    b_norm = 0.0 if b is None else float(np.linalg.norm(b))
    return (2 * d_in + q + 4) * UNIT_ROUNDOFF * (np.linalg.norm(w) * x_norm + b_norm)


def assert_certified(
    x: np.ndarray, y: np.ndarray, y_new: np.ndarray, op: Operator, q: int, sigma_next: float
) -> float:
    """Per input vector (last axis): ||y' - y|| <= sigma_{q+1} ||x|| + slack. Returns the
    largest error relative to sigma_{q+1} ||x|| (how tight the certificate is)."""
    x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
    err = np.linalg.norm((y_new - y).astype(np.float64).reshape(-1, y.shape[-1]), axis=1)
    x_norm = np.linalg.norm(x64, axis=1)
    bound = sigma_next * x_norm + slack(op.weight, q, x_norm, op.bias)
    assert np.all(err <= bound), float(np.max(err - bound))
    return float(np.max(err / np.maximum(sigma_next * x_norm, 1e-30)))


def matmul_model(d_out: int, d_in: int, *, bias: bool = True) -> onnx.ModelProto:
    w = trained_matrix(d_out, d_in)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if bias else "y"], name="proj")]
    inits = [const("w", w.T)]
    if bias:
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="proj_bias"))
        inits.append(const("b", trained_matrix(d_out + 3, d_out + 3)[3, :d_out]))
    return make_model(
        nodes,
        [tensor("x", ["batch", "tokens", d_in])],
        [tensor("y", ["batch", "tokens", d_out])],
        inits,
    )


# -- MatMul ------------------------------------------------------------------------------------


def test_matmul_with_bias_on_3d_activations_with_dynamic_batch() -> None:
    model = name_nodes(matmul_model(24, 32))
    (op,) = extract_operators(model).operators
    q = 6
    tensors, sigma_next = factors_for(op, q)
    new = rewrite(model, [lowrank_step(op, q, sigma_next)], {op.name: op}, [tensors])

    # structure: MatMul + Add -> MatMul, MatMul, Add; old nodes and weight gone
    assert op_types(model) == Counter({"MatMul": 1, "Add": 1})
    assert op_types(new) == Counter({"MatMul": 2, "Add": 1})
    assert not {"proj", "proj_bias"} & {n.name for n in new.graph.node}
    assert initializer_shapes(new) == [(6, 24), (24,), (32, 6)]
    assert {i.name for i in new.graph.initializer}.isdisjoint({"w", "b"})
    first, second = (n for n in new.graph.node if n.op_type == "MatMul")
    assert (first.input[0], second.input[0]) == ("x", first.output[0])
    assert new.graph.node[-1].output[0] == "y"
    assert_envelope_kept(model, new)

    tightness = []
    for shape in [(2, 5, 32), (1, 3, 32), (7, 1, 32)]:  # dynamic batch and tokens
        x = RNG.standard_normal(shape).astype(np.float32)
        (y,) = run_model(model, {"x": x})
        (y_new,) = run_model(new, {"x": x})
        assert y_new.shape == y.shape
        tightness.append(assert_certified(x, y, y_new, op, q, sigma_next))
        # and it computes exactly the factored map (independent numpy reference)
        reference = x.astype(np.float64) @ (tensors["second"] @ tensors["first"]).T + op.bias
        np.testing.assert_allclose(y_new, reference, rtol=0, atol=float(
            np.max(slack(op.weight, q, np.linalg.norm(x, axis=-1), op.bias))))
    assert 0.05 < max(tightness) <= 1.0  # the truncation is visible and certified


def test_full_rank_factors_reproduce_the_matmul_to_float32_precision() -> None:
    model = name_nodes(matmul_model(24, 32))
    (op,) = extract_operators(model).operators
    q = 24  # full rank: saves nothing, so check declines; the algebra must still be exact
    step = lowrank_step(op, q)
    reason = LowRankMatMul().check(gs.import_onnx(model), step, {op.name: op})
    assert reason == "rank 24 of a 24x32 matrix saves nothing: 24*(32+24) >= 24*32"
    tensors, sigma_next = factors_for(op, q)
    assert sigma_next == 0.0
    new = rewrite(model, [step], {op.name: op}, [tensors], checked=False)
    x = RNG.standard_normal((3, 4, 32)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (y_new,) = run_model(new, {"x": x})
    assert_certified(x, y, y_new, op, q, 0.0)


def test_matmul_without_bias_and_weight_in_a_constant_node() -> None:
    w = trained_matrix(40, 48)
    model = name_nodes(make_model(
        [
            helper.make_node("Constant", [], ["w"], name="w_const",
                             value=numpy_helper.from_array(w.T.copy(), "w")),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        ],
        [tensor("x", ["batch", 48])],
        [tensor("y", ["batch", 40])],
    ))
    (op,) = extract_operators(model).operators
    assert (op.weight_source, op.bias) == ("constant_node", None)
    q = 10
    tensors, sigma_next = factors_for(op, q)
    new = rewrite(model, [lowrank_step(op, q, sigma_next)], {op.name: op}, [tensors])
    assert op_types(new) == Counter({"MatMul": 2})  # no Add, the Constant node is gone
    assert initializer_shapes(new) == [(10, 40), (48, 10)]
    assert_envelope_kept(model, new)
    x = RNG.standard_normal((9, 48)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (y_new,) = run_model(new, {"x": x})
    assert assert_certified(x, y, y_new, op, q, sigma_next) > 0.05


def test_float16_weights_stay_float16() -> None:
    w = trained_matrix(32, 32).astype(np.float16)
    model = name_nodes(make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 32])],
        [numpy_helper.from_array(w.T.copy(), "w")],
    ))
    (op,) = extract_operators(model).operators
    tensors, _ = factors_for(op, 8)
    new = rewrite(model, [lowrank_step(op, 8)], {op.name: op}, [tensors])
    assert {init.data_type for init in new.graph.initializer} == {TensorProto.FLOAT16}
    assert_envelope_kept(model, new)
    x = RNG.standard_normal((4, 32)).astype(np.float16)
    (y_new,) = run_model(new, {"x": x})
    assert y_new.dtype == np.float16 and y_new.shape == (4, 32)


# -- Gemm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta_and_either_transb(trans_b: int) -> None:
    w = trained_matrix(20, 36)  # d_out x d_in
    b = trained_matrix(23, 23)[2, :20]
    model = name_nodes(make_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0,
                          transB=trans_b)],
        [tensor("x", ["batch", 36])],
        [tensor("y", ["batch", 20])],
        [const("w", w if trans_b else w.T), const("c", b)],
    ))
    (op,) = extract_operators(model).operators
    np.testing.assert_allclose(op.weight, 0.5 * w)
    q = 5
    tensors, sigma_next = factors_for(op, q)
    new = rewrite(model, [lowrank_step(op, q, sigma_next)], {op.name: op}, [tensors])
    assert op_types(new) == Counter({"MatMul": 2, "Add": 1})
    assert initializer_shapes(new) == [(5, 20), (20,), (36, 5)]
    assert_envelope_kept(model, new)
    for batch in (1, 6):
        x = RNG.standard_normal((batch, 36)).astype(np.float32)
        (y,) = run_model(model, {"x": x})
        (y_new,) = run_model(new, {"x": x})
        assert assert_certified(x, y, y_new, op, q, sigma_next) > 0.05


def test_every_gemm_of_the_trained_mlp_within_the_propagated_certificate() -> None:
    """All three Gemms (transB=1) of mlp_digits are rewritten; each layer's output is
    within its certificate given the rewritten model's own input to that layer, and the
    logits within the bound propagated through the 1-Lipschitz ReLUs:
    e_k <= sigma_k ||x'_k|| + ||W_k||_op e_{k-1}."""
    original = onnx.load(str(fixture_path("mlp_digits")))
    model = name_nodes(original)
    ops = extract_operators(model).operators
    assert [op.op_type for op in ops] == ["Gemm"] * 3
    ranks = {"/0/Gemm": 16, "/2/Gemm": 16, "/4/Gemm": 4}
    graph = gs.import_onnx(model)
    steps, arrays, sigmas = [], [], {}
    for op in ops:
        tensors, sigmas[op.name] = factors_for(op, ranks[op.name])
        step = lowrank_step(op, ranks[op.name], sigmas[op.name])
        assert LowRankMatMul().check(graph, step, {o.name: o for o in ops}) is None
        steps.append(step)
        arrays.append(tensors)
    new = rewrite(model, steps, {o.name: o for o in ops}, arrays)
    assert op_types(model)["Gemm"] == 3
    assert op_types(new) == op_types(model) - Counter({"Gemm": 3}) + Counter(
        {"MatMul": 6, "Add": 3}
    )
    assert_envelope_kept(model, new)
    new_params = sum(int(np.prod(i.dims)) for i in new.graph.initializer)
    old_params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    assert new_params == old_params - sum(
        op.shape[0] * op.shape[1] - ranks[op.name] * sum(op.shape) for op in ops
    )

    x = models.load_calib("mlp_digits")["input"]
    (logits,) = run_model(model, {"input": x})
    seen = _intermediates(new, [op.output for op in ops], {"input": x})
    error = np.zeros(len(x))
    for op in ops:
        x_k = seen[op.input] if op.input != "input" else x
        y_k = seen[op.output]
        exact = x_k.astype(np.float64) @ op.weight.T + op.bias
        assert_certified(x_k, exact, y_k, op, ranks[op.name], sigmas[op.name])
        x_norm = np.linalg.norm(x_k, axis=1)
        w_op = float(np.linalg.norm(op.weight, 2))
        error = (
            sigmas[op.name] * x_norm + w_op * error
            + slack(op.weight, ranks[op.name], x_norm, op.bias)
        )
    assert np.all(np.linalg.norm(seen["logits"] - logits, axis=1) <= error)


def _intermediates(
    model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Values of ``names`` (and of every ReLU output) in ``model``, by exposing them as
    graph outputs of a copy."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    wanted = list(names) + [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    known = {o.name for o in exposed.graph.output}
    for name in wanted:
        if name not in known:
            exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                      None))
            known.add(name)
    outputs = [o.name for o in exposed.graph.output]
    return dict(zip(outputs, run_model(exposed, feeds), strict=True))


# -- declines ----------------------------------------------------------------------------------


def _check(model: onnx.ModelProto, q: int, name: str | None = None) -> str | None:
    model = name_nodes(model)
    ops = {op.name: op for op in extract_operators(model).operators}
    op = ops[name] if name else next(iter(ops.values()))
    return LowRankMatMul().check(gs.import_onnx(model), lowrank_step(op, q), ops)


def test_declines_a_rank_that_saves_nothing() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="sq")],
        [tensor("x", ["batch", 64])], [tensor("y", ["batch", 64])],
        [const("w", trained_matrix(64, 64))],
    )
    assert _check(model, 40) == "rank 40 of a 64x64 matrix saves nothing: 40*(64+64) >= 64*64"
    assert _check(model, 32) == "rank 32 of a 64x64 matrix saves nothing: 32*(64+64) >= 64*64"
    assert _check(model, 31) is None
    assert _check(model, 0) == "step has no usable rank (0)"


def test_declines_a_weight_on_the_left() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="left")],
        [tensor("x", [32, "batch"])], [tensor("y", [16, "batch"])],
        [const("w", trained_matrix(16, 32))],
    )
    assert _check(model, 4) == (
        "'left' has its weight on the left (W @ x); only x @ W operators are factorised"
    )


def test_declines_gemm_with_transa() -> None:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)],
        [tensor("x", [32, "batch"])], [tensor("y", ["batch", 16])],
        [const("w", trained_matrix(32, 16))],
    )
    assert _check(model, 4) == "Gemm with transA=1 is not rewritten"


def test_declines_gemm_whose_bias_is_not_a_constant_vector() -> None:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)],
        [tensor("x", ["batch", 32]), tensor("c", ["batch", 16])], [tensor("y", ["batch", 16])],
        [const("w", trained_matrix(16, 32))],
    )
    assert _check(model, 4) == (
        "bias C of Gemm 'fc' is not a constant per-output vector; the node is left untouched"
    )


def test_declines_an_operator_inside_a_subgraph() -> None:
    w = trained_matrix(16, 32)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_then"], ["y_then"], name="inner")],
        "then", [], [tensor("y_then", ["batch", 16])], initializer=[const("w_then", w.T)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_else"], ["y_else"], name="inner_else")],
        "else", [], [tensor("y_else", ["batch", 16])], initializer=[const("w_else", w.T)],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch,
                          else_branch=else_branch)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         tensor("x", ["batch", 32])],
        [tensor("y", ["batch", 16])],
    )
    assert _check(model, 4, "inner") == (
        "operator inside a subgraph (main/branch.then_branch) is left untouched"
    )


def test_declines_an_unknown_operator_a_conv_and_a_second_rewrite() -> None:
    model = name_nodes(matmul_model(24, 32))
    (op,) = extract_operators(model).operators
    graph = gs.import_onnx(model)
    rule = LowRankMatMul()
    assert rule.check(graph, lowrank_step(op, 4), {}) == (
        "operator 'proj' was not extracted from this model"
    )
    shared = Step("shared_basis", (op.name,), Cost(0, 0), Cost(0, 0), 0.0, rank=4)
    assert rule.check(graph, shared, {op.name: op}) == (
        "a 'shared_basis' step is not a low-rank factorisation"
    )
    tensors, _ = factors_for(op, 4)
    rule.apply(graph, lowrank_step(op, 4), {op.name: op}, tensors)
    assert rule.check(graph, lowrank_step(op, 4), {op.name: op}) == (
        "output 'y' is no longer produced by 'proj' (rewritten already?)"
    )

    conv = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [tensor("x", ["batch", 4, 8, 8])], [tensor("y", ["batch", 8, 8, 8])],
        [const("w", trained_matrix(8, 4).reshape(8, 4, 1, 1))],
    )
    assert _check(conv, 2) == "'conv' is a Conv; this rewrite handles MatMul and Gemm"


def test_tensors_that_do_not_fit_are_refused_before_the_graph_changes() -> None:
    model = name_nodes(matmul_model(24, 32))
    (op,) = extract_operators(model).operators
    ops = {op.name: op}
    step = lowrank_step(op, 6)
    rule = LowRankMatMul()
    tensors, _ = factors_for(op, 6)
    assert rule.check_tensors(step, ops, {"first": tensors["first"]}) == (
        "the step's tensors lack 'second', 'bias'"
    )
    assert rule.check_tensors(step, ops, {**tensors, "first": tensors["first"].T}) == (
        "tensor 'first' has shape (32, 6), expected (6, 32)"
    )
    assert rule.check_tensors(step, ops, {**tensors, "bias": tensors["bias"][:5]}) == (
        "tensor 'bias' has shape (5,), expected (24,)"
    )
    bad = {**tensors, "second": np.full((24, 6), np.nan)}
    assert rule.check_tensors(step, ops, bad) == (
        "tensor 'second' is not a finite floating-point array"
    )
    graph = gs.import_onnx(model)
    with pytest.raises(ValueError, match="tensor 'first' has shape"):
        rule.apply(graph, lowrank_step(op, 5), ops, tensors)
    assert [n.name for n in graph.nodes] == ["proj", "proj_bias"]
    assert rule.check(graph, step, ops) is None

"""SharedBasis: n MatMul/Gemm reading one tensor -> MatMul, MatMul, Add, Split.

Each test asserts how many places matched, the structure of the rewritten graph, and
numerical agreement in onnxruntime within the certificate: with W the members' matrix
views stacked (sum d_out_i x d_in) and the shared basis from its truncated SVD, every
input vector x satisfies ||y' - y|| <= sigma_{q+1}(W) ||x|| (plus float32 rounding) for
the stacked outputs, hence for each member.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import TensorProto, helper, numpy_helper
from rewrite_helpers import assert_envelope_kept, op_types

import models
from qmpass.extract import Operator, extract_operators
from qmpass.plan.plan import Cost, Step
from qmpass.rewrite.base import export_like, name_nodes
from qmpass.rewrite.shared_basis import SharedBasis
from qmpass.verify import run_model

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2
RNG = np.random.default_rng(5)


# -- helpers ------------------------------------------------------------------------------------


def stacked(members: Sequence[Operator]) -> tuple[np.ndarray, np.ndarray]:
    weight = np.vstack([op.weight for op in members])
    bias = np.concatenate(
        [op.bias if op.bias is not None else np.zeros(op.shape[0]) for op in members]
    )
    return weight, bias


def shared_factors(members: Sequence[Operator], q: int) -> tuple[dict[str, np.ndarray], float]:
    """Basis ``first = V_q^T`` of the stacked matrix, ``second = U_q S_q``, sigma_{q+1}."""
    weight, bias = stacked(members)
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    sigma_next = float(s[q]) if q < len(s) else 0.0
    tensors = {"first": vt[:q].copy(), "second": u[:, :q] * s[:q]}
    if any(op.bias is not None for op in members):
        tensors["bias"] = bias
    return tensors, sigma_next


def shared_step(members: Sequence[Operator], q: int, sigma_next: float = 0.0) -> Step:
    d_in = members[0].shape[1]
    d_out = sum(op.shape[0] for op in members)
    vectors = members[0].flops // (2 * members[0].shape[0] * d_in)
    return Step(
        kind="shared_basis",
        operators=tuple(op.name for op in members),
        before=Cost(sum(op.params for op in members), sum(op.flops for op in members)),
        after=Cost(q * (d_in + d_out) + d_out, 2 * vectors * q * (d_in + d_out)),
        predicted_error=sigma_next,
        rank=q,
        certificate={"sigma_next": sigma_next},
    )


def fuse(
    model: onnx.ModelProto, groups: Sequence[Sequence[Operator]], ranks: Sequence[int]
) -> tuple[onnx.ModelProto, list[float]]:
    graph = gs.import_onnx(model)
    ops = {op.name: op for group in groups for op in group}
    rule = SharedBasis()
    sigmas = []
    for members, q in zip(groups, ranks, strict=True):
        tensors, sigma_next = shared_factors(members, q)
        step = shared_step(members, q, sigma_next)
        assert rule.check(graph, step, ops) is None
        assert rule.check_tensors(step, ops, tensors) is None
        rule.apply(graph, step, ops, tensors)
        sigmas.append(sigma_next)
    return export_like(graph, model), sigmas


def slack(weight: np.ndarray, bias: np.ndarray, q: int, x_norm: np.ndarray) -> np.ndarray:
    """Float32 rounding of both models, to first order (Higham, gamma_n = n u): dot
    products of length d_in (originals), d_in and q (factors) relative to
    ||W||_F ||x||, plus the rounding of the stored weights and biases."""
    d_in = weight.shape[1]
    return (2 * d_in + q + 4) * UNIT_ROUNDOFF * (
        np.linalg.norm(weight) * x_norm + np.linalg.norm(bias)
    )


def assert_certified(
    x: np.ndarray,
    ys: Sequence[np.ndarray],
    ys_new: Sequence[np.ndarray],
    members: Sequence[Operator],
    q: int,
    sigma_next: float,
) -> float:
    """||y' - y|| <= sigma_{q+1} ||x|| + slack per input vector, all members stacked;
    returns the largest error relative to sigma_{q+1} ||x||."""
    weight, bias = stacked(members)
    rows = x.astype(np.float64).reshape(-1, x.shape[-1])
    y = np.hstack([a.astype(np.float64).reshape(len(rows), -1) for a in ys])
    y_new = np.hstack([a.astype(np.float64).reshape(len(rows), -1) for a in ys_new])
    err = np.linalg.norm(y_new - y, axis=1)
    x_norm = np.linalg.norm(rows, axis=1)
    bound = sigma_next * x_norm + slack(weight, bias, q, x_norm)
    assert np.all(err <= bound), float(np.max(err - bound))
    return float(np.max(err / np.maximum(sigma_next * x_norm, 1e-30)))


def three_heads(
    opset: int = 17, bias_on: tuple[bool, ...] = (True, False, True)
) -> onnx.ModelProto:
    """Three MatMuls (d_out 16, 24, 8) reading one (batch, tokens, 32) activation, two
    with a bias Add, weights cut from the trained transformer."""
    block = trained_matrix(48, 32)
    widths = (16, 24, 8)
    nodes, inits, outputs = [], [], []
    start = 0
    for k, (width, has_bias) in enumerate(zip(widths, bias_on, strict=True)):
        w = block[start:start + width]
        start += width
        product = f"h{k}" if has_bias else f"y{k}"
        nodes.append(helper.make_node("MatMul", ["x", f"w{k}"], [product], name=f"head{k}"))
        inits.append(const(f"w{k}", w.T))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, f"b{k}"], [f"y{k}"], name=f"bias{k}"))
            inits.append(const(f"b{k}", trained_matrix(width + k + 1, width + k + 1)[k, :width]))
        outputs.append(tensor(f"y{k}", ["batch", "tokens", width]))
    model = make_model(nodes, [tensor("x", ["batch", "tokens", 32])], outputs, inits)
    if opset != 17:
        model.opset_import[0].version = opset
        model.ir_version = 6
        onnx.checker.check_model(model)
    return name_nodes(model)


# -- the fused form ----------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [17, 11])
def test_three_heads_become_two_matmuls_an_add_and_a_split(opset: int) -> None:
    model = three_heads(opset)
    extraction = extract_operators(model)
    assert extraction.fusion_groups == (("head0", "head1", "head2"),)
    members = list(extraction.operators)
    q = 8  # saves: 8*(32+48) = 640 < 32*48 = 1536
    new, (sigma_next,) = fuse(model, [members], [q])

    assert op_types(model) == Counter({"MatMul": 3, "Add": 2})
    assert op_types(new) == Counter({"MatMul": 2, "Add": 1, "Split": 1})
    assert not {n.name for n in model.graph.node} & {n.name for n in new.graph.node}
    split = next(n for n in new.graph.node if n.op_type == "Split")
    assert list(split.output) == ["y0", "y1", "y2"]
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    if opset >= 13:  # sizes as an int64 input
        assert attrs == {"axis": -1} and inits[split.input[1]].tolist() == [16, 24, 8]
        assert inits[split.input[1]].dtype == np.int64
    else:  # sizes as an attribute
        assert attrs == {"axis": -1, "split": [16, 24, 8]} and len(split.input) == 1
    weights = sorted(a.shape for a in inits.values() if a.dtype == np.float32)
    assert weights == [(8, 48), (32, 8), (48,)]
    assert_envelope_kept(model, new)

    tightness = []
    for shape in [(2, 5, 32), (1, 1, 32)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        ys = run_model(model, {"x": x})
        ys_new = run_model(new, {"x": x})
        assert [y.shape for y in ys_new] == [y.shape for y in ys]
        tightness.append(assert_certified(x, ys, ys_new, members, q, sigma_next))
    assert 0.05 < max(tightness) <= 1.0


def test_gemm_members_with_transb() -> None:
    block = trained_matrix(40, 64)
    model = name_nodes(make_model(
        [
            helper.make_node("Gemm", ["x", "wa", "ca"], ["ya"], name="a", transB=1),
            helper.make_node("Gemm", ["x", "wb", "cb"], ["yb"], name="b", transB=0, alpha=0.5),
        ],
        [tensor("x", ["batch", 64])],
        [tensor("ya", ["batch", 24]), tensor("yb", ["batch", 16])],
        [const("wa", block[:24]), const("ca", block[0, 24:48]),
         const("wb", block[24:].T), const("cb", block[1, :16])],
    ))
    members = list(extract_operators(model).operators)
    q = 10
    new, (sigma_next,) = fuse(model, [members], [q])
    assert op_types(new) == Counter({"MatMul": 2, "Add": 1, "Split": 1})
    assert_envelope_kept(model, new)
    x = RNG.standard_normal((7, 64)).astype(np.float32)
    ys, ys_new = run_model(model, {"x": x}), run_model(new, {"x": x})
    assert assert_certified(x, ys, ys_new, members, q, sigma_next) > 0.05


def test_full_rank_basis_reproduces_the_members_to_float32_precision() -> None:
    model = three_heads()
    members = list(extract_operators(model).operators)
    graph = gs.import_onnx(model)
    ops = {op.name: op for op in members}
    step = shared_step(members, 32)
    assert SharedBasis().check(graph, step, ops) == (
        "rank 32 shared by 3 operators saves nothing: 32*(32+48) >= 32*48"
    )
    tensors, sigma_next = shared_factors(members, 32)
    assert sigma_next == 0.0
    SharedBasis().apply(graph, step, ops, tensors)
    new = export_like(graph, model)
    x = RNG.standard_normal((3, 4, 32)).astype(np.float32)
    assert_certified(x, run_model(model, {"x": x}), run_model(new, {"x": x}), members, 32, 0.0)


def test_qkv_of_the_trained_transformer() -> None:
    """Both attention blocks' Q/K/V projections (64 -> 3 x 64, MatMul + Add each) share a
    rank-32 basis: 6 MatMuls become 4 and two Splits appear; FLOPs fall as predicted,
    and each fused output is certified for the input it sees in the rewritten model."""
    model = name_nodes(onnx.load(str(fixture_path("transformer_digits"))))
    extraction = extract_operators(model)
    ops = {op.name: op for op in extraction.operators}
    groups = [[ops[name] for name in group] for group in extraction.fusion_groups]
    assert [[op.name.split("/")[-2] for op in g] for g in groups] == [
        ["q_proj", "k_proj", "v_proj"]
    ] * 2
    q = 32  # saves: 32*(64+192) = 8192 < 64*192 = 12288
    new, sigmas = fuse(model, groups, [q, q])

    before, after = op_types(model), op_types(new)
    assert after["MatMul"] == before["MatMul"] - 6 + 4
    assert after["Add"] == before["Add"] - 6 + 2
    assert after["Split"] == before["Split"] + 2
    assert_envelope_kept(model, new)
    flops_before = sum(op.flops for op in extraction.operators)
    flops_after = sum(op.flops for op in extract_operators(new).operators)
    tokens = 8
    saved = 2 * (3 * 2 * tokens * 64 * 64 - 2 * tokens * q * (64 + 192))
    assert flops_after == flops_before - saved < flops_before

    feeds = {"input": models.load_calib("transformer_digits")["input"][:32]}
    names = [t for g in groups for t in (g[0].input, *(op.output for op in g))]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(new)
    for name in names:
        exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    values = run_model(exposed, feeds)[len(new.graph.output):]
    seen = dict(zip(names, values, strict=True))
    for members, sigma_next in zip(groups, sigmas, strict=True):
        x = seen[members[0].input]
        exact = [x.astype(np.float64) @ op.weight.T + op.bias for op in members]
        fused = [seen[op.output] for op in members]
        assert assert_certified(x, exact, fused, members, q, sigma_next) > 0.05


# -- declines ----------------------------------------------------------------------------------


def _check(model: onnx.ModelProto, q: int, ops: dict[str, Operator] | None = None) -> str | None:
    ops = ops or {op.name: op for op in extract_operators(model).operators}
    return SharedBasis().check(gs.import_onnx(model), shared_step(list(ops.values()), q), ops)


def test_declines_a_rank_that_saves_nothing() -> None:
    model = three_heads()
    assert _check(model, 20) == "rank 20 shared by 3 operators saves nothing: 20*(32+48) >= 32*48"
    assert _check(model, 19) is None


def test_declines_members_that_read_different_tensors_or_widths() -> None:
    model = name_nodes(make_model(
        [
            helper.make_node("MatMul", ["x", "w0"], ["y0"], name="m0"),
            helper.make_node("MatMul", ["z", "w1"], ["y1"], name="m1"),
        ],
        [tensor("x", ["batch", 32]), tensor("z", ["batch", 32])],
        [tensor("y0", ["batch", 16]), tensor("y1", ["batch", 16])],
        [const("w0", trained_matrix(32, 16)), const("w1", trained_matrix(32, 16))],
    ))
    assert _check(model, 4) == "members read different tensors ('x', 'z')"
    ops = {op.name: op for op in extract_operators(three_heads()).operators}
    narrow = ops["head1"]
    ops["head1"] = dataclasses.replace(narrow, weight=np.ascontiguousarray(narrow.weight[:, :30]))
    assert _check(three_heads(), 4, ops) == "members differ in input width (30, 32)"


def test_declines_a_member_the_lowrank_rules_decline() -> None:
    model = name_nodes(make_model(
        [
            helper.make_node("MatMul", ["x", "w0"], ["y0"], name="right"),
            helper.make_node("Gemm", ["x", "w1"], ["y1"], name="trans_a", transA=1),
        ],
        [tensor("x", [32, 32])],
        [tensor("y0", [32, 16]), tensor("y1", [32, 16])],
        [const("w0", trained_matrix(32, 16)), const("w1", trained_matrix(32, 16))],
    ))
    assert _check(model, 4) == "member 'trans_a' is declined: Gemm with transA=1 is not rewritten"


def test_declines_a_single_member_and_a_conv() -> None:
    model = three_heads()
    ops = {op.name: op for op in extract_operators(model).operators}
    graph = gs.import_onnx(model)
    one = shared_step([ops["head0"]], 4)
    assert SharedBasis().check(graph, one, ops) == (
        "a shared basis needs two or more operators, not 1"
    )
    twice = dataclasses.replace(one, operators=("head0", "head0"))
    assert SharedBasis().check(graph, twice, ops) == "the step names an operator more than once"
    conv = name_nodes(make_model(
        [
            helper.make_node("Conv", ["x", "w0"], ["y0"], name="c0"),
            helper.make_node("Conv", ["x", "w1"], ["y1"], name="c1"),
        ],
        [tensor("x", ["batch", 4, 5, 5])],
        [tensor("y0", ["batch", 8, 5, 5]), tensor("y1", ["batch", 8, 5, 5])],
        [const("w0", trained_matrix(8, 4).reshape(8, 4, 1, 1)),
         const("w1", trained_matrix(8, 4).reshape(8, 4, 1, 1))],
    ))
    assert _check(conv, 1) == (
        "member 'c0' is declined: 'c0' is a Conv; this rewrite handles MatMul and Gemm"
    )


def test_missing_bias_is_refused_before_the_graph_changes() -> None:
    model = three_heads()
    members = list(extract_operators(model).operators)
    ops = {op.name: op for op in members}
    tensors, _ = shared_factors(members, 8)
    del tensors["bias"]
    graph = gs.import_onnx(model)
    step = shared_step(members, 8)
    assert SharedBasis().check_tensors(step, ops, tensors) == "the step's tensors lack 'bias'"
    with pytest.raises(ValueError, match="lack 'bias'"):
        SharedBasis().apply(graph, step, ops, tensors)
    assert SharedBasis().check(graph, step, ops) is None  # nothing was changed

"""qmpass.algebra: each record against an independent numpy reference, the folds, the
rules, and the ONNX and Relax printers computing the same function from one record.

References are computed here, independently of the records: the truncated SVD of the
weight (the planned approximation), convolutions by explicit receptive fields, a batch
norm applied after the convolution, a consumer fed exactly ``x = M x_kept + s``. The
records are exact algebra, so they agree to float64 rounding (``RTOL``); the printers
run in float32 in two engines, so they agree to float32 rounding (``ATOL_REL`` of the
output norm, as in ``test_tvm_pass``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import scipy.linalg
from conftest import trained_conv, trained_matrix

from qmpass.algebra import (
    FactoredConv,
    FactoredLinear,
    PrunedGroup,
    SharedBasisSplit,
    conv_kernel,
    fold_batchnorm,
    lowrank_declines,
    shared_basis_declines,
)
from qmpass.extract import ConvGeometry, Operator
from qmpass.extract.channels import ChannelConsumer, ChannelGroup, SlicedConstant
from qmpass.plan.plan import Cost, Step, StepKind
from qmpass.rewrite.lowrank_conv import conv_pair
from qmpass.rewrite.lowrank_matmul import matmul_pair
from qmpass.rewrite.shared_basis import split_pair
from qmpass.verify import run_model

#: float64 agreement of two exact computations of the same algebra
RTOL = 1e-10
#: float32 agreement of two engines printing the same record (measured: ~3e-7)
ATOL_REL = 1e-5


# -- helpers ---------------------------------------------------------------------------------
def _operator(weight: np.ndarray, bias: np.ndarray | None = None, op_type: str = "MatMul",
              name: str = "op", graph: str = "main", **fields: Any) -> Operator:
    return Operator(name=name, op_type=op_type, graph=graph, input="x", output="y",
                    weight_name="w", weight_source="initializer",
                    weight=np.asarray(weight, dtype=np.float64), bias=bias,
                    bias_source=None if bias is None else "Add", flops=0, params=0, **fields)


def _step(kind: StepKind, names: Sequence[str], rank: int | None = None, **fields: Any
          ) -> Step:
    return Step(kind, tuple(names), Cost(0, 0), Cost(0, 0), 0.0, rank=rank, **fields)


def _truncated(w: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Factors ``first = S_q V_q^T``, ``second = U_q`` and the approximation itself."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    approx = (u[:, :q] * s[:q]) @ vt[:q]
    return s[:q, None] * vt[:q], u[:, :q], approx


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, geometry: ConvGeometry
            ) -> np.ndarray:
    """A direct NCHW convolution: every output pixel is ``W p + b`` for its receptive
    field ``p`` (zero padding, strides, dilations; one group)."""
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilations
    top, left, bottom, right = geometry.pads
    kh, kw = w.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    rows = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    cols = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], w.shape[0], rows, cols))
    for i in range(rows):
        for j in range(cols):
            field = padded[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                           j * sw: j * sw + dw * (kw - 1) + 1: dw]
            out[:, :, i, j] = np.einsum("ncij,ocij->no", field, w)
    return out if b is None else out + b[None, :, None, None]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_RNG = np.random.default_rng(7)


# -- FactoredLinear --------------------------------------------------------------------------
def test_factored_linear_is_the_planned_approximation() -> None:
    w, b = trained_matrix(24, 40).astype(np.float64), np.linspace(-1, 1, 24)
    first, second, approx = _truncated(w, 6)
    op = _operator(w, b)
    record = FactoredLinear.of(_step("lowrank", ["op"], 6), op, {"first": first,
                                                                  "second": second, "bias": b})
    assert record.rank == 6 and record.first.shape == (6, 40) and record.second.shape == (24, 6)
    np.testing.assert_allclose(record.matrix, approx, rtol=RTOL, atol=RTOL)
    x = _RNG.standard_normal((3, 5, 40))  # batch and token axes broadcast
    np.testing.assert_allclose(record(x), x @ approx.T + b, rtol=RTOL, atol=RTOL)
    # the tensors' precondition: a missing bias is refused with the rule's sentence
    with pytest.raises(ValueError, match="lack 'bias'"):
        FactoredLinear.of(_step("lowrank", ["op"], 6), op, {"first": first, "second": second})


# -- FactoredConv ----------------------------------------------------------------------------
def test_factored_conv_is_the_planned_approximation_as_two_convolutions() -> None:
    w = trained_conv(12, 6, 3).astype(np.float64)
    b = np.linspace(0, 1, 12)
    geometry = ConvGeometry((3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1)
    first, second, approx = _truncated(w.reshape(12, -1), 5)
    op = _operator(w.reshape(12, -1), b, "Conv", geometry=geometry)
    record = FactoredConv.of(_step("lowrank", ["op"], 5), op,
                             {"first": first, "second": second, "bias": b})
    assert record.first.shape == (5, 6, 3, 3) and record.second.shape == (12, 5, 1, 1)
    x = _RNG.standard_normal((2, 6, 9, 8))
    pointwise = ConvGeometry((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    thin = _conv2d(x, record.first, None, geometry)
    got = _conv2d(thin, record.second, record.bias, pointwise)
    expected = _conv2d(x, approx.reshape(w.shape), b, geometry)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(record.linear.matrix, approx, rtol=RTOL, atol=RTOL)


# -- SharedBasisSplit ------------------------------------------------------------------------
def test_shared_basis_members_are_their_rows_of_the_stacked_approximation() -> None:
    ws = [trained_matrix(64, 32)[i * 16:(i + 1) * 16].astype(np.float64) for i in range(3)]
    ws[2] = ws[2][:8]
    bs = [np.full(16, 0.5), None, np.linspace(0, 1, 8)]
    members = [_operator(w, b, name=f"m{i}") for i, (w, b) in enumerate(zip(ws, bs,
                                                                            strict=True))]
    stacked = np.vstack(ws)
    bias = np.concatenate([b if b is not None else np.zeros(len(w)) for w, b in zip(ws, bs,
                                                                                    strict=True)])
    first, second, approx = _truncated(stacked, 7)
    record = SharedBasisSplit.of(_step("shared_basis", ["m0", "m1", "m2"], 7), members,
                                 {"first": first, "second": second, "bias": bias})
    assert record.sizes == (16, 16, 8) and record.split_points == (16, 32)
    x = _RNG.standard_normal((4, 32))
    np.testing.assert_allclose(record.fused(x), x @ approx.T + bias, rtol=RTOL, atol=RTOL)
    for i, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 40)]):
        np.testing.assert_allclose(record.member(i)(x), x @ approx[lo:hi].T + bias[lo:hi],
                                   rtol=RTOL, atol=RTOL)


# -- PrunedGroup -----------------------------------------------------------------------------
def _group(channels: int, consumers: Sequence[str]) -> ChannelGroup:
    return ChannelGroup(
        name="g", channels=channels, channel_axis=1,
        producers=(SlicedConstant("p", 1, "wp", 0),), sliced=(),
        consumers=tuple(ChannelConsumer(c, "Conv", "h", 0, channels, f"w_{c}", 1)
                        for c in consumers),
        tensors=())


def test_pruned_group_compensates_a_consumer_fed_by_the_least_squares_map() -> None:
    """Inputs ``x = M x_kept + s`` exactly: the consumer's new weight on ``x_kept`` plus
    the bias change gives what the old weight gave on ``x``, in every layout."""
    channels, kept = 10, (1, 2, 5, 7, 8)
    mix = _RNG.standard_normal((channels, len(kept)))
    mix[list(kept)] = np.eye(len(kept))  # the kept channels map to themselves
    shift = _RNG.standard_normal(channels)
    shift[list(kept)] = 0.0
    tensors = {"mix:c": mix, "shift:c": shift}
    record = PrunedGroup.of(_step("prune_channels", ["p", "c"], group="g", channels=channels,
                                  kept=kept), _group(channels, ["c"]), tensors)
    x_kept = _RNG.standard_normal((4, len(kept)))
    x = x_kept @ mix.T + shift
    # matrix view (outputs x inputs) with the group between 3 other channels and 2 more
    w = _RNG.standard_normal((6, 3 + channels + 2))
    outside = _RNG.standard_normal((4, 3)), _RNG.standard_normal((4, 2))
    full = np.hstack([outside[0], x, outside[1]])
    new, delta = record.consumer("c", w, axis=1, offset=3)
    assert new.shape == (6, 3 + len(kept) + 2) and delta is not None
    np.testing.assert_allclose(np.hstack([outside[0], x_kept, outside[1]]) @ new.T + delta,
                               full @ w.T, rtol=RTOL, atol=RTOL)
    # the same weight stored inputs-first (an ONNX MatMul's B) gives the same edit
    new_t, delta_t = record.consumer("c", w.T.copy(), axis=0, offset=3)
    assert delta_t is not None
    np.testing.assert_allclose(new_t, new.T, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(delta_t, delta, rtol=RTOL, atol=RTOL)
    # a conv: W' = W M per tap, the bias change W s summed over the taps
    k = _RNG.standard_normal((4, channels, 3, 3))
    new_k, delta_k = record.consumer("c", k, axis=1)
    assert delta_k is not None
    np.testing.assert_allclose(new_k, np.einsum("ocij,ck->okij", k, mix), rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(delta_k, np.einsum("ocij,c->o", k, shift), rtol=RTOL, atol=RTOL)


def test_pruned_group_keeps_producer_rows_and_plain_slices_without_compensation() -> None:
    channels, kept = 6, (0, 3, 4)
    record = PrunedGroup.of(_step("prune_channels", ["p", "c"], group="g", channels=channels,
                                  kept=kept), _group(channels, ["c"]), {})
    w = _RNG.standard_normal((channels, 5))
    np.testing.assert_array_equal(record.keep(w, 0), w[list(kept)])
    # a block at offset 2 of an 11-wide axis: the channels outside it stay
    wide = _RNG.standard_normal((3, 11))
    np.testing.assert_array_equal(record.keep(wide, 1, 2),
                                  wide[:, [0, 1, 2, 5, 6, 8, 9, 10]])
    new, delta = record.consumer("c", wide, axis=1, offset=2)
    np.testing.assert_array_equal(new, record.keep(wide, 1, 2))
    assert delta is None
    np.testing.assert_array_equal(record.selection @ np.arange(6.0), [0.0, 3.0, 4.0])


def test_pruned_group_rule_declines_with_the_reason() -> None:
    group = _group(6, ["c"])
    step = _step("prune_channels", ["p", "c"], group="g", channels=6, kept=(0, 3))
    assert PrunedGroup.declines(step, group) is None
    assert PrunedGroup.declines(_step("prune_channels", ["p", "c"], group="g", channels=6,
                                      kept=(3, 0)), group) == (
        "kept channels must be sorted and distinct")
    pinned = ChannelGroup(**{**group.__dict__, "reason": "reaches a graph output"})
    assert PrunedGroup.declines(step, pinned) == (
        "channel group 'g' is pinned: reaches a graph output")
    assert PrunedGroup.declines_tensors(step, group, {"mix:c": np.zeros((6, 3))}) == (
        "mix:c must be a finite 6x2 matrix, not of shape (6, 3)")


# -- folds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_equals_the_batch_norm_after_the_conv(with_bias: bool) -> None:
    w = trained_conv(8, 4, 3).astype(np.float64)
    b = np.linspace(-1, 1, 8) if with_bias else None
    gamma, beta = 1 + _RNG.random(8), _RNG.standard_normal(8)
    mean, var, eps = _RNG.standard_normal(8), _RNG.random(8), 1e-3
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    x = _RNG.standard_normal((2, 4, 5, 5))
    z = _conv2d(x, w, b, geometry)
    c = (slice(None), None, None)
    expected = gamma[c] * (z - mean[c]) / np.sqrt(var[c] + eps) + beta[c]
    folded_w, folded_b = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(_conv2d(x, folded_w, folded_b, geometry), expected,
                               rtol=RTOL, atol=RTOL)


def test_conv_kernel_undoes_the_block_diagonal_view_of_a_grouped_conv() -> None:
    kernel = _RNG.standard_normal((12, 2, 3, 3))  # 3 groups of 4 outputs, 2 inputs each
    blocks = kernel.reshape(3, 4, -1)
    matrix = scipy.linalg.block_diag(*blocks)
    assert matrix.shape == (12, 3 * 2 * 9)
    np.testing.assert_array_equal(conv_kernel(matrix, (3, 3), 3), kernel)
    np.testing.assert_array_equal(conv_kernel(blocks[0], (3, 3)), kernel[:4])


# -- rules -----------------------------------------------------------------------------------
def test_the_rules_decline_what_no_printer_takes() -> None:
    w = trained_matrix(16, 32)
    assert lowrank_declines(_operator(w)) is None
    assert lowrank_declines(_operator(w, op_type="Gemm", transposed_input=True)) == (
        "Gemm with transA=1 is not rewritten")
    assert lowrank_declines(_operator(w, weight_side="left", name="l")) == (
        "'l' has its weight on the left (W @ x); only x @ W operators are factorised")
    assert lowrank_declines(_operator(w, graph="main/loop.body")) == (
        "operator inside a subgraph (main/loop.body) is left untouched")
    unfolded_c = _operator(w, op_type="Gemm", name="fc", unfolded_bias=True,
                           notes=("bias C is not constant; analysed without it",))
    assert lowrank_declines(unfolded_c) == (
        "bias C of Gemm 'fc' is not a constant per-output vector; the node is left untouched")
    grouped = ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 4)
    conv = _operator(np.zeros((16, 72)), op_type="Conv", geometry=grouped)  # 8 in, 4 groups
    assert lowrank_declines(conv) == "grouped conv (groups=4) is not factorised"
    transpose = _operator(np.zeros((16, 4)), op_type="ConvTranspose", geometry=grouped)
    assert lowrank_declines(transpose) == "ConvTranspose is not factorised"
    heads = [_operator(w, name="q"), _operator(w, op_type="Gemm", name="k",
                                               transposed_input=True)]
    assert shared_basis_declines(heads) == (
        "member 'k' is declined: Gemm with transA=1 is not rewritten")
    assert shared_basis_declines(heads[:1]) == "a shared basis needs two or more operators, not 1"


# -- the two printers of one record ----------------------------------------------------------
def _onnx(shape: tuple[int, ...], outputs: int,
          body: Callable[[gs.Graph, gs.Variable, list[gs.Variable]], None]) -> list[np.ndarray]:
    x = gs.Variable("x", np.float32, shape)
    ys = [gs.Variable(f"y{i}", np.float32, None) for i in range(outputs)]
    graph = gs.Graph(inputs=[x], outputs=ys, opset=17)
    body(graph, x, ys)
    model = gs.export_onnx(graph.cleanup().toposort())
    model.ir_version = 8  # what onnxruntime reads (the exporter writes the newest)
    return run_model(model, {"x": _INPUTS[shape]})


def _relax(shape: tuple[int, ...], body: Callable[..., list[object]]) -> list[np.ndarray]:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(e) for e in body(bb, x)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(_INPUTS[shape]))
    return [got[i].numpy() for i in range(len(got))]


_INPUTS = {
    (3, 32): _RNG.standard_normal((3, 32)).astype(np.float32),
    (2, 6, 9, 8): _RNG.standard_normal((2, 6, 9, 8)).astype(np.float32),
}
F32 = np.dtype(np.float32)


def test_onnx_and_relax_print_the_same_function_from_one_record() -> None:
    pytest.importorskip("tvm")
    from qmpass.tvm.relax_pass import emit_conv_pair, emit_matmul_pair, emit_split_pair

    w = trained_matrix(40, 32).astype(np.float64)
    first, second, _ = _truncated(w, 6)
    bias = np.linspace(-1, 1, 40)
    linear = FactoredLinear(first, second, bias)
    split = SharedBasisSplit(first, second, bias, (24, 16))
    k = trained_conv(12, 6, 3).astype(np.float64)
    cfirst, csecond, _ = _truncated(k.reshape(12, -1), 5)
    geometry = ConvGeometry((3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1)
    conv = FactoredConv.of(_step("lowrank", ["op"], 5),
                           _operator(k.reshape(12, -1), np.linspace(0, 1, 12), "Conv",
                                     geometry=geometry),
                           {"first": cfirst, "second": csecond, "bias": np.linspace(0, 1, 12)})
    x = _INPUTS[(3, 32)].astype(np.float64)
    cases = [
        (_onnx((3, 32), 1, lambda g, x, ys: matmul_pair(g, "p", x, ys[0], linear, F32)),
         _relax((3, 32), lambda bb, x: [emit_matmul_pair(bb, x, linear, "float32")]),
         [linear(x)]),
        (_onnx((3, 32), 2, lambda g, x, ys: split_pair(g, "s", x, ys, split, F32)),
         _relax((3, 32), lambda bb, x: emit_split_pair(bb, x, split, "float32")),
         [split.member(0)(x), split.member(1)(x)]),
        (_onnx((2, 6, 9, 8), 1, lambda g, x, ys: conv_pair(g, "c", x, ys[0], conv, F32)),
         _relax((2, 6, 9, 8), lambda bb, x: [emit_conv_pair(bb, x, conv, "float32")]),
         [_conv2d(_INPUTS[(2, 6, 9, 8)].astype(np.float64), conv.linear.matrix.reshape(k.shape),
                  conv.bias, geometry)]),
    ]
    for onnx_out, relax_out, reference in cases:
        assert len(onnx_out) == len(relax_out) == len(reference)
        for a, b, ref in zip(onnx_out, relax_out, reference, strict=True):
            assert a.shape == b.shape == ref.shape
            assert _rel(b, a) <= ATOL_REL
            assert _rel(a, ref) <= ATOL_REL

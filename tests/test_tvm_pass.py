"""QMPass: the Plan's rewrites as a Relax module pass.

Small cases compare the rewritten module with a hand-written Expected module
(``tvm.ir.assert_structural_equal``); the factors are checked against a truncated SVD
computed here with numpy, a pruned conv pair against ``W[kept]`` and ``W M``, ``b + W s``
written out with ``einsum``; paths the pass cannot prune through must decline the step
with the reason and leave the module unchanged. On every fixture (the CNNs factorised
and pruned) the module compiled by ``tvm.compile`` (llvm) and run on the Relax VM must
agree with onnxruntime running the ONNX model that the ONNX rewriters build from the
same plan and tensors: to float32 rounding (``ATOL_REL`` of the output norm), far below
the compression error itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import tvm
from channel_helpers import bias, conv, relu
from conftest import const, fixture_path, make_model, tensor, trained_conv, trained_matrix
from onnx import helper
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx import from_onnx

import models
from qmpass import CompressConfig
from qmpass.extract import extract_operators
from qmpass.extract.channels import (
    ChannelConsumer,
    ChannelGroup,
    SlicedConstant,
    channel_groups,
)
from qmpass.plan.factors import compensation
from qmpass.plan.plan import Cost, Plan, Step, StepKind
from qmpass.plan.planner import Planned
from qmpass.rewrite.base import name_nodes
from qmpass.tvm import (
    OnnxPlan,
    QMPass,
    RelaxResult,
    extract_relax,
    match_operators,
    plan_onnx,
)
from qmpass.verify import run_model

#: float32 agreement of two engines computing the same factors (measured: ~3e-7)
ATOL_REL = 1e-5
FIXTURES = ["mlp_digits", "resnet_digits", "resnet_digits_bn", "transformer_digits"]
#: (fixture, treatment of convolutions): every fixture factorised, the CNNs also pruned
CASES = [(name, "factorise") for name in FIXTURES] + [
    ("resnet_digits", "prune"), ("resnet_digits_bn", "prune")]


# -- helpers ---------------------------------------------------------------------------------
def _planned(*steps: tuple[StepKind, tuple[str, ...], int, dict[str, np.ndarray]]) -> Planned:
    records = tuple(
        Step(kind, names, Cost(0, 0), Cost(0, 0), 0.0, rank=rank) for kind, names, rank, _ in steps
    )
    plan = Plan("test", "svd", {"keep": 0.5}, Cost(0, 0), records)
    return Planned(plan, tuple(t for *_, t in steps), ())


def _svd_factors(w: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return s[:q, None] * vt[:q], u[:, :q]


def _const(array: np.ndarray) -> relax.Expr:
    return relax.const(np.ascontiguousarray(array).astype("float32"))


def _function(shape: tuple[int, ...], body) -> tvm.IRModule:  # type: ignore[no-untyped-def]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = body(bb, x)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- structure --------------------------------------------------------------------------------
def test_lowrank_gemm_becomes_two_matmuls_and_the_bias_add() -> None:
    w, b = trained_matrix(48, 64), np.linspace(-1, 1, 48).astype("float32")

    def before(bb, x):  # type: ignore[no-untyped-def]
        t = bb.emit(relax.op.permute_dims(_const(w), [1, 0]))
        y = bb.emit(relax.op.matmul(x, t))
        return bb.emit_output(relax.op.add(y, _const(b)))

    mod = _function((4, 64), before)
    (site,) = extract_relax(mod).sites
    first, second = _svd_factors(w, 16)
    rewrite = QMPass(_planned(("lowrank", (site.operator.name,), 16,
                               {"first": first, "second": second, "bias": b.astype(float)})))
    result = rewrite.apply(mod)
    got = result.module

    def expected(bb, x):  # type: ignore[no-untyped-def]
        h = bb.emit(relax.op.matmul(x, _const(first.T)))
        p = bb.emit(relax.op.matmul(h, _const(second.T)))
        return bb.emit_output(relax.op.add(p, _const(b)))

    tvm.ir.assert_structural_equal(got, _function((4, 64), expected))
    assert result.applied == (0,)
    tvm.ir.assert_structural_equal(rewrite(mod), got)  # as a pass: the same module
    x = np.random.default_rng(0).standard_normal((4, 64)).astype("float32")
    w_q = second @ first  # the truncated SVD: the rewrite computes x W_q^T + b
    np.testing.assert_allclose(_run(got, x), x @ w_q.T + b, rtol=1e-4, atol=1e-4)


def test_shared_basis_is_one_basis_matmul_one_fused_matmul_and_a_split() -> None:
    wq, wk = trained_matrix(32, 64), trained_matrix(64, 64)[32:]
    bq, bk = np.full(32, 0.5, "float32"), np.full(32, -0.25, "float32")

    def before(bb, x):  # type: ignore[no-untyped-def]
        q = bb.emit(relax.op.matmul(x, _const(wq.T)))
        q = bb.emit(relax.op.add(_const(bq), q))
        k = bb.emit(relax.op.matmul(x, _const(wk.T)))
        k = bb.emit(relax.op.add(k, _const(bk)))
        return bb.emit_output(relax.op.multiply(q, k))

    mod = _function((2, 8, 64), before)
    names = tuple(s.operator.name for s in extract_relax(mod).sites)
    assert extract_relax(mod).extraction().fusion_groups == (names,)
    first, second = _svd_factors(np.vstack([wq, wk]), 24)
    bias = np.concatenate([bq, bk]).astype(float)
    got = QMPass(_planned(("shared_basis", names, 24,
                           {"first": first, "second": second, "bias": bias})))(mod)

    def expected(bb, x):  # type: ignore[no-untyped-def]
        h = bb.emit(relax.op.matmul(x, _const(first.T)))
        p = bb.emit(relax.op.matmul(h, _const(second.T)))
        fused = bb.emit(relax.op.add(p, _const(bias)))
        parts = bb.emit(relax.op.split(fused, indices_or_sections=[32], axis=-1))
        q = bb.emit(relax.TupleGetItem(parts, 0))
        k = bb.emit(relax.TupleGetItem(parts, 1))
        return bb.emit_output(relax.op.multiply(q, k))

    tvm.ir.assert_structural_equal(got, _function((2, 8, 64), expected))


def test_lowrank_conv_is_a_thin_conv_and_a_pointwise_conv() -> None:
    w = trained_conv(16, 16, 3)
    b = np.linspace(0, 1, 16).astype("float32")
    geometry = {"strides": [2, 2], "padding": [1, 0, 1, 0], "dilation": [1, 1]}

    def before(bb, x):  # type: ignore[no-untyped-def]
        y = bb.emit(relax.op.nn.conv2d(x, _const(w), **geometry))
        r = bb.emit(relax.op.reshape(_const(b), [1, 16, 1, 1]))
        return bb.emit_output(relax.op.add(y, r))

    mod = _function((2, 16, 8, 8), before)
    (site,) = extract_relax(mod).sites
    first, second = _svd_factors(w.reshape(16, -1), 8)
    got = QMPass(_planned(("lowrank", (site.operator.name,), 8,
                           {"first": first, "second": second, "bias": b.astype(float)})))(mod)

    def expected(bb, x):  # type: ignore[no-untyped-def]
        h = bb.emit(relax.op.nn.conv2d(x, _const(first.reshape(8, 16, 3, 3)), groups=1,
                                       **geometry))
        p = bb.emit(relax.op.nn.conv2d(h, _const(second.reshape(16, 8, 1, 1))))
        return bb.emit_output(relax.op.add(p, _const(b.reshape(1, 16, 1, 1))))

    tvm.ir.assert_structural_equal(got, _function((2, 16, 8, 8), expected))


def test_a_module_without_matches_is_left_unchanged() -> None:
    def body(bb, x):  # type: ignore[no-untyped-def]
        y = bb.emit(relax.op.nn.relu(x))
        return bb.emit_output(relax.op.matmul(y, relax.op.permute_dims(x)))  # no weight

    mod = _function((4, 32), body)
    result = QMPass(keep=0.5).apply(mod)
    tvm.ir.assert_structural_equal(result.module, mod)
    assert result.outcomes == ()
    # a plan for another model finds none of its operators here: every step is declined
    other = plan_onnx(fixture_path("mlp_digits"), CompressConfig(keep=0.5))
    result = QMPass(other).apply(mod)
    tvm.ir.assert_structural_equal(result.module, mod)
    assert result.outcomes and all(o.status == "declined" and "no matching call" in str(o.reason)
                                   for o in result.outcomes)


def _prune_pair(middle, c_mid: int = 16):  # type: ignore[no-untyped-def]
    """conv2d(8 -> 16) + bias, ``middle`` (relu and whatever a case puts there), then
    conv2d(``c_mid`` -> 12) + bias; the group is the 16 channels between them."""
    w1, b1 = trained_conv(16, 8, 3), np.linspace(-0.5, 0.5, 16).astype("float32")
    w2, b2 = trained_conv(12, c_mid, 3), np.linspace(0, 0.3, 12).astype("float32")

    def before(bb, x):  # type: ignore[no-untyped-def]
        y = bb.emit(relax.op.nn.conv2d(x, _const(w1), padding=[1, 1, 1, 1]))
        r = bb.emit(relax.op.reshape(_const(b1), [1, 16, 1, 1]))
        h = middle(bb, bb.emit(relax.op.add(y, r)))
        z = bb.emit(relax.op.nn.conv2d(h, _const(w2), padding=[1, 1, 1, 1]))
        r2 = bb.emit(relax.op.reshape(_const(b2), [1, 12, 1, 1]))
        return bb.emit_output(relax.op.add(z, r2))

    mod = _function((2, 8, 6, 6), before)
    producer, consumer = (s.operator.name for s in extract_relax(mod).sites)
    group = ChannelGroup(
        name="g", channels=16, channel_axis=1,
        producers=(SlicedConstant(producer, 1, "w1", 0),),
        sliced=(SlicedConstant(producer, 2, "b1", 0),),
        consumers=(ChannelConsumer(consumer, "Conv", "h", 0, c_mid, "w2", 1),),
        tensors=())
    kept = (0, 2, 3, 5, 8, 9, 12, 15)
    rows = w1.reshape(16, -1).astype(np.float64)  # the planner's data-free stand-in
    mix, shift = compensation(kept, rows @ rows.T, np.abs(rows).sum(axis=1) / 10)
    step = Step("prune_channels", (producer, consumer), Cost(0, 0), Cost(0, 0), 0.0,
                group="g", channels=16, kept=kept)
    planned = Planned(Plan("test", "qmfrg", {"keep": 0.5}, Cost(0, 0), (step,)),
                      ({f"mix:{consumer}": mix, f"shift:{consumer}": shift},), ())
    return mod, planned, group, (w1, b1, w2, b2, kept, mix, shift)


def test_pruned_conv_pair_keeps_rows_and_compensates_the_consumer() -> None:
    mod, planned, group, (w1, b1, w2, b2, kept, mix, shift) = _prune_pair(
        lambda bb, a: bb.emit(relax.op.nn.relu(a)))
    result = QMPass(planned, groups=[group]).apply(mod)
    got = result.module
    assert result.applied == (0,)
    assert len(result.outcomes[0].sites) == 2
    k = len(kept)
    # W2' = W2 M on the input axis; b2' = b2 + W2 s summed over the kernel taps
    w2m = np.einsum("ocij,ck->okij", w2.astype(np.float64), mix)
    b2s = b2 + np.einsum("ocij,c->o", w2.astype(np.float64), shift)

    def expected(bb, x):  # type: ignore[no-untyped-def]
        conv = {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}
        y = bb.emit(relax.op.nn.conv2d(x, _const(w1[list(kept)]), **conv))
        a = bb.emit(relax.op.add(y, _const(b1[list(kept)].reshape(1, k, 1, 1))))
        h = bb.emit(relax.op.nn.relu(a))
        z = bb.emit(relax.op.nn.conv2d(h, _const(w2m), **conv))
        return bb.emit_output(relax.op.add(z, _const(b2s.reshape(1, 12, 1, 1))))

    tvm.ir.assert_structural_equal(got, _function((2, 8, 6, 6), expected))


def test_batch_norm_and_depthwise_conv_are_pruned_as_onnx_prunes_them() -> None:
    """conv -> BatchNormalization -> relu -> depthwise conv -> relu -> conv: Relax folds
    the batch norm into the producer (ONNX slices it), the depthwise conv keeps its kept
    filters with ``groups = k``; both engines compute the same function."""
    model = name_nodes(make_model(
        [
            conv("a", "x", "wa", "h", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["n"],
                             name="bn"),
            relu("n", "r"),
            conv("dw", "r", "wdw", "d", "bdw", group=8, pads=[1, 1, 1, 1]),
            relu("d", "dr"),
            conv("c", "dr", "wc", "y", "bc", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", ["batch", 3, 8, 8])],
        [tensor("y", ["batch", 4, 8, 8])],
        [
            const("wa", trained_conv(8, 3, 3)), const("g", 1 + bias(8)),
            const("be", bias(8)), const("m", bias(8)[::-1]), const("v", 1 + np.abs(bias(8))),
            const("wdw", trained_conv(8, 1, 3)), const("bdw", bias(8)),
            const("wc", trained_conv(4, 8, 3)), const("bc", bias(4)),
        ],
    ))
    extraction = extract_operators(model)
    group = next(g for g in channel_groups(model) if g.name == "a")
    assert group.prunable and {s.node for s in group.sliced} == {"bn", "dw"}
    kept = (0, 2, 3, 5, 6, 7)
    rows = trained_conv(8, 3, 3).reshape(8, -1).astype(np.float64)
    mix, shift = compensation(kept, rows @ rows.T, np.abs(bias(8)).astype(np.float64))
    step = Step("prune_channels", group.operators, Cost(0, 0), Cost(0, 0), 0.0,
                group="a", channels=8, kept=kept)
    plan = OnnxPlan(model, extraction, (group,), Planned(
        Plan("test", "qmfrg", {"keep": 0.5}, Cost(0, 0), (step,)),
        ({"mix:c": mix, "shift:c": shift},), ()))
    mod = from_onnx(model)
    result = QMPass(plan).apply(mod)
    got = result.module
    (outcome,) = result.outcomes
    assert outcome.status == "applied" and len(outcome.sites) == 3  # a, dw, c
    shapes = sorted(op.shape for op in extract_relax(got).operators)
    assert shapes == [(4, 6 * 9), (6, 27), (6, 6 * 9)]  # dw: block-diagonal, groups = 6
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype("float32")
    compressed, declined = plan.compressed()
    assert declined == {}
    reference = run_model(compressed, {"x": x})[0]
    assert _rel(_run(got, x), reference) <= ATOL_REL
    assert _rel(reference, run_model(model, {"x": x})[0]) > 100 * ATOL_REL


def _constant_add(bb, a):  # type: ignore[no-untyped-def]
    h = bb.emit(relax.op.nn.relu(a))
    return bb.emit(relax.op.add(h, _const(np.linspace(0, 1, 16).reshape(1, 16, 1, 1))))


def _loose_batch_norm(bb, a):  # type: ignore[no-untyped-def]
    h = bb.emit(relax.op.nn.relu(a))
    ones, zeros = _const(np.ones(16)), _const(np.zeros(16))
    bn = bb.emit(relax.op.nn.batch_norm(h, ones, zeros, zeros, ones, axis=1))
    return bb.emit(relax.TupleGetItem(bn, 0))


def _concat(bb, a):  # type: ignore[no-untyped-def]
    h = bb.emit(relax.op.nn.relu(a))
    return bb.emit(relax.op.concat([h, h], axis=1))


def _softmax(bb, a):  # type: ignore[no-untyped-def]
    return bb.emit(relax.op.nn.softmax(a, axis=1))


@pytest.mark.parametrize(("middle", "c_mid", "reason"), [
    (_constant_add, 16, "relax.add with a constant operand"),
    (_loose_batch_norm, 16, "a batch norm that is not folded into a conv2d site"),
    (_concat, 32, "a concat"),
    (_softmax, 16, "relax.nn.softmax is not a channel-wise operation"),
], ids=["constant-add", "batch-norm", "concat", "softmax"])
def test_unsupported_paths_decline_the_prune_step_with_the_reason(
    middle, c_mid: int, reason: str  # type: ignore[no-untyped-def]
) -> None:
    mod, planned, group, _ = _prune_pair(middle, c_mid)
    result = QMPass(planned, groups=[group]).apply(mod)
    tvm.ir.assert_structural_equal(result.module, mod)
    (outcome,) = result.outcomes
    assert outcome.status == "declined" and reason in str(outcome.reason)


def test_prune_steps_without_channel_groups_are_declined() -> None:
    mod, planned, _, _ = _prune_pair(lambda bb, a: bb.emit(relax.op.nn.relu(a)))
    result = QMPass(planned).apply(mod)
    tvm.ir.assert_structural_equal(result.module, mod)
    (outcome,) = result.outcomes
    assert outcome.status == "declined" and "no channel group 'g'" in str(outcome.reason)


# -- numerics on the fixtures -----------------------------------------------------------------
@dataclass(frozen=True)
class _Case:
    plan: OnnxPlan
    rewrite: RelaxResult
    relax_out: np.ndarray
    onnx_out: np.ndarray
    original_out: np.ndarray
    onnx_declined: dict[int, str]
    relax_shapes: list[tuple[int, int]]
    onnx_shapes: list[tuple[int, int]]


def _calib(name: str) -> dict[str, np.ndarray]:
    return models.load_calib(name)


@pytest.fixture(scope="module")
def cases() -> dict[str, _Case]:
    """Per case: a data-aware plan at half the parameters (convolutions factorised or
    pruned), applied by the pass to the imported module and by the ONNX rewriters."""
    out = {}
    for name, convs in CASES:
        calib = _calib(name)
        plan = plan_onnx(fixture_path(name), CompressConfig(keep=0.5, calib=calib),
                         convs=convs)  # type: ignore[arg-type]
        rewrite = QMPass(plan).apply(from_onnx(plan.model))
        mod = rewrite.module
        x = calib["input"][:48]
        compressed, declined = plan.compressed(rewrite.applied)
        out[f"{name}-{convs}"] = _Case(
            plan, rewrite, _run(mod, x), run_model(compressed, {"input": x})[0],
            run_model(plan.model, {"input": x})[0], declined,
            sorted(op.shape for op in extract_relax(mod).operators),
            sorted(op.shape for op in extract_operators(compressed).operators))
    return out


@pytest.mark.parametrize("key", [f"{name}-{convs}" for name, convs in CASES])
def test_tvm_and_onnxruntime_agree_on_the_same_plan(cases: dict[str, _Case], key: str) -> None:
    case = cases[key]
    steps = case.plan.planned.plan.steps
    assert steps and case.rewrite.applied == tuple(range(len(steps)))
    assert case.onnx_declined == {}
    replaced = sum(len(o.sites) for o in case.rewrite.outcomes)
    assert replaced == sum(len(s.operators) for s in steps)
    # the same weight operators, of the same shapes, in both rewritten models
    assert case.relax_shapes == case.onnx_shapes
    assert _rel(case.relax_out, case.onnx_out) <= ATOL_REL
    # the plan changed the function (the agreement is not that of two unchanged models)
    assert _rel(case.onnx_out, case.original_out) > 100 * ATOL_REL


@pytest.mark.parametrize("name", ["resnet_digits", "resnet_digits_bn"])
def test_pruned_plans_prune_in_relax(cases: dict[str, _Case], name: str) -> None:
    """The CNNs' pruned plans are channel pruning (not factorisation), every step applied,
    and the Relax classifier head reads the kept channels of the last group."""
    case = cases[f"{name}-prune"]
    outcomes = case.rewrite.outcomes
    assert outcomes and all(o.step.kind == "prune_channels" and o.status == "applied"
                            for o in outcomes)
    head = [o for o in outcomes if "/7/Gemm" in o.step.operators]
    assert head and head[0].step.kept is not None
    assert (10, len(head[0].step.kept)) in case.relax_shapes
    assert (10, head[0].step.channels) not in case.relax_shapes


def test_transformer_plan_uses_shared_bases(cases: dict[str, _Case]) -> None:
    outcomes = cases["transformer_digits-factorise"].rewrite.outcomes
    shared = [o for o in outcomes if o.step.kind == "shared_basis"]
    assert shared and all(len(o.sites) == 3 for o in shared)  # Q, K, V


def test_pass_in_a_pipeline_with_bound_params_and_tvm_passes() -> None:
    """keep_params_in_input + BindParams, the pass, then TVM's own passes; it builds, runs
    on the VM, and agrees with onnxruntime."""
    name = "transformer_digits"
    calib = _calib(name)
    plan = plan_onnx(fixture_path(name), CompressConfig(keep=0.4, calib=calib))
    mod, params = detach_params(from_onnx(plan.model, keep_params_in_input=True))
    func = mod["main"]
    names = [p.name for p in func.params][int(func.attrs["num_input"]):]
    results: list[RelaxResult] = []
    pipeline = tvm.transform.Sequential([
        relax.transform.BindParams("main", dict(zip(names, params["main"], strict=True))),
        QMPass(plan, report=results.append),
        relax.transform.CombineParallelMatmul(),
        relax.transform.AdjustMatmulOrder(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])
    built = pipeline(mod)
    (rewrite,) = results
    assert len(rewrite.applied) == len(plan.planned.plan.steps)
    x = calib["input"][:32]
    compressed, _ = plan.compressed(rewrite.applied)
    assert _rel(_run(built, x), run_model(compressed, {"input": x})[0]) <= ATOL_REL


def test_budget_on_the_relax_module_plans_what_the_onnx_path_plans() -> None:
    """``QMPass(keep=...)`` plans on the Relax operators: the same decisions as the ONNX
    planner on the same model (data-free), hence the same function."""
    name = "transformer_digits"
    onnx_plan = plan_onnx(fixture_path(name), CompressConfig(keep=0.5))
    mod = from_onnx(onnx_plan.model)
    rewrite = QMPass(keep=0.5).apply(mod)
    got = rewrite.module
    relax_steps = rewrite.planned.plan.steps
    onnx_steps = onnx_plan.planned.plan.steps
    matched = match_operators(onnx_plan.extraction.operators, extract_relax(mod).sites)
    assert [(s.kind, s.rank, tuple(matched[n].operator.name for n in s.operators))
            for s in onnx_steps] == [(s.kind, s.rank, s.operators) for s in relax_steps]
    x = _calib(name)["input"][:32]
    compressed, _ = onnx_plan.compressed()
    assert _rel(_run(got, x), run_model(compressed, {"input": x})[0]) <= ATOL_REL


def test_plan_and_budget_are_exclusive() -> None:
    plan = plan_onnx(onnx.load(str(fixture_path("mlp_digits"))), CompressConfig(keep=0.5))
    with pytest.raises(ValueError, match="not both"):
        QMPass(plan, keep=0.5)


def test_plan_onnx_refuses_a_budget_gated_model() -> None:
    from qmpass.compress import compress_gated
    from qmpass.errors import QmpassInputError

    model = onnx.load(str(fixture_path("mlp_digits")))
    gated, _ = compress_gated(model, CompressConfig(budgets=(0.8, 0.4)), standalone=False)
    with pytest.raises(QmpassInputError, match="the Relax pass does not take gated models"):
        plan_onnx(gated, CompressConfig(keep=0.5))

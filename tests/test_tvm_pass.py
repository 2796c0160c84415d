"""QMPass: the Plan's rewrites as a Relax module pass.

Small cases compare the rewritten module with a hand-written Expected module
(``tvm.ir.assert_structural_equal``); the factors are checked against a truncated SVD
computed here with numpy. On every fixture the module compiled by ``tvm.compile``
(llvm) and run on the Relax VM must agree with onnxruntime running the ONNX model that
the ONNX rewriters build from the same plan and tensors: to float32 rounding
(``ATOL_REL`` of the output norm), far below the compression error itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import tvm
from conftest import fixture_path, trained_conv, trained_matrix
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx import from_onnx

import models
from qmpass import CompressConfig
from qmpass.plan.plan import Cost, Plan, Step, StepKind
from qmpass.plan.planner import Planned
from qmpass.tvm import OnnxPlan, QMPass, extract_relax, match_operators, plan_onnx
from qmpass.verify import run_model

#: float32 agreement of two engines computing the same factors (measured: ~3e-7)
ATOL_REL = 1e-5
FIXTURES = ["mlp_digits", "resnet_digits", "resnet_digits_bn", "transformer_digits"]


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
    got = rewrite(mod)

    def expected(bb, x):  # type: ignore[no-untyped-def]
        h = bb.emit(relax.op.matmul(x, _const(first.T)))
        p = bb.emit(relax.op.matmul(h, _const(second.T)))
        return bb.emit_output(relax.op.add(p, _const(b)))

    tvm.ir.assert_structural_equal(got, _function((4, 64), expected))
    assert rewrite.applied == (0,)
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
    rewrite = QMPass(keep=0.5)
    tvm.ir.assert_structural_equal(rewrite(mod), mod)
    assert rewrite.outcomes == ()
    # a plan for another model finds none of its operators here: every step is declined
    other = plan_onnx(fixture_path("mlp_digits"), CompressConfig(keep=0.5))
    rewrite = QMPass(other)
    tvm.ir.assert_structural_equal(rewrite(mod), mod)
    assert rewrite.outcomes and all(o.status == "declined" and "no matching call" in str(o.reason)
                                    for o in rewrite.outcomes)


def test_channel_pruning_steps_are_declined_with_the_reason() -> None:
    name = "resnet_digits"
    calib = _calib(name)
    plan = plan_onnx(fixture_path(name), CompressConfig(keep=0.5, calib=calib), convs="prune")
    kinds = {s.kind for s in plan.planned.plan.steps}
    assert "prune_channels" in kinds
    mod = from_onnx(plan.model)
    rewrite = QMPass(plan)
    out = rewrite(mod)
    pruned = [o for o in rewrite.outcomes if o.step.kind == "prune_channels"]
    assert pruned and all(o.status == "declined" and "channel pruning" in str(o.reason)
                          for o in pruned)
    if kinds == {"prune_channels"}:
        tvm.ir.assert_structural_equal(out, mod)


# -- numerics on the fixtures -----------------------------------------------------------------
@dataclass(frozen=True)
class _Case:
    plan: OnnxPlan
    rewrite: object
    relax_out: np.ndarray
    onnx_out: np.ndarray
    original_out: np.ndarray
    onnx_declined: dict[int, str]


def _calib(name: str) -> dict[str, np.ndarray]:
    return models.load_calib(name)


@pytest.fixture(scope="module")
def cases() -> dict[str, _Case]:
    """Per fixture: a data-aware plan at half the parameters (convolutions factorised),
    applied by the pass to the imported module and by the ONNX rewriters."""
    out = {}
    for name in FIXTURES:
        calib = _calib(name)
        plan = plan_onnx(fixture_path(name), CompressConfig(keep=0.5, calib=calib),
                         convs="factorise")
        rewrite = QMPass(plan)
        mod = rewrite(from_onnx(plan.model))
        x = calib["input"][:48]
        compressed, declined = plan.compressed(rewrite.applied)
        out[name] = _Case(plan, rewrite, _run(mod, x), run_model(compressed, {"input": x})[0],
                          run_model(plan.model, {"input": x})[0], declined)
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_tvm_and_onnxruntime_agree_on_the_same_plan(cases: dict[str, _Case], name: str) -> None:
    case = cases[name]
    steps = case.plan.planned.plan.steps
    assert steps and case.rewrite.applied == tuple(range(len(steps)))  # type: ignore[attr-defined]
    assert case.onnx_declined == {}
    replaced = sum(len(o.sites) for o in case.rewrite.outcomes)  # type: ignore[attr-defined]
    assert replaced == sum(len(s.operators) for s in steps)
    assert _rel(case.relax_out, case.onnx_out) <= ATOL_REL
    # the plan changed the function (the agreement is not that of two unchanged models)
    assert _rel(case.onnx_out, case.original_out) > 100 * ATOL_REL


def test_transformer_plan_uses_shared_bases(cases: dict[str, _Case]) -> None:
    outcomes = cases["transformer_digits"].rewrite.outcomes  # type: ignore[attr-defined]
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
    rewrite = QMPass(plan)
    pipeline = tvm.transform.Sequential([
        relax.transform.BindParams("main", dict(zip(names, params["main"], strict=True))),
        rewrite,
        relax.transform.CombineParallelMatmul(),
        relax.transform.AdjustMatmulOrder(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])
    built = pipeline(mod)
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
    rewrite = QMPass(keep=0.5)
    got = rewrite(mod)
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

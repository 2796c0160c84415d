"""The registry of channel rules: one source of which ops are channel-wise, for the ONNX
analysis and the Relax pruning alike.

Each agreement case is ``conv a -> Sigmoid -> <op> -> conv c`` where the consumer ``c``
reads nothing of the channels the step removes (their weight columns are zero), so the
certificate of the step is zero: a pruned model computes the original function to
float32 rounding exactly when every op between the convs acts on each channel alone.
Both sides must accept the same ops: the ONNX analysis leaves group ``a`` prunable and
the ONNX rewrite prunes it, the Relax pass (on the module the ONNX importer makes of the
same model) applies the same step, and both engines agree with the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
import pytest
import tvm
from channel_helpers import bias, conv, zero_rows
from conftest import OPSET, const, make_model, tensor, trained_conv
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from qmpass.extract import extract_operators
from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.extract.channels.rules import CHANNEL_WISE, RULES, onnx_rule, relax_rule
from qmpass.plan.plan import Cost, Plan, Step
from qmpass.plan.planner import Planned
from qmpass.rewrite.base import name_nodes
from qmpass.tvm import OnnxPlan, QMPass, RelaxResult
from qmpass.verify import run_model

#: float32 rounding of the same sums in another order (the step's certificate is zero)
ATOL_REL = 1e-5
KEPT = (0, 2, 3, 5, 6)
PRUNED = tuple(c for c in range(8) if c not in KEPT)


def _in_opset(op_type: str) -> bool:
    try:
        onnx.defs.get_schema(op_type, OPSET)
    except onnx.defs.SchemaError:
        return False
    return True


UNARY = sorted(op for r in RULES if r.kind == "elementwise" for op in r.onnx if _in_opset(op))
BINARY = sorted(op for r in RULES if r.kind == "binary" for op in r.onnx)
#: ONNX ops the importer writes as something other than the Relax ops of their rule; the
#: Relax pass sees what the importer wrote and declines it with this reason
IMPORTED_OTHERWISE = {
    "Clip": "relax.call_tir is not a channel-wise operation",  # emit_te(topi.maximum)
    "Dropout": "relax.nn.dropout is not a channel-wise operation",  # (output, mask)
    "ThresholdedRelu": "relax.greater is not a channel-wise operation",  # (x > a) * x
    # broadcast_to both operands, stack them on a new axis 0, reduce over it
    "Max": "relax.broadcast_to is not a channel-wise operation",
    "Min": "relax.broadcast_to is not a channel-wise operation",
}
#: ONNX ops the importer does not convert: only the ONNX side is checked
NOT_IMPORTED = {"Celu"}


def _model(middle: Sequence[onnx.NodeProto], extra: Sequence[onnx.TensorProto] = ()
           ) -> onnx.ModelProto:
    """conv a (3 -> 8) + bias, ``s = Sigmoid(h)``, ``middle`` (``s`` -> ``m``), conv c
    (8 -> 4) whose weights read none of the ``PRUNED`` channels."""
    wc = zero_rows(trained_conv(4, 8, 3), PRUNED, axis=1)
    return name_nodes(make_model(
        [
            conv("a", "x", "wa", "h", "ba", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
            *middle,
            conv("c", "m", "wc", "y", "bc", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", ["batch", 3, 6, 6])],
        [tensor("y", ["batch", 4, 6, 6])],
        [const("wa", trained_conv(8, 3, 3)), const("ba", bias(8)), const("wc", wc),
         const("bc", bias(4)), *extra],
    ))


def _unary(op_type: str) -> onnx.ModelProto:
    if op_type == "Clip":  # with its bounds: Clip without them is the identity
        return _model([helper.make_node("Clip", ["s", "lo", "hi"], ["m"], name="op")],
                      [const("lo", np.array(0.25)), const("hi", np.array(0.75))])
    return _model([helper.make_node(op_type, ["s"], ["m"], name="op")])


def _binary(op_type: str, form: str) -> onnx.ModelProto:
    """``op(s, e)`` of two tensors of the group (``e = Exp(Tanh(h))``, in ``(1/e, e)``)
    or ``op(s, k)`` with a scalar constant ``k``; both keep ``Pow`` and ``Div`` finite."""
    if form == "scalar":
        return _model([helper.make_node(op_type, ["s", "k"], ["m"], name="op")],
                      [const("k", np.array(0.5))])
    return _model([
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Exp", ["t"], ["e"], name="exp"),
        helper.make_node(op_type, ["s", "e"], ["m"], name="op"),
    ])


def _group(model: onnx.ModelProto) -> ChannelGroup:
    return next(g for g in channel_groups(model) if g.name == "a")


def _prune(model: onnx.ModelProto, group: ChannelGroup
           ) -> tuple[OnnxPlan, RelaxResult | None, tvm.IRModule]:
    """The step keeping ``KEPT`` of group ``a`` (no compensation: the removed channels are
    not read), as an ONNX plan, and the Relax pass's result on the imported module (None,
    with an empty module, where the importer does not convert the model)."""
    step = Step("prune_channels", group.operators, Cost(0, 0), Cost(0, 0), 0.0,
                group=group.name, channels=8, kept=KEPT)
    plan = OnnxPlan(model, extract_operators(model), (group,), Planned(
        Plan("test", "magnitude", {"keep": 0.5}, Cost(0, 0), (step,)), ({},), ()))
    if any(node.op_type in NOT_IMPORTED for node in model.graph.node):
        return plan, None, tvm.IRModule()
    result = QMPass(plan).apply(from_onnx(model))
    return plan, result, result.module


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


X = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype("float32")


# -- the registry -----------------------------------------------------------------------------
def test_div_pow_sqrt_are_channel_wise_on_both_sides() -> None:
    for onnx_op, relax_op in [("Div", "relax.divide"), ("Pow", "relax.power"),
                              ("Sqrt", "relax.sqrt")]:
        rule = onnx_rule(onnx_op)
        assert rule is not None and rule.kind in CHANNEL_WISE
        assert relax_rule(relax_op) is rule


def test_every_relax_op_of_the_registry_is_a_relax_op() -> None:
    for rule in RULES:
        for name in rule.relax:
            assert tvm.ir.Op.get(name).name == name
        assert rule.onnx and all(onnx.defs.has(op) for op in rule.onnx)


def test_every_rule_says_what_it_does() -> None:
    for rule in RULES:
        assert rule.index_map
        assert (rule.couple is None) == (rule.declined is not None)


# -- agreement --------------------------------------------------------------------------------
@pytest.mark.parametrize("op_type", UNARY)
def test_unary_ops_pass_on_both_sides(op_type: str) -> None:
    model = _unary(op_type)
    group = _group(model)
    assert group.prunable, group.reason
    plan, rewrite, _ = _prune(model, group)
    compressed, declined = plan.compressed()
    assert declined == {}
    reference = run_model(model, {"x": X})[0]
    assert _rel(run_model(compressed, {"x": X})[0], reference) <= ATOL_REL
    if op_type in NOT_IMPORTED:
        return
    assert rewrite is not None
    (outcome,) = rewrite.outcomes
    if op_type in IMPORTED_OTHERWISE:
        assert outcome.status == "declined"
        assert IMPORTED_OTHERWISE[op_type] in str(outcome.reason)
        return
    assert outcome.status == "applied", outcome.reason
    assert len(outcome.sites) == 2


@pytest.mark.parametrize("form", ["tensors", "scalar"])
@pytest.mark.parametrize("op_type", BINARY)
def test_binary_ops_pass_on_both_sides(op_type: str, form: str) -> None:
    model = _binary(op_type, form)
    group = _group(model)
    assert group.prunable, group.reason
    plan, rewrite, got = _prune(model, group)
    compressed, declined = plan.compressed()
    assert declined == {}
    reference = run_model(model, {"x": X})[0]
    onnx_pruned = run_model(compressed, {"x": X})[0]
    assert _rel(onnx_pruned, reference) <= ATOL_REL
    assert rewrite is not None
    (outcome,) = rewrite.outcomes
    if op_type in IMPORTED_OTHERWISE:
        assert outcome.status == "declined"
        assert IMPORTED_OTHERWISE[op_type] in str(outcome.reason)
        return
    assert outcome.status == "applied", outcome.reason
    if op_type in ("Div", "Pow"):  # the ops the two sides used to disagree on, compiled
        assert _rel(_run(got, X), onnx_pruned) <= ATOL_REL


def test_sqrt_compiles_to_the_same_function() -> None:
    model = _unary("Sqrt")
    plan, rewrite, got = _prune(model, _group(model))
    assert rewrite is not None and rewrite.applied == (0,)
    compressed, _ = plan.compressed()
    reference = run_model(model, {"x": X})[0]
    assert _rel(_run(got, X), reference) <= ATOL_REL
    assert _rel(run_model(compressed, {"x": X})[0], reference) <= ATOL_REL


def test_a_per_channel_constant_is_sliced_in_onnx_and_declined_in_relax() -> None:
    """The one place the sides differ on purpose: the ONNX rewrite slices a constant with
    one value per channel; the Relax pass edits constants only inside its sites."""
    k = (1 + np.arange(8, dtype=np.float32)).reshape(1, 8, 1, 1)
    model = _model([helper.make_node("Div", ["s", "k"], ["m"], name="op")], [const("k", k)])
    group = _group(model)
    assert group.prunable and ("op", 1) in {(s.node, s.input_index) for s in group.sliced}
    plan, rewrite, got = _prune(model, group)
    compressed, declined = plan.compressed()
    assert declined == {}
    assert _rel(run_model(compressed, {"x": X})[0], run_model(model, {"x": X})[0]) <= ATOL_REL
    assert rewrite is not None
    (outcome,) = rewrite.outcomes
    assert outcome.status == "declined"
    assert "relax.divide with a constant operand of shape [1, 8, 1, 1], one value per " \
           "channel" in str(outcome.reason)
    tvm.ir.assert_structural_equal(got, from_onnx(model))


@pytest.mark.parametrize(("middle", "onnx_reason", "relax_reason"), [
    ([helper.make_node("Softmax", ["s"], ["m"], name="op", axis=1)],
     "tensor 's' is read by Softmax 'op'", "relax.nn.softmax is not a channel-wise"),
    ([helper.make_node("Split", ["s"], ["p", "q"], name="op", axis=1, num_outputs=2)
      if OPSET >= 18 else helper.make_node("Split", ["s"], ["p", "q"], name="op", axis=1),
      helper.make_node("Concat", ["q", "p"], ["m"], name="cat", axis=1)],
     "tensor 's' is read by Split 'op' (channels are not followed through it",
     "relax.split: channels are not followed through it"),
], ids=["softmax", "split"])
def test_ops_that_mix_or_cut_channels_are_declined_on_both_sides(
    middle: list[onnx.NodeProto], onnx_reason: str, relax_reason: str
) -> None:
    model = _model(middle)
    group = _group(model)
    assert group.reason is not None and onnx_reason in group.reason
    # the Relax walk on its own: the group as if the analysis had let c consume it
    (consumer,) = next(g for g in channel_groups(model) if "c" in g.operators).consumers
    unpinned = replace(group, reason=None, consumers=(replace(consumer, activation="s"),))
    _, rewrite, got = _prune(model, unpinned)
    assert rewrite is not None
    (outcome,) = rewrite.outcomes
    assert outcome.status == "declined" and relax_reason in str(outcome.reason)
    tvm.ir.assert_structural_equal(got, from_onnx(model))

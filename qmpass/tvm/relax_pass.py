"""``QMPass``: a Relax module pass that applies a qmpass Plan to a TVM build.

The pass prints the records of :mod:`qmpass.algebra` (the same the ONNX rewriters
print) in Relax operators, after the records' rules accepted the plan's operators. An
operator is the affine map ``y = W x + b`` of one site (:mod:`qmpass.tvm.extract`: the
call, its bias add or batch norm):

* :class:`~qmpass.algebra.FactoredLinear`: ``R.matmul(R.matmul(x, first^T), second^T)
  + bias`` (Relax multiplies the activation from the left, hence the transposes; batch
  and token axes broadcast);
* :class:`~qmpass.algebra.FactoredConv`: ``R.nn.conv2d(x, first)`` with the original
  strides, padding and dilation, then the 1x1 ``R.nn.conv2d(second)``, then ``+ bias``
  as ``(1, Cout, 1, 1)``; a folded batch norm is gone;
* :class:`~qmpass.algebra.SharedBasisSplit` (members reading one tensor, e.g. Q/K/V):
  the fused pair, then ``R.split`` on the last axis at the record's split points, item
  ``i`` replacing member ``i``'s output.

* channel pruning (:mod:`qmpass.tvm.prune`): the producers of a channel group keep the
  ``kept`` output rows of their folded ``(W, b)``, depthwise convs their ``kept`` filters,
  and each consumer's input slice ``W_g`` becomes ``W_g M`` with ``b += W_g s`` (the
  planner's least-squares compensation ``x ~= M x_kept + s``); a classifier head's
  ``reshape`` to ``[N, C]`` asks for ``[N, k]``. The groups are those of
  :mod:`qmpass.extract.channels` on the ONNX model the plan was made on
  (:class:`~qmpass.tvm.OnnxPlan` brings them); the pass checks in the Relax function that
  only channel-wise operations without constants lie between producers and consumers,
  and declines the step with the reason otherwise.

Each step is applied or declined as a whole, with the reason in the
:class:`RelaxResult` that :meth:`QMPass.apply` returns. A site is rewritten by one
low-rank or shared-basis step, or by any number of prune steps (a consumer of one group
is often the producer of the next: the edits compose), never by both kinds.

Where it belongs in a pipeline: right after the import (``from_onnx``) and, for a module
whose weights are parameters, after ``BindParams`` (or with the values in the
function's ``"params"`` attribute); before ``DecomposeOpsForInference`` (which dissolves
the batch norms it folds), before ``CombineParallelMatmul`` (which would hide the
members of a shared basis in one concatenated matmul), and before ``LegalizeOps`` and
fusion. ``FoldConstant`` may run before or after it. Afterwards ``CombineParallelMatmul``,
``FoldConstant`` and ``DeadCodeElimination`` compose with it; ``AdjustMatmulOrder``
keeps the ``(x A) B`` order the pass emits for inputs whose shape makes it cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qmpass.algebra import (
    FactoredConv,
    FactoredLinear,
    SharedBasisSplit,
    decline_factors,
    decline_rank,
    lowrank_record,
)
from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.plan import Step
from qmpass.plan.planner import Method, Planned
from qmpass.tvm.extract import RelaxExtraction, Site, extract_relax
from qmpass.tvm.plans import OnnxPlan, plan_relax
from qmpass.tvm.prune import Dataflow, SiteEdit, prune_step

__all__ = [
    "QMPass",
    "RelaxOutcome",
    "RelaxResult",
    "emit_conv_pair",
    "emit_matmul_pair",
    "emit_split_pair",
    "match_operators",
]

#: relative tolerance for recognising an ONNX operator's weights in a Relax function
#: (both are the same float32 values read in float64; folding a batch norm may round)
_MATCH_RTOL = 1e-6


@dataclass(frozen=True)
class RelaxOutcome:
    """What the pass did with step ``index`` of the plan: ``applied`` or ``declined``;
    ``sites`` are the Relax operators (call variables) it replaced."""

    index: int
    step: Step
    status: Literal["applied", "declined"]
    reason: str | None = None
    sites: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class RelaxResult:
    """What one run of the pass made: the rewritten ``module``, what happened to each
    step (``outcomes``), the plan that was applied (``planned``) and the operators the
    function was read as (``extraction``)."""

    module: Any  # tvm.IRModule
    outcomes: tuple[RelaxOutcome, ...]
    planned: Planned
    extraction: RelaxExtraction

    @property
    def applied(self) -> tuple[int, ...]:
        """The indices of the applied steps (``OnnxPlan.compressed`` takes them)."""
        return tuple(o.index for o in self.outcomes if o.status == "applied")


def match_operators(
    operators: Sequence[Operator], sites: Sequence[Site]
) -> dict[str, Site]:
    """The Relax site of each ONNX operator that has one, by weight values.

    Parameter names survive the import only with ``keep_params_in_input=True`` (and
    not always intact: ``onnx::MatMul_257`` becomes ``MatMul_257``), constants have
    none, so a site is recognised by what it computes: the same kind,
    shape, geometry and bias presence, and weights (and bias) equal to ``_MATCH_RTOL``
    relative to their largest entry. Operators and sites are walked in graph order and
    each site is taken once, so two operators with equal weights are matched in order;
    a site whose weight parameter has the operator's weight name is preferred.
    """
    taken: set[int] = set()
    found: dict[str, Site] = {}
    for op in operators:
        candidates = [i for i, site in enumerate(sites) if i not in taken and _same(op, site)]
        if not candidates:
            continue
        names = {op.weight_name, op.weight_name.split("::")[-1]}  # the importer drops "onnx::"
        named = [i for i in candidates if sites[i].weight_param in names]
        pick = (named or candidates)[0]
        taken.add(pick)
        found[op.name] = sites[pick]
    return found


def _same(op: Operator, site: Site) -> bool:
    other = site.operator
    kind = "conv2d" if op.op_type == "Conv" else "matmul" if op.op_type in ("MatMul", "Gemm") \
        else None
    if kind != site.kind or op.weight_side != "right" or op.shape != other.shape:
        return False
    if op.geometry != other.geometry or (op.bias is None) != (other.bias is None):
        return False
    if not _close(op.weight, other.weight):
        return False
    return op.bias is None or other.bias is None or _close(op.bias, other.bias)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.abs(a).max(initial=0.0)), np.finfo(np.float64).tiny)
    return bool(np.all(np.abs(np.asarray(a) - np.asarray(b)) <= _MATCH_RTOL * scale))


@tvm.transform.module_pass(opt_level=0, name="QMPass")
class QMPass:
    """Apply a qmpass plan to one Relax function (see the module docstring for where it
    belongs in a pipeline).

    * ``QMPass(plan_onnx(model, config))``: the ONNX path's plan with its factor
      tensors; each step's operators are found in the Relax function by
      :func:`match_operators`, so the result computes what
      ``plan.compressed(result.applied)`` computes in onnxruntime.
    * ``QMPass(planned)``: a :class:`~qmpass.plan.planner.Planned` whose steps name the
      operators of :func:`extract_relax` (as :func:`plan_relax` makes them); its prune
      steps need ``groups``, channel groups whose node names are those operators.
    * ``QMPass(keep=F)`` / ``QMPass(delta=D)`` with ``method``/``align``: a data-free
      plan made on the operators extracted from the module (:func:`plan_relax`).

    :meth:`apply` returns a :class:`RelaxResult` (the module, each step's outcome, the
    plan applied). Used as a pass (``QMPass(...)(mod)``, or in a ``Sequential``) it
    returns the module only; ``report`` is then called with each run's result. The pass
    keeps no state of its own between runs.
    """

    def __init__(
        self,
        plan: OnnxPlan | Planned | None = None,
        *,
        keep: float | None = None,
        delta: float | None = None,
        method: Method = "qmfrg",
        align: int = 8,
        function: str = "main",
        params: Mapping[str, Any] | None = None,
        groups: Sequence[ChannelGroup] | None = None,
        report: Callable[[RelaxResult], None] | None = None,
    ) -> None:
        if plan is not None and (keep is not None or delta is not None):
            raise ValueError("give a plan or a budget (keep/delta), not both")
        if groups is not None and not isinstance(plan, Planned):
            raise ValueError("channel groups go with a Planned plan; an OnnxPlan has its own")
        self.plan = plan
        self.groups = {g.name: g for g in (plan.groups if isinstance(plan, OnnxPlan)
                                           else groups or ())}
        self.budget = {"keep": keep, "delta": delta, "method": method, "align": align}
        self.function = function
        self.params = params
        self.report = report

    def transform_module(self, mod: Any, _ctx: Any) -> Any:
        result = self.apply(mod)
        if self.report is not None:
            self.report(result)
        return result.module

    def apply(self, mod: Any) -> RelaxResult:
        """The plan applied to ``mod[function]`` (``mod`` is not modified)."""
        extraction = extract_relax(mod, self.function, self.params)
        if isinstance(self.plan, Planned):
            planned = self.plan
            sites = {site.operator.name: site for site in extraction.sites}
            ops = {site.operator.name: site.operator for site in extraction.sites}
        elif self.plan is not None:
            planned = self.plan.planned
            sites = match_operators(self.plan.extraction.operators, extraction.sites)
            ops = {op.name: op for op in self.plan.extraction.operators}
        else:
            planned = plan_relax(extraction, **self.budget)  # type: ignore[arg-type]
            sites = {site.operator.name: site for site in extraction.sites}
            ops = {site.operator.name: site.operator for site in extraction.sites}
        replacements: list[_Replacement] = []
        outcomes: list[RelaxOutcome] = []
        used: set[Any] = set()  # sites of low-rank and shared-basis steps
        edits: dict[Any, SiteEdit] = {}  # sites of prune steps, with their edits so far
        reshapes: dict[Any, Any] = {}
        flow: Dataflow | None = None
        for index, (step, tensors) in enumerate(
                zip(planned.plan.steps, planned.tensors, strict=True)):
            if step.kind == "prune_channels":
                group = self.groups.get(str(step.group))
                if group is None:
                    outcomes.append(RelaxOutcome(index, step, "declined", _no_group(step)))
                    continue
                flow = flow or Dataflow(mod[self.function], extraction.sites)
                pruned = prune_step(step, index, tensors, group, ops, sites, flow, edits)
                if not isinstance(pruned, str) and any(s.call in used for s in pruned.sites):
                    pruned = "a site of this step was rewritten by an earlier step"
                if isinstance(pruned, str):
                    outcomes.append(RelaxOutcome(index, step, "declined", pruned))
                    continue
                edits.update(pruned.edits)
                reshapes.update(pruned.reshapes)
                outcomes.append(RelaxOutcome(index, step, "applied", None,
                                             tuple(s.operator.name for s in pruned.sites)))
                continue
            found = _replacement(step, tensors, ops, sites)
            if isinstance(found, _Replacement) and any(
                    s.call in used or s.call in edits for s in found.sites):
                found = "a site of this step was rewritten by an earlier step"
            if isinstance(found, str):
                outcomes.append(RelaxOutcome(index, step, "declined", found))
                continue
            used.update(s.call for s in found.sites)
            replacements.append(found)
            outcomes.append(RelaxOutcome(index, step, "applied", None,
                                         tuple(s.operator.name for s in found.sites)))
        replacements += [_Replacement((e.site,), _emitter(e)) for e in edits.values()]
        module = mod
        if replacements:
            gvar = mod.get_global_var(self.function)
            rewriter = _Rewriter(mod, replacements, reshapes)
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(mod[self.function]))
            module = rewriter.builder_.get()
        return RelaxResult(module, tuple(outcomes), planned, extraction)


# -- replacements -------------------------------------------------------------------------------
Emit = Callable[[Any, Any], list[Any]]


@dataclass(frozen=True, eq=False)
class _Replacement:
    """New bindings for some sites: ``emit(builder, x)`` emits them and returns one
    expression per site (in ``sites`` order) to bind to that site's output variable."""

    sites: tuple[Site, ...]
    emit: Emit

    @property
    def trigger(self) -> Any:
        """The earliest call of the sites: every input is defined by then."""
        return min(self.sites, key=lambda site: site.position).call


def _no_group(step: Step) -> str:
    if step.group is None:
        return "the step names no channel group"
    return (f"no channel group '{step.group}': channel pruning needs the groups of the ONNX "
            "model the plan was made on (plan with plan_onnx, or give QMPass(groups=...))")


def _emitter(edit: SiteEdit) -> Emit:
    return lambda bb, x: [edit.emit(bb, x)]


def _replacement(
    step: Step, tensors: Mapping[str, np.ndarray], ops: Mapping[str, Operator],
    sites: Mapping[str, Site],
) -> _Replacement | str:
    """The replacement for ``step``, or why the pass declines it (the record's rule on
    the plan's operators, then the Relax sites)."""
    if step.kind == "crosslayer_basis":  # qmpass/rewrite/shared_basis_crosslayer.py
        return ("a cross-layer shared basis is printed by the ONNX rewriter only; the Relax "
                "pass does not print it yet")
    members: list[Site] = []
    for name in step.operators:
        if name not in ops:
            return f"operator '{name}' is not in the plan's extraction"
        site = sites.get(name)
        if site is None:
            return f"operator '{name}' has no matching call in the Relax function"
        members.append(site)
    d_in = members[0].operator.shape[1]
    d_outs = [site.operator.shape[0] for site in members]
    needs_bias = any(site.operator.bias is not None for site in members)
    reason = decline_rank(step.rank, d_in, d_outs) or decline_factors(
        tensors, step.rank, d_in, sum(d_outs), needs_bias=needs_bias)
    if reason is not None:
        return reason
    if step.kind == "lowrank":
        if len(members) != 1:
            return f"a low-rank step names one operator, not {len(members)}"
        site, op = members[0], ops[step.operators[0]]
        record_type = lowrank_record(op)
        reason = record_type.declines(op)
        if reason is not None:
            return reason
        if record_type is FactoredConv:
            conv = FactoredConv.of(step, site.operator, tensors)
            return _Replacement((site,), lambda bb, x: [emit_conv_pair(bb, x, conv, site.dtype)])
        linear = FactoredLinear.of(step, site.operator, tensors)
        return _Replacement((site,), lambda bb, x: [emit_matmul_pair(bb, x, linear, site.dtype)])
    if step.kind != "shared_basis":
        return f"unknown step kind '{step.kind}'"
    reason = SharedBasisSplit.declines([ops[name] for name in step.operators])
    if reason is not None:
        return reason
    if any(not site.input.same_as(members[0].input) for site in members):
        return "the members do not read the same Relax variable"
    if len({site.dtype for site in members}) > 1:
        return "the members store weights in different types"
    shared = SharedBasisSplit.of(step, [site.operator for site in members], tensors)
    return _Replacement(tuple(members),
                        lambda bb, x: emit_split_pair(bb, x, shared, members[0].dtype))


def _const(array: np.ndarray, dtype: str) -> Any:
    return relax.const(np.ascontiguousarray(array).astype(dtype), dtype)


def emit_matmul_pair(bb: Any, x: Any, record: FactoredLinear, dtype: str) -> Any:
    """Print ``record`` as ``(x @ first^T) @ second^T [+ bias]`` (weights in ``dtype``);
    the last call is returned unbound."""
    hidden = bb.emit(relax.op.matmul(x, _const(record.first.T, dtype)))
    product = relax.op.matmul(hidden, _const(record.second.T, dtype))
    if record.bias is None:
        return product
    return relax.op.add(bb.emit(product), _const(record.bias, dtype))


def emit_conv_pair(bb: Any, x: Any, record: FactoredConv, dtype: str) -> Any:
    """Print ``record`` as ``conv2d(x, first)`` with its geometry, ``conv2d(., second)``
    and ``+ bias`` as ``(1, Cout, 1, 1)``; the last call is returned unbound."""
    geometry = record.geometry
    hidden = bb.emit(relax.op.nn.conv2d(
        x, _const(record.first, dtype), strides=list(geometry.strides),
        padding=list(geometry.pads), dilation=list(geometry.dilations), groups=1))
    product = relax.op.nn.conv2d(hidden, _const(record.second, dtype))
    if record.bias is None:
        return product
    return relax.op.add(bb.emit(product), _const(record.bias.reshape(1, -1, 1, 1), dtype))


def emit_split_pair(bb: Any, x: Any, record: SharedBasisSplit, dtype: str) -> list[Any]:
    """Print ``record`` as the fused pair and an ``R.split`` of the last axis; one
    expression per member."""
    fused = bb.emit(emit_matmul_pair(bb, x, record.fused, dtype))
    parts = bb.emit(relax.op.split(fused, indices_or_sections=list(record.split_points),
                                   axis=-1))
    return [relax.TupleGetItem(parts, i) for i in range(len(record.sizes))]


@mutator
class _Rewriter(PyExprMutator):
    """Emits each replacement at its trigger call, binds the new expressions to fresh
    variables of the same kind as the sites' outputs (dataflow or not), remaps the old
    outputs to them, and drops every other binding of the replaced sites. ``reshapes``
    gives some ``reshape`` bindings a new target shape (a pruned classifier head); the
    other bindings are re-emitted with the shapes of their new operands."""

    def __init__(self, mod: Any, replacements: Sequence[_Replacement],
                 reshapes: Mapping[Any, Any]) -> None:
        super().__init__(mod)
        self.triggers = {r.trigger: r for r in replacements}
        self.dropped = {var for r in replacements for s in r.sites for var in s.internal}
        self.reshapes = reshapes

    def visit_var_binding_(self, binding: Any) -> None:
        var = binding.var
        if var in self.reshapes:
            x = self.visit_expr(binding.value.args[0])
            self.set_var_remap(var, self._bind_like(
                relax.op.reshape(x, self.reshapes[var]), var))
            return
        replacement = self.triggers.get(var)
        if replacement is not None:
            x = self.visit_expr(replacement.sites[0].input)
            for site, expr in zip(replacement.sites, replacement.emit(self.builder_, x),
                                  strict=True):
                self.set_var_remap(site.output, self._bind_like(expr, site.output))
            return
        if var in self.dropped:
            return
        super().visit_var_binding_(binding)

    def _bind_like(self, expr: Any, old: Any) -> Any:
        dataflow = self.builder_.current_block_is_dataflow()
        if dataflow and not isinstance(old, relax.DataflowVar):
            return self.builder_.emit_output(expr, name_hint=str(old.name))
        return self.builder_.emit(expr, name_hint=str(old.name))

"""Error-correcting factorisation: refit each low-rank step on the inputs it really gets.

The planner factorises every operator alone (docs/DESIGN.md, "Whitened truncation"):
``W' = second first`` is the best rank-``q`` map for the operator's *original* inputs.
Once the operators before it are compressed, an operator reads a perturbed input
``x'``, and the errors compound through depth. :func:`refit` keeps each step's
``first`` (the basis, or input projection) and refits, in topological order, its
``second`` and ``bias`` on the inputs ``x'`` it receives from the steps already refitted,
with the original operator's output ``y = W x + b`` (before any activation, folded batch
norm included) as the target:

    min over second, bias of  sum over rows  ||y - second (first x') - bias||^2

(the closed-form least-squares update of SVD-LLM's second factor, with bias correction).
With ``z = first x'`` this is ordinary least squares on the augmented rows ``[z, 1]``;
its normal equations are accumulated in float64 over batches of the feeds (around a
shift, the first chunk's mean, for a stable solve), so memory is ``(q + 1)^2`` and
``(q + 1) x d_out`` per step besides one batch of activations, and solved with a
ridge of ``1e-12`` of the mean diagonal (it only picks zero coefficients for the
directions that carry nothing, such as the zero rows of a rank padded past the
numerical rank). Output rows are separate problems, so the shared basis of a cluster is
refitted member by member with one solve; the planner's member weighting ``D`` changes
nothing there.

Not worse on the fitting data, by construction: the plan's factors are one feasible
point of the same problem, so the least-squares optimum cannot lose to them there. The
error of both is evaluated from the accumulated sums, and where rounding made the
solution lose (it does not on the fixtures) the plan's tensors are kept. For an operator
whose input nothing upstream changed, the refit gives back the plan's factors (up to the
subsample the planner's statistics took): the whitened truncation's ``second = U_q`` is
the least-squares coefficient map for its own basis. Held-out data is another matter
with few calibration rows (``bench/sequential.py`` measures it).

Steps are taken in *levels*: a step's level is the largest number of refitted
operators on a path from the graph inputs to its input, so the steps of one level read
inputs that none of them changes and are fitted from one run. Each level costs one pass
over the feeds through the model with the steps refitted so far (and every
``prune_channels`` step, which is kept as planned) and one through the original model
for the targets; so ``2 x levels`` passes in all and one :meth:`Applier.build` per
level. A step the :class:`~qmpass.rewrite.Applier` declines on the model is left as it
is and never applied.

The refitted factors assume the steps upstream of them are applied: a step refitted
after an upstream one and used without it (a rollback) sees the original inputs, where
its refitted factors are no longer the per-layer optimum. Each refitted step's
``predicted_error`` is therefore that of the step *alone*, on the original inputs (the
planner's meaning: the summed relative output error of its members), and its
certificate is recomputed from the new factors (``op_norm = ||W - second first||_op``,
``bias_change = ||b' - b||``, the same ``radius``), so it stays a sound bound for the
step alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
import scipy.linalg

from qmpass.extract import Extraction, Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.plan import Step
from qmpass.plan.planner import Planned
from qmpass.plan.units.lowrank import certificate
from qmpass.rewrite import Applier
from qmpass.verify.runner import DEFAULT_BATCH, feed_batches, session_with_tensors
from qmpass.verify.stats import StatsRequest, request_rows

__all__ = ["Refitted", "StepFit", "refit", "refit_steps"]

#: ridge on the coefficients' normal equations, relative to their mean diagonal
RIDGE = 1e-12
_REFITTED = ("lowrank", "shared_basis")


@dataclass(frozen=True)
class StepFit:
    """What the refit did to one step (``index`` into ``plan.steps``).

    Errors are summed over the step's members, each relative to the variance of its
    original output on the fitting feeds (``sum ||y - y'||^2 / sum ||y - mean y||^2``),
    as the planner's ``predicted_error``. ``error_before``/``error_after``: with the
    plan's and the refitted tensors, on the inputs the operator receives with the steps
    before it refitted (what the refit minimises); ``alone_before``/``alone_after``: on
    the original inputs (the step alone). ``refitted`` is False where the plan's tensors
    were kept (the solve did not improve on them). ``rows``: the vectors fitted on.
    """

    index: int
    operators: tuple[str, ...]
    level: int
    rows: int
    error_before: float
    error_after: float
    alone_before: float
    alone_after: float
    refitted: bool


@dataclass(frozen=True)
class Refitted:
    """The plan with refitted tensors, and per refitted step what the refit did."""

    planned: Planned
    fits: tuple[StepFit, ...]


def refit(
    model: onnx.ModelProto,
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    planned: Planned,
    feeds: Mapping[str, np.ndarray],
    *,
    batch: int = DEFAULT_BATCH,
) -> Planned:
    """``planned`` with the ``second`` and ``bias`` of every ``lowrank`` and
    ``shared_basis`` step refitted sequentially on ``feeds`` (see the module docstring);
    the same steps (``predicted_error`` and ``certificate`` of the refitted ones
    recomputed), ``prune_channels`` steps and units unchanged.

    ``model`` is the model the plan was made for, named by
    :func:`~qmpass.rewrite.base.name_nodes`; ``extraction`` and ``groups`` are its
    operators and channel groups, as for :class:`~qmpass.rewrite.Applier`. Costs
    ``2 x levels`` passes over ``feeds`` (``batch`` samples per onnxruntime call).

    Each refitted step assumes the steps upstream of it applied as planned; the units'
    milder variants (``PlannedUnit.fallbacks``) are the planner's, not refitted."""
    return refit_steps(model, extraction, groups, planned, feeds, batch=batch).planned


def refit_steps(
    model: onnx.ModelProto,
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    planned: Planned,
    feeds: Mapping[str, np.ndarray],
    *,
    batch: int = DEFAULT_BATCH,
) -> Refitted:
    """:func:`refit`, with what it did to each step (:class:`StepFit`)."""
    ops = {op.name: op for op in extraction.operators}
    steps = list(planned.plan.steps)
    tensors = [dict(t) for t in planned.tensors]
    applier = Applier(model, extraction, groups)
    _, declined = applier.build(list(zip(steps, tensors, strict=True)))
    todo = [i for i, s in enumerate(steps) if s.kind in _REFITTED and i not in declined]
    fixed = [i for i, s in enumerate(steps) if s.kind not in _REFITTED and i not in declined]
    levels = _levels(model, [[ops[n] for n in steps[i].operators] for i in todo])

    if not todo:
        return Refitted(planned, ())

    inputs = set(feeds)
    original = session_with_tensors(model, sorted(
        ({ops[n].input for i in todo for n in steps[i].operators} - inputs)
        | {ops[n].output for i in todo for n in steps[i].operators}
    ))
    done: list[int] = []
    fits: list[StepFit] = []
    for level in sorted(set(levels)):
        here = [i for i, lv in zip(todo, levels, strict=True) if lv == level]
        members = {i: [ops[n] for n in steps[i].operators] for i in here}
        reads = sorted({members[i][0].input for i in here})
        applied = sorted(fixed + done)
        current = None  # nothing applied yet: the inputs are the original ones
        if applied:
            built, refused = applier.build([(steps[i], tensors[i]) for i in applied])
            if refused:  # a step that applied with all the others refuses with fewer
                raise RuntimeError(f"steps {sorted(refused)} declined during the refit")
            current = session_with_tensors(built, sorted(set(reads) - inputs))
        fitting = {i: _Normal() for i in here}
        alone = {i: _Normal() for i in here}
        outputs = [op.output for i in here for op in members[i]]
        for before, after in _paired(original, current, feeds, batch, reads, outputs):
            for i in here:
                first = np.asarray(tensors[i]["first"], dtype=np.float64)
                target = np.concatenate([_output_rows(before[op.output], op)
                                         for op in members[i]], axis=1)
                fitting[i].add_all(_projected(after, members[i][0], first), target)
                alone[i].add_all(_projected(before, members[i][0], first), target)
        for i in here:
            steps[i], tensors[i], fit = _refit_step(i, steps[i], tensors[i], members[i],
                                                    level, fitting[i], alone[i])
            fits.append(fit)
            done.append(i)
    plan = replace(planned.plan, steps=tuple(steps))
    return Refitted(Planned(plan, tuple(tensors), planned.units),
                    tuple(sorted(fits, key=lambda f: f.index)))


def _refit_step(
    index: int, step: Step, arrays: Mapping[str, np.ndarray], members: Sequence[Operator],
    level: int, fitting: _Normal, alone: _Normal,
) -> tuple[Step, dict[str, np.ndarray], StepFit]:
    """The refitted step and tensors (or the plan's, where the solve does not improve)
    and what the refit did."""
    first = np.asarray(arrays["first"], dtype=np.float64)
    old_second = np.asarray(arrays["second"], dtype=np.float64)
    original = np.concatenate([np.zeros(op.shape[0]) if op.bias is None else
                               np.asarray(op.bias, dtype=np.float64) for op in members])
    old_bias = np.asarray(arrays["bias"], dtype=np.float64) if "bias" in arrays else original
    sizes = [op.shape[0] for op in members]
    second, bias = fitting.solve()
    before = fitting.relative(old_second, old_bias, sizes)
    after = fitting.relative(second, bias, sizes)
    improved = float(after.sum()) <= float(before.sum())
    alone_before = alone.relative(old_second, old_bias, sizes)
    alone_after = alone.relative(second, bias, sizes)
    fit = StepFit(index, step.operators, level, fitting.count, float(before.sum()),
                  float(after.sum() if improved else before.sum()), float(alone_before.sum()),
                  float(alone_after.sum() if improved else alone_before.sum()), improved)
    if not improved:
        return step, dict(arrays), fit
    weight = np.vstack([np.asarray(op.weight, dtype=np.float64) for op in members])
    new = {**arrays, "second": second, "bias": bias}
    cert = certificate(weight - second @ first, bias - original, step.certificate.get("radius"))
    return replace(step, predicted_error=float(alone_after.sum()), certificate=cert), new, fit


class _Normal:
    """Normal equations of ``y ~ second z + bias`` accumulated over rows, around a shift
    (the first chunk's means): ``G = A^T A``, ``H = A^T dy`` with ``A = [dz, 1]``, and
    per output column ``sum dy^2`` and ``sum dy``."""

    def __init__(self) -> None:
        self.count = 0
        self._z0 = np.zeros(0)
        self._y0 = np.zeros(0)
        self._gram = np.zeros((0, 0))
        self._cross = np.zeros((0, 0))
        self._yy = np.zeros(0)
        self._ysum = np.zeros(0)

    def add_all(self, z_chunks: Iterator[np.ndarray], y: np.ndarray) -> None:
        """Rows ``z`` (in chunks, in order) with their targets, the rows of ``y``."""
        start = 0
        for z in z_chunks:
            self.add(z, y[start:start + z.shape[0]])
            start += z.shape[0]
        if start != y.shape[0]:
            raise RuntimeError(f"{start} input vectors for {y.shape[0]} output vectors")

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        if not z.shape[0]:
            return
        y = np.asarray(y, dtype=np.float64)
        if not self.count:
            self._z0, self._y0 = z.mean(axis=0), y.mean(axis=0)
            q, d = z.shape[1], y.shape[1]
            self._gram = np.zeros((q + 1, q + 1))
            self._cross = np.zeros((q + 1, d))
            self._yy = np.zeros(d)
            self._ysum = np.zeros(d)
        rows = np.hstack([z - self._z0, np.ones((z.shape[0], 1))])
        dy = y - self._y0
        self._gram += rows.T @ rows
        self._cross += rows.T @ dy
        self._yy += np.einsum("ij,ij->j", dy, dy)
        self._ysum += dy.sum(axis=0)
        self.count += z.shape[0]

    def solve(self) -> tuple[np.ndarray, np.ndarray]:
        """The least-squares ``second`` (``d_out x q``) and ``bias`` (``d_out``)."""
        if not self.count:
            raise RuntimeError("no rows to fit")
        q = self._gram.shape[0] - 1
        gram = self._gram.copy()
        scale = float(np.trace(gram[:q, :q])) / max(q, 1)
        gram[np.arange(q), np.arange(q)] += RIDGE * max(scale, np.finfo(float).tiny)
        theta = scipy.linalg.lstsq(gram, self._cross, lapack_driver="gelsd")[0]
        second = theta[:q].T
        return second, theta[q] + self._y0 - second @ self._z0

    def _theta(self, second: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``second`` and ``bias`` in the shifted coordinates of the sums."""
        return np.vstack([second.T, bias - self._y0 + second @ self._z0])

    def column_errors(self, second: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``sum ||y - second z - bias||^2`` per output column (clipped at 0)."""
        theta = self._theta(second, bias)
        errors = (self._yy - 2 * np.einsum("ij,ij->j", theta, self._cross)
                  + np.einsum("ij,ij->j", theta, self._gram @ theta))
        return np.clip(errors, 0.0, None)

    def variance(self) -> np.ndarray:
        """``sum (y - mean y)^2`` per output column."""
        return np.clip(self._yy - self._ysum ** 2 / self.count, 0.0, None)

    def relative(self, second: np.ndarray, bias: np.ndarray, sizes: Sequence[int]
                 ) -> np.ndarray:
        """Each member's error relative to its output's variance."""
        errors = self.column_errors(second, bias)
        var = self.variance()
        bounds = np.cumsum((0, *sizes))
        with np.errstate(over="ignore"):  # outputs near float64's range: an infinite error
            return np.array([
                errors[lo:hi].sum() / max(float(var[lo:hi].sum()), np.finfo(float).tiny)
                for lo, hi in itertools.pairwise(bounds)
            ])


def _request(op: Operator) -> StatsRequest:
    if op.op_type == "Conv":
        return StatsRequest(op.input, "patches", geometry=op.geometry)
    return StatsRequest(op.input, "vectors", -1)


def _projected(values: Mapping[str, np.ndarray], op: Operator, first: np.ndarray
               ) -> Iterator[np.ndarray]:
    """``first x`` of the vectors ``op`` multiplies, in chunks (rows in output order)."""
    for rows in request_rows(values[op.input], _request(op)):
        yield np.asarray(rows, dtype=np.float64) @ first.T


def _output_rows(value: np.ndarray, op: Operator) -> np.ndarray:
    """The output vectors of ``op``, one row per input vector (a Conv's channels last)."""
    array = np.asarray(value)
    if op.op_type == "Conv":
        array = np.moveaxis(array, 1, -1)
    return array.reshape(-1, op.shape[0])


def _paired(
    original: ort.InferenceSession,
    current: ort.InferenceSession | None,
    feeds: Mapping[str, np.ndarray],
    batch: int,
    inputs: Sequence[str], outputs: Sequence[str],
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per batch of ``feeds``: the original model's ``inputs`` and ``outputs``, and the
    ``inputs`` in ``current`` (the original's when ``current`` is None)."""
    wanted_original = sorted({*inputs, *outputs} - set(feeds))
    wanted_current = sorted(set(inputs) - set(feeds))
    for chunk in feed_batches(original, feeds, batch):
        before = dict(zip(wanted_original, original.run(wanted_original, chunk), strict=True))
        before.update(chunk)
        if current is None:
            yield before, before
            continue
        after = dict(zip(wanted_current, current.run(wanted_current, chunk), strict=True)) \
            if wanted_current else {}
        after.update(chunk)
        yield before, after


def _levels(model: onnx.ModelProto, steps: Sequence[Sequence[Operator]]) -> list[int]:
    """Each step's level: the most refitted operators on a path from the graph inputs
    to its input (ONNX lists nodes in topological order). A node with a subgraph may
    read any outer tensor, so it takes the deepest level seen before it."""
    refitted = {op.name for members in steps for op in members}
    depth: dict[str, int] = {}
    deepest = 0
    for node in model.graph.node:
        level = max((depth.get(name, 0) for name in node.input if name), default=0)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            level = max(level, deepest)
        level += node.name in refitted
        deepest = max(deepest, level)
        for name in node.output:
            if name:
                depth[name] = level
    return [depth.get(members[0].input, 0) for members in steps]

"""Units of compression and their variants: what the planner chooses between.

A :class:`Candidate` is one unit (an operator, a cluster of operators reading one
tensor, a channel group) with its :class:`Variant` list: ``variants[0]`` leaves the unit
unchanged; each other variant costs fewer parameters, adds a predicted error and knows
how to build the plan steps (and their new weights) that realise it.

* low-rank operator: one variant per rank ``q`` (a multiple of ``align``) that saves
  parameters and FLOPs; error = relative tail energy (:mod:`qmpass.plan.factors`).
* cluster (operators reading one tensor): the fused shared-basis variants *and* the
  members factorised separately (the members' own Lagrangian path); the allocation picks
  whichever loses less for its cost, so a shared basis is used where it pays.
* channel group: one variant per kept channel count. ``qmfrg`` orders channels by greedy
  forward selection and compensates the consumers by least squares; ``magnitude`` and
  ``random`` order them by L1 norm or at random and do not compensate.

Errors are relative (energy lost over energy seen), summed over members, so units of
different sizes are compared on one scale: the objective of the paper's eq. (8).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.budget import Option, Unit, lower_hull
from qmpass.plan.factors import compensation, greedy_channel_order, projection
from qmpass.plan.plan import Cost, Step, StepKind
from qmpass.plan.resource import PARAMS, Resource, Scale, lowrank_cost
from qmpass.spectral import operator_norm

__all__ = [
    "Built",
    "Candidate",
    "StatsKey",
    "StatsLike",
    "Variant",
    "channel_candidate",
    "cluster_candidate",
    "input_key",
    "lowrank_candidate",
    "lowrank_declines",
    "pruned_costs",
    "pruned_resource",
    "pruned_scales",
]

#: the steps (with their new weights) that realise a variant
Built = list[tuple[Step, dict[str, np.ndarray]]]


class StatsLike(Protocol):
    """What the planner reads of calibration statistics (``qmpass.verify.TensorStats``)."""

    @property
    def mean(self) -> np.ndarray: ...
    @property
    def cov(self) -> np.ndarray: ...
    @property
    def max_norm(self) -> float: ...


@dataclass(frozen=True)
class StatsKey:
    """Which statistics a unit reads: vectors of ``tensor`` along ``axis``, or the
    receptive fields (``patches``) of the Conv ``operator``."""

    tensor: str
    kind: Literal["vectors", "patches"]
    axis: int = -1
    operator: str | None = None

    @property
    def key(self) -> str:
        if self.kind == "patches":
            return f"patches:{self.operator}"
        return f"vectors:{self.axis}:{self.tensor}"


def input_key(op: Operator) -> StatsKey:
    """The statistics of what ``op`` multiplies its weight with."""
    if op.op_type == "Conv":
        return StatsKey(op.input, "patches", operator=op.name)
    return StatsKey(op.input, "vectors", -1)


@dataclass(frozen=True)
class Variant:
    """One way to compress a unit. ``cost`` is the unit's cost after it in the plan's
    :class:`~qmpass.plan.resource.Resource` (weight parameters, or a target's cycles;
    for channel groups an estimate that ignores other groups, corrected by the
    planner); ``error`` the summed relative error; ``worst`` the largest member's;
    ``label`` the rank or kept channel count (-1 for a mix of ranks)."""

    cost: float
    error: float
    worst: float
    label: int
    build: Callable[[], Built]


@dataclass(frozen=True)
class Candidate:
    """One unit of compression: its operators, its variants (``[0]`` unchanged) and,
    for a channel group, the group."""

    key: str
    operators: tuple[str, ...]
    variants: tuple[Variant, ...]
    group: ChannelGroup | None = None

    @property
    def unit(self) -> Unit:
        return Unit(
            self.key, tuple(Option(i, v.cost, v.error) for i, v in enumerate(self.variants))
        )

    def milder(self, index: int) -> list[int]:
        """Variants on the unit's lower hull that cost more than ``index`` (keep more),
        cheapest first: what to fall back to when ``index`` breaks the tolerance."""
        chosen = self.variants[index].cost
        hull = lower_hull(self.unit.options)
        return [o.value for o in reversed(hull) if o.cost > chosen and o.value != 0]


def _unchanged(cost: float) -> Variant:
    return Variant(cost, 0.0, 0.0, -1, list)


# -- low rank ---------------------------------------------------------------------------------
def lowrank_declines(op: Operator) -> str | None:
    """Why the planner does not factorise ``op`` (the rewrites check again)."""
    if op.graph != "main":
        return "operator inside a subgraph is left untouched"
    if op.op_type in ("MatMul", "Gemm"):
        if op.weight_side != "right":
            return "weight on the left side is not factorised"
        return "Gemm with transA=1 is not rewritten" if op.transposed_input else None
    if op.op_type != "Conv":
        return f"{op.op_type} is not factorised"
    if op.geometry is None or op.geometry.groups != 1:
        groups = None if op.geometry is None else op.geometry.groups
        return f"grouped conv (groups={groups}) is not factorised"
    return None


def _certificate(delta_w: np.ndarray, delta_b: np.ndarray, radius: float | None
                 ) -> dict[str, float]:
    """Terms of the sound bound ``R ||W - W'||_op + ||b - b'||`` on one output vector
    (``R``: the largest input norm seen in calibration, when there was calibration)."""
    cert = {"op_norm": operator_norm(delta_w), "bias_change": float(np.linalg.norm(delta_b))}
    if radius is not None:
        cert["radius"] = float(radius)
        cert["bound"] = cert["radius"] * cert["op_norm"] + cert["bias_change"]
    return cert


def _biases(ops: Sequence[Operator]) -> np.ndarray:
    return np.concatenate(
        [np.zeros(op.shape[0]) if op.bias is None else np.asarray(op.bias) for op in ops]
    )


def lowrank_candidate(
    members: Sequence[Operator], stats: StatsLike | None, align: int, *, fused: bool,
    resource: Resource = PARAMS,
) -> Candidate | None:
    """Low-rank variants of one operator (``fused=False``, one member) or of a shared
    basis for operators that read one tensor (``fused=True``). None if no rank saves
    parameters and FLOPs (ranks that save them but cost more of ``resource`` stay: the
    allocation never picks them)."""
    proj = projection([op.weight for op in members], None if stats is None else stats.cov)
    before = Cost.of(members)
    full = min(members[0].shape[1], sum(op.shape[0] for op in members))
    names = tuple(op.name for op in members)
    kind: StepKind = "shared_basis" if fused else "lowrank"

    def build(rank: int) -> Built:
        first, second = proj.factors(rank)
        approx = second @ first
        original = _biases(members)
        bias = original.copy()
        tensors = {"first": first, "second": second}
        if stats is not None:
            bias += (proj.weight - approx) @ stats.mean  # the mean of what was cut
        if stats is not None or any(op.bias is not None for op in members):
            tensors["bias"] = bias
        step = Step(
            kind=kind,
            operators=names,
            before=before,
            after=lowrank_cost(members, rank),
            predicted_error=proj.tail(rank),
            rank=rank,
            certificate=_certificate(
                proj.weight - approx, bias - original, None if stats is None else stats.max_norm
            ),
            data_aware=stats is not None,
        )
        return [(step, tensors)]

    variants = [_unchanged(resource.operators(members))]
    for rank in range(align, full, align):
        cost = lowrank_cost(members, rank)
        if cost.params >= before.params or cost.flops >= before.flops:
            break
        variants.append(
            Variant(
                resource.factorised(members, rank),
                proj.tail(rank),
                float(proj.member_errors(rank).max()),
                rank,
                lambda rank=rank: build(rank),  # type: ignore[misc]
            )
        )
        if rank >= proj.rank:
            break  # lossless from here on: higher ranks only cost more
    if len(variants) == 1:
        return None
    return Candidate(f"{kind}:{names[0]}", names, tuple(variants))


def cluster_candidate(fused: Candidate | None, separate: Sequence[Candidate]) -> Candidate | None:
    """One unit for operators reading one tensor: the shared-basis variants plus the
    members factorised separately, walked along the members' own Lagrangian path (each
    step the cheapest error per saved parameter, as in :mod:`qmpass.plan.budget`)."""
    if not separate:
        return fused
    before = sum(c.variants[0].cost for c in separate)
    variants = list(fused.variants) if fused is not None else [_unchanged(before)]
    hulls = [[o.value for o in lower_hull(c.unit.options)] for c in separate]
    at = [0] * len(separate)
    heap = [(_slope(c, h, 0), i) for i, (c, h) in enumerate(zip(separate, hulls, strict=True))
            if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        at[i] += 1
        if at[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, (_slope(separate[i], hulls[i], at[i]), i))
        picks = [c.variants[h[a]] for c, h, a in zip(separate, hulls, at, strict=True)]
        variants.append(
            Variant(
                sum(v.cost for v in picks),
                sum(v.error for v in picks),
                max(v.worst for v in picks),
                -1,
                lambda picks=picks: [s for v in picks for s in v.build()],  # type: ignore[misc]
            )
        )
    names = tuple(n for c in separate for n in c.operators)
    return Candidate(f"cluster:{names[0]}", names, tuple(variants))


def _slope(candidate: Candidate, hull: Sequence[int], at: int) -> float:
    a, b = candidate.variants[hull[at]], candidate.variants[hull[at + 1]]
    saved = a.cost - b.cost
    return (b.error - a.error) / saved if saved > 0 else math.inf


# -- channel groups ---------------------------------------------------------------------------
class _GroupView:
    """A channel group's weights seen from the channel axis."""

    def __init__(self, group: ChannelGroup, values: Mapping[str, np.ndarray]) -> None:
        self.group = group
        self.values = values

    def consumer_weight(self, index: int) -> np.ndarray:
        """Consumer ``index``'s weight, outputs first and the group's channels last (a
        Conv's is ``O x kh x kw x C``): ``weight @ v`` applies a channel-space map."""
        consumer = self.group.consumers[index]
        weight = np.moveaxis(self.values[consumer.weight].astype(np.float64), consumer.axis, -1)
        return weight[..., consumer.offset: consumer.offset + self.group.channels]

    def producer_rows(self) -> list[np.ndarray]:
        """Each producer's weight as one row per output channel of the group."""
        rows = []
        for producer in self.group.producers:
            weight = np.moveaxis(self.values[producer.tensor].astype(np.float64),
                                 producer.axis, 0)
            rows.append(weight.reshape(weight.shape[0], -1)[
                producer.offset: producer.offset + self.group.channels])
        return rows

    def params_per_channel(self) -> int:
        total = 0
        for sliced in (*self.group.producers, *self.group.sliced):
            shape = self.values[sliced.tensor].shape
            total += math.prod(shape) // shape[sliced.axis]
        for consumer in self.group.consumers:
            shape = self.values[consumer.weight].shape
            total += math.prod(shape) // shape[consumer.axis]
        return total


def channel_candidate(
    group: ChannelGroup,
    ops: Mapping[str, Operator],
    values: Mapping[str, np.ndarray],
    stats: Sequence[StatsLike | None],
    method: str,
    align: int,
    seed: int,
    resource: Resource = PARAMS,
) -> Candidate | None:
    """Pruning variants of a channel group. ``stats[i]`` are the channel statistics of
    consumer ``i``'s activation (None: data-free; ``qmfrg`` then uses the covariance the
    producers give white inputs, a rough stand-in that ranks channels by what feeds
    them, and compensates without a mean shift)."""
    view = _GroupView(group, values)
    channels = group.channels
    before = Cost.of([ops[name] for name in group.operators if name in ops])
    proxy = None
    moments: list[tuple[np.ndarray, np.ndarray]] = []  # per consumer: covariance, mean
    pairs: list[tuple[np.ndarray, np.ndarray]] = []  # per consumer: W^T W, covariance
    for index, consumer in enumerate(group.consumers):
        seen = stats[index]
        lo, hi = consumer.offset, consumer.offset + channels
        if seen is not None:
            cov, mean = seen.cov[lo:hi, lo:hi], seen.mean[lo:hi]
        else:
            if proxy is None:
                proxy = sum(r @ r.T for r in view.producer_rows())
            cov, mean = proxy, np.zeros(channels)
        rows = view.consumer_weight(index).reshape(-1, channels)
        moments.append((cov, mean))
        pairs.append((rows.T @ rows, cov))

    compensated = method == "qmfrg"
    if compensated:
        order, errors = greedy_channel_order(pairs)
    else:
        if method == "magnitude":
            norms = sum(np.abs(r).sum(axis=1) for r in view.producer_rows())
            order = list(np.argsort(-np.asarray(norms), kind="stable"))
        else:
            rng = np.random.default_rng([seed, *group.name.encode()[:16]])
            order = [int(c) for c in rng.permutation(channels)]
        errors = _plain_errors(order, [(a, c + np.outer(m, m)) for (a, c), (_, m)
                                       in zip(pairs, moments, strict=True)])

    def build(count: int) -> Built:
        kept = tuple(sorted(int(c) for c in order[:count]))
        select = np.zeros((count, channels))
        select[np.arange(count), list(kept)] = 1.0
        tensors: dict[str, np.ndarray] = {}
        op_norm = shift_norm = radius = bound = 0.0
        for index, consumer in enumerate(group.consumers):
            cov, mean = moments[index]
            if compensated:
                mix, shift = compensation(kept, cov, mean)
                tensors[f"mix:{consumer.node}"] = mix
                tensors[f"shift:{consumer.node}"] = shift
            else:
                mix, shift = select.T, np.zeros(channels)
            weight = view.consumer_weight(index)
            # the consumer's output changes by W (x - mix x_kept - shift): bound both parts
            residual = weight @ (np.eye(channels) - mix @ select)
            consumer_norm = operator_norm(residual.reshape(residual.shape[0], -1))
            bias_shift = (weight @ shift).reshape(weight.shape[0], -1).sum(axis=1)
            consumer_shift = float(np.linalg.norm(bias_shift))
            op_norm, shift_norm = max(op_norm, consumer_norm), max(shift_norm, consumer_shift)
            seen = stats[index]
            if seen is not None:
                # a receptive field of `taps` channel vectors, each no longer than the
                # longest one seen, is at most sqrt(taps) times as long
                taps = weight.size // (weight.shape[0] * channels)
                reach = math.sqrt(taps) * seen.max_norm
                radius = max(radius, reach)
                bound = max(bound, reach * consumer_norm + consumer_shift)
        certificate = {"op_norm": op_norm, "bias_change": shift_norm}
        if all(s is not None for s in stats):
            certificate.update(radius=radius, bound=bound)
        step = Step(
            kind="prune_channels",
            operators=group.operators,
            before=before,
            after=_sum_costs(pruned_costs({group: count}, ops), group.operators),
            predicted_error=float(errors[count]),
            group=group.name,
            channels=channels,
            kept=kept,
            certificate=certificate,
            data_aware=any(s is not None for s in stats),
        )
        return [(step, tensors)]

    per_channel = max(1, view.params_per_channel())

    def cost(kept: int) -> float:  # parameters are linear in the kept channels
        if resource is PARAMS:
            return float(before.params - (channels - kept) * per_channel)
        return pruned_resource(resource, {group: kept}, ops, group.operators)

    variants = [_unchanged(cost(channels))] + [
        Variant(
            cost(k),
            float(errors[k]),
            float(errors[k]),
            k,
            lambda k=k: build(k),  # type: ignore[misc]
        )
        for k in range(channels - 1, 0, -1)
        if k % align == 0
    ]
    if len(variants) == 1:
        return None
    return Candidate(f"prune:{group.name}", group.operators, tuple(variants), group)


def pruned_scales(kept: Mapping[ChannelGroup, int], ops: Mapping[str, Operator]
                  ) -> dict[str, Scale]:
    """How every operator of the groups shrinks when group ``g`` keeps ``kept[g]``
    channels: the kept fraction of its output and input channels (a depthwise conv keeps
    its channels on both sides, counted as its output)."""
    out_frac: dict[str, float] = {}
    in_frac: dict[str, float] = {}
    depthwise: set[str] = set()
    for group, count in kept.items():
        frac = count / group.channels
        for producer in group.producers:
            out_frac[producer.node] = out_frac.get(producer.node, 1.0) * frac
        for sliced in group.sliced:
            op = ops.get(sliced.node)
            if op is not None and op.geometry is not None and op.geometry.groups > 1:
                depthwise.add(op.name)
                out_frac[op.name] = frac
        for consumer in group.consumers:
            removed = (group.channels - count) / max(1, consumer.width)
            in_frac[consumer.node] = in_frac.get(consumer.node, 1.0) - removed
    return {
        name: Scale(out_frac.get(name, 1.0), in_frac.get(name, 1.0), name in depthwise)
        for group in kept for name in group.operators if name in ops
    }


def pruned_costs(kept: Mapping[ChannelGroup, int], ops: Mapping[str, Operator]
                  ) -> dict[str, Cost]:
    """Parameters and FLOPs of every operator of the groups when group ``g`` keeps
    ``kept[g]`` channels: weights scale with the kept fraction of their input and output
    channels, biases and folded BatchNorm with the output's, a depthwise conv with its
    channels."""
    return {
        name: Cost(round(PARAMS.scaled(ops[name], scale)), round(ops[name].flops * scale.weight))
        for name, scale in pruned_scales(kept, ops).items()
    }


def pruned_resource(resource: Resource, kept: Mapping[ChannelGroup, int],
                    ops: Mapping[str, Operator], names: Sequence[str] | None = None) -> float:
    """``resource`` spent by the groups' operators (those in ``names``, or all) when group
    ``g`` keeps ``kept[g]`` channels."""
    return sum(resource.scaled(ops[name], scale)
               for name, scale in pruned_scales(kept, ops).items()
               if names is None or name in names)


def _sum_costs(costs: Mapping[str, Cost], names: Sequence[str]) -> Cost:
    return Cost(sum(costs[n].params for n in names if n in costs),
                sum(costs[n].flops for n in names if n in costs))


def _plain_errors(order: Sequence[int], pairs: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> np.ndarray:
    """Relative output error of pruning without compensation, keeping ``order[:k]``:
    the removed channels' share ``tr(A_RR M_RR) / tr(A M)`` (``M = E[x x^T]``)."""
    channels = len(order)
    errors = np.zeros(channels + 1)
    for k in range(channels):
        removed = np.asarray(order[k:], dtype=int)
        errors[k] = sum(
            float(np.trace(a[np.ix_(removed, removed)] @ m[np.ix_(removed, removed)]))
            / max(float(np.trace(a @ m)), 1e-300)
            for a, m in pairs
        )
    return errors

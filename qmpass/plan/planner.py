"""Analysis -> :class:`Plan`: which rewrite where, at which rank or with which channels.

Units of compression, by method:

* ``svd``: every operator alone, truncated SVD (data-free even with calibration data:
  it is the plain baseline).
* ``qmfrg``: channel groups produced by convolutions are pruned, channels chosen by
  greedy forward selection on the consumers' view of the activation covariance and
  compensated by least squares (:mod:`qmpass.plan.factors`); operators that read one
  tensor (Q/K/V, gate/up: extraction's fusion groups) share one low-rank basis; every
  other matmul or convolution gets its own low-rank factorisation. With calibration
  statistics, every decomposition is whitened (data-aware).
* ``magnitude`` / ``random``: the baselines prune every prunable channel group, keeping
  the channels with the largest L1 norm (or random ones), the same fraction in every
  group, without compensation.

``keep`` budgets are allocated by the Lagrangian of :mod:`qmpass.plan.budget` over all
units (``qmfrg``, ``svd``) or by one uniform ratio (the baselines). ``delta`` gives each
unit the cheapest option that keeps at least ``exp(-delta)`` of its energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import scipy.linalg

from qmpass.extract import Extraction, Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.budget import Option, Unit, allocate
from qmpass.plan.factors import compensation, greedy_channel_order, projection, sqrt_psd
from qmpass.plan.plan import Cost, Plan, Step

__all__ = ["Method", "PlanConfig", "StatsLike", "make_plan", "stats_requests"]

Method = Literal["qmfrg", "svd", "magnitude", "random"]
METHODS: tuple[Method, ...] = ("qmfrg", "svd", "magnitude", "random")


class StatsLike(Protocol):
    """What the planner reads of calibration statistics (``qmpass.verify.TensorStats``)."""

    @property
    def mean(self) -> np.ndarray: ...
    @property
    def cov(self) -> np.ndarray: ...
    @property
    def max_norm(self) -> float: ...


@dataclass(frozen=True)
class PlanConfig:
    """``keep``: fraction of the compressible operators' weight parameters to keep;
    ``delta``: relative-entropy bound per unit instead (exactly one of the two)."""

    method: Method = "qmfrg"
    keep: float | None = None
    delta: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.delta is None):
            raise ValueError("give exactly one of keep and delta")


@dataclass(frozen=True)
class StatsKey:
    """Where a unit's statistics come from (see :func:`stats_requests`)."""

    tensor: str
    kind: Literal["vectors", "patches"]
    axis: int = -1
    operator: str | None = None  # for patches: the Conv whose geometry applies

    @property
    def key(self) -> str:
        if self.kind == "patches":
            return f"patches:{self.operator}"
        return f"vectors:{self.axis}:{self.tensor}"


# -- units ------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    """A unit with its options and how to turn a chosen option into a Step."""

    unit: Unit
    operators: tuple[str, ...]
    before: Cost
    build: Callable[[int], tuple[Step, dict[str, np.ndarray]]]
    worst: Callable[[int], float] = field(default=lambda value: 0.0)


def _conv_ok(op: Operator) -> str | None:
    if op.op_type != "Conv":
        return f"{op.op_type} is not factorised"
    if op.geometry is None or op.geometry.groups != 1:
        groups = None if op.geometry is None else op.geometry.groups
        return f"grouped conv (groups={groups}) is not factorised"
    return None


def _lowrank_ok(op: Operator) -> str | None:
    if op.graph != "main":
        return "operator inside a subgraph is left untouched"
    if op.op_type in ("MatMul", "Gemm"):
        return None if op.weight_side == "right" else "weight on the left side is not factorised"
    return _conv_ok(op)


def _weight_params(op: Operator) -> int:
    rows, cols = op.shape
    groups = op.geometry.groups if op.geometry is not None else 1
    return rows * cols // groups


def _lowrank_cost(ops: Sequence[Operator], rank: int) -> Cost:
    d_in = ops[0].shape[1]
    params = flops = 0
    for op in ops:
        d_out = op.shape[0]
        vectors = op.flops / (2 * d_out * d_in) if d_out * d_in else 0
        params += (d_out if op.bias is not None else 0)
        flops += round(2 * rank * d_out * vectors)
    params += rank * (d_in + sum(op.shape[0] for op in ops))
    vectors0 = ops[0].flops / (2 * ops[0].shape[0] * d_in) if d_in else 0
    flops += round(2 * rank * d_in * vectors0)
    return Cost(params, flops)


def _total(ops: Sequence[Operator]) -> Cost:
    return Cost(sum(op.params for op in ops), sum(op.flops for op in ops))


class _Planner:
    def __init__(
        self,
        extraction: Extraction,
        groups: Sequence[ChannelGroup],
        initializers: Mapping[str, np.ndarray],
        stats: Mapping[str, StatsLike] | None,
        config: PlanConfig,
    ) -> None:
        self.ops = {op.name: op for op in extraction.operators}
        self.extraction = extraction
        self.groups = [g for g in groups if g.reason is None]
        self.initializers = initializers
        self.stats = stats
        self.config = config
        self.declined: dict[str, str] = {}

    # -- statistics ---------------------------------------------------------------------------
    def _input_stats(self, op: Operator) -> StatsLike | None:
        if self.stats is None:
            return None
        return self.stats.get(_input_key(op).key)

    # -- low-rank and shared-basis units ------------------------------------------------------
    def lowrank_unit(self, members: Sequence[Operator], data_aware: bool) -> _Candidate | None:
        first = members[0]
        stats = self._input_stats(first) if data_aware else None
        sqrt_cov = None if stats is None else sqrt_psd(stats.cov)
        proj = projection([op.weight for op in members], sqrt_cov)
        before = _total(members)
        d_in = first.shape[1]
        full = min(d_in, sum(op.shape[0] for op in members))
        options = [Option(full, float(before.params), 0.0)]
        for rank in range(1, full):
            cost = _lowrank_cost(members, rank)
            if cost.params >= before.params or cost.flops >= before.flops:
                break
            options.append(Option(rank, float(cost.params), proj.tail(rank)))
        names = tuple(op.name for op in members)
        if len(options) == 1:
            for op in members:
                self.declined[op.name] = (
                    f"no rank of the {op.shape[0]}x{op.shape[1]} matrix saves parameters and "
                    "FLOPs"
                )
            return None
        kind = "shared_basis" if len(members) > 1 else "lowrank"

        def build(rank: int) -> tuple[Step, dict[str, np.ndarray]]:
            first_f, second_f = proj.factors(rank)
            approx = second_f @ first_f
            bias = np.concatenate(
                [op.bias if op.bias is not None else np.zeros(op.shape[0]) for op in members]
            )
            has_bias = any(op.bias is not None for op in members)
            if stats is not None:
                bias = bias + (proj.weight - approx) @ stats.mean
                has_bias = True
            tensors = {"first": first_f, "second": second_f}
            if has_bias:
                tensors["bias"] = bias
            original_bias = np.concatenate(
                [op.bias if op.bias is not None else np.zeros(op.shape[0]) for op in members]
            )
            cert = _certificate(
                proj.weight - approx, bias - original_bias if has_bias else None,
                None if stats is None else stats.max_norm,
            )
            step = Step(
                kind=kind,  # type: ignore[arg-type]
                operators=names,
                before=before,
                after=_lowrank_cost(members, rank),
                predicted_error=proj.tail(rank),
                rank=rank,
                certificate=cert,
                data_aware=stats is not None,
            )
            return step, tensors

        return _Candidate(
            Unit(kind + ":" + names[0], tuple(options)),
            names,
            before,
            build,
            worst=lambda rank: float(proj.member_errors(rank).max()),
        )

    # -- channel groups ----------------------------------------------------------------------
    def _consumer_matrix(self, group: ChannelGroup, index: int) -> np.ndarray:
        """The consumer's weight as rows over the group's channels (taps as extra rows)."""
        weight = self._consumer_weight(group, index)
        return weight.reshape(-1, group.channels)

    def _channel_stats(self, group: ChannelGroup, index: int) -> StatsLike | None:
        if self.stats is None:
            return None
        consumer = group.consumers[index]
        key = StatsKey(consumer.activation, "vectors", group.channel_axis).key
        return self.stats.get(key)

    def _proxy_cov(self, group: ChannelGroup) -> np.ndarray:
        """Without data: the covariance the producers give white inputs (before the
        activation), a rough stand-in that at least ranks channels by what feeds them."""
        cov = np.zeros((group.channels, group.channels))
        for producer in group.producers:
            weight = np.moveaxis(self.initializers[producer.tensor].astype(np.float64),
                                 producer.axis, 0)
            rows = weight.reshape(weight.shape[0], -1)[producer.offset:
                                                        producer.offset + group.channels]
            cov += rows @ rows.T
        return cov

    def prune_unit(self, group: ChannelGroup) -> _Candidate:
        method = self.config.method
        channels = group.channels
        before_ops = [self.ops[name] for name in group.operators if name in self.ops]
        before = _total(before_ops)
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        consumer_stats: list[tuple[np.ndarray, np.ndarray]] = []
        proxy = None
        for index in range(len(group.consumers)):
            matrix = self._consumer_matrix(group, index)
            stats = self._channel_stats(group, index)
            offset = group.consumers[index].offset
            if stats is not None:
                cov = stats.cov[offset: offset + channels, offset: offset + channels]
                mean = stats.mean[offset: offset + channels]
            else:
                proxy = self._proxy_cov(group) if proxy is None else proxy
                cov, mean = proxy, np.zeros(channels)
            pairs.append((matrix.T @ matrix, cov))
            consumer_stats.append((cov, mean))
        if method == "qmfrg":
            order, errors = greedy_channel_order(pairs)
        else:
            if method == "magnitude":
                order = list(np.argsort(-self._l1_norms(group), kind="stable"))
            else:
                rng = np.random.default_rng([self.config.seed, _stable_hash(group.name)])
                order = list(rng.permutation(channels))
            errors = _prune_errors(order, pairs)
        per_channel = max(1, self._params_per_channel(group))
        options = [Option(channels, float(before.params), 0.0)] + [
            Option(k, float(before.params - (channels - k) * per_channel), float(errors[k]))
            for k in range(channels - 1, 0, -1)
        ]

        def build(count: int) -> tuple[Step, dict[str, np.ndarray]]:
            kept = tuple(sorted(int(c) for c in order[:count]))
            tensors: dict[str, np.ndarray] = {}
            op_norm = shift_norm = 0.0
            for index, consumer in enumerate(group.consumers):
                cov, mean = consumer_stats[index]
                if method == "qmfrg":
                    mix, shift = compensation(kept, cov, mean)
                    if self.stats is None:
                        shift = np.zeros(channels)
                    tensors[f"mix:{consumer.node}"] = mix
                    tensors[f"shift:{consumer.node}"] = shift
                else:
                    mix = np.zeros((channels, len(kept)))
                    mix[list(kept), np.arange(len(kept))] = 1.0
                    shift = np.zeros(channels)
                select = np.zeros((len(kept), channels))
                select[np.arange(len(kept)), list(kept)] = 1.0
                residual = np.eye(channels) - mix @ select  # x -> x - x_hat
                weight = self._consumer_weight(group, index)
                op_norm = max(op_norm, _op_norm((weight @ residual).reshape(weight.shape[0], -1)))
                bias_shift = (weight @ shift).reshape(weight.shape[0], -1).sum(axis=1)
                shift_norm = max(shift_norm, float(np.linalg.norm(bias_shift)))
            step = Step(
                kind="prune_channels",
                operators=group.operators,
                before=before,
                after=Cost(0, 0),  # filled in by the exact count in make_plan
                predicted_error=float(errors[count]),
                group=group.name,
                channels=channels,
                kept=kept,
                certificate=_prune_certificate(op_norm, shift_norm, None),
                data_aware=self.stats is not None,
            )
            return step, tensors

        return _Candidate(
            Unit("prune:" + group.name, tuple(options)),
            group.operators,
            before,
            build,
            worst=lambda count: float(errors[count]),
        )

    def _consumer_weight(self, group: ChannelGroup, index: int) -> np.ndarray:
        """The consumer's weight with outputs first and the group's channels last (for a
        Conv: ``O x kh x kw x C``); ``weight @ v`` applies a channel-space map ``v``."""
        consumer = group.consumers[index]
        weight = np.moveaxis(self.initializers[consumer.weight].astype(np.float64),
                             consumer.axis, -1)
        return weight[..., consumer.offset: consumer.offset + group.channels]

    def _l1_norms(self, group: ChannelGroup) -> np.ndarray:
        norms = np.zeros(group.channels)
        for producer in group.producers:
            weight = np.moveaxis(self.initializers[producer.tensor].astype(np.float64),
                                 producer.axis, 0)
            rows = weight.reshape(weight.shape[0], -1)[producer.offset:
                                                        producer.offset + group.channels]
            norms += np.abs(rows).sum(axis=1)
        return norms

    def _params_per_channel(self, group: ChannelGroup) -> int:
        total = 0
        for sliced in (*group.producers, *group.sliced):
            shape = self.initializers[sliced.tensor].shape
            total += math.prod(shape) // shape[sliced.axis]
        for consumer in group.consumers:
            shape = self.initializers[consumer.weight].shape
            total += math.prod(shape) // shape[consumer.axis]
        return total


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % (2**32)


def _prune_errors(
    order: Sequence[int], pairs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Relative output error of plain pruning (no compensation) keeping ``order[:k]``:
    the removed channels' contribution ``tr(A_RR C_RR)`` over ``tr(A C)`` (centred)."""
    channels = len(order)
    errors = np.zeros(channels + 1)
    for k in range(channels + 1):
        removed = np.asarray(order[k:], dtype=int)
        total = 0.0
        for a, c in pairs:
            denom = max(float(np.trace(a @ c)), 1e-300)
            total += float(np.trace(a[np.ix_(removed, removed)] @ c[np.ix_(removed, removed)]))\
                / denom
        errors[k] = total
    return errors


def _op_norm(matrix: np.ndarray) -> float:
    return float(scipy.linalg.norm(matrix, 2)) if matrix.size else 0.0


def _certificate(delta_w: np.ndarray, delta_b: np.ndarray | None, radius: float | None
                 ) -> dict[str, float]:
    """Terms of the sound bound ``R ||W - W'||_op + ||b - b'||`` on one output vector."""
    cert = {
        "op_norm": _op_norm(delta_w),
        "bias_change": 0.0 if delta_b is None else float(np.linalg.norm(delta_b)),
    }
    if radius is not None:
        cert["radius"] = float(radius)
        cert["bound"] = cert["radius"] * cert["op_norm"] + cert["bias_change"]
    return cert


def _prune_certificate(op_norm: float, shift: float, radius: float | None) -> dict[str, float]:
    cert = {"op_norm": op_norm, "bias_change": shift}
    if radius is not None:
        cert["radius"] = radius
        cert["bound"] = radius * op_norm + shift
    return cert


def _input_key(op: Operator) -> StatsKey:
    if op.op_type == "Conv":
        return StatsKey(op.input, "patches", operator=op.name)
    return StatsKey(op.input, "vectors", -1)


# -- the plan --------------------------------------------------------------------------------
def stats_requests(
    extraction: Extraction, groups: Sequence[ChannelGroup], method: Method
) -> dict[str, StatsKey]:
    """The statistics a data-aware plan of ``method`` reads, keyed as the planner looks
    them up: every compressible operator's input (receptive fields for a Conv) and every
    prunable group consumer's activation along the channel axis."""
    wanted: dict[str, StatsKey] = {}
    if method == "qmfrg":
        for op in extraction.operators:
            if _lowrank_ok(op) is None:
                key = _input_key(op)
                wanted[key.key] = key
    if method in ("qmfrg", "magnitude", "random"):
        for group in groups:
            if group.reason is None:
                for consumer in group.consumers:
                    key = StatsKey(consumer.activation, "vectors", group.channel_axis)
                    wanted[key.key] = key
    return wanted


def make_plan(
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    initializers: Mapping[str, np.ndarray],
    stats: Mapping[str, StatsLike] | None,
    config: PlanConfig,
    model_name: str = "model",
) -> tuple[Plan, list[dict[str, np.ndarray]]]:
    """The plan for ``config`` and the new weights of each of its steps (same order)."""
    planner = _Planner(extraction, groups, initializers, stats, config)
    candidates = _candidates(planner, extraction, config.method)
    baseline_ops = {name for c in candidates for name in c.operators if name in planner.ops}
    baseline = _total([planner.ops[name] for name in sorted(baseline_ops)])
    choice = _choose(candidates, planner, config, baseline)
    steps: list[Step] = []
    tensors: list[dict[str, np.ndarray]] = []
    prune_kept: dict[str, int] = {}
    for candidate in candidates:
        value = choice[candidate.unit.key]
        if value == candidate.unit.options[0].value:
            continue
        step, arrays = candidate.build(value)
        steps.append(step)
        tensors.append(arrays)
        if step.kind == "prune_channels" and step.group is not None:
            prune_kept[step.group] = len(step.kept or ())
    # a pruning step's own effect (groups sharing an operator each count their part)
    steps = [
        Step(**{**vars(s), "after": _sum_costs(
            _pruned_costs(planner, {s.group: prune_kept[s.group]}), s.operators, planner
        )})
        if s.kind == "prune_channels" and s.group is not None else s
        for s in steps
    ]
    budget = {"keep": config.keep} if config.keep is not None else {"delta": config.delta}
    plan = Plan(
        model=model_name,
        method=config.method,
        budget={k: float(v) for k, v in budget.items() if v is not None},
        baseline=baseline,
        steps=tuple(steps),
        declined=tuple(sorted(planner.declined.items())),
    )
    return plan, tensors


def _candidates(planner: _Planner, extraction: Extraction, method: Method) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    taken: set[str] = set()
    if method in ("magnitude", "random", "qmfrg"):
        for group in planner.groups:
            producers = [planner.ops.get(p.node) for p in group.producers]
            if method == "qmfrg" and not any(op is not None and op.op_type == "Conv"
                                             for op in producers):
                continue  # matmul spaces: low-rank does better than pruning them
            candidates.append(planner.prune_unit(group))
            taken.update(group.operators)
    if method in ("magnitude", "random"):
        return candidates
    data_aware = method == "qmfrg" and planner.stats is not None
    if method == "qmfrg":
        for members in extraction.fusion_groups:
            ops = [planner.ops[name] for name in members]
            if taken.intersection(members) or any(_lowrank_ok(op) for op in ops):
                continue
            if any(op.op_type not in ("MatMul", "Gemm") for op in ops):
                continue
            candidate = planner.lowrank_unit(ops, data_aware)
            if candidate is not None:
                candidates.append(candidate)
                taken.update(members)
    for op in extraction.operators:
        if op.name in taken:
            continue
        reason = _lowrank_ok(op)
        if reason is not None:
            planner.declined[op.name] = reason
            continue
        candidate = planner.lowrank_unit([op], data_aware)
        if candidate is not None:
            candidates.append(candidate)
    return candidates


def _choose(
    candidates: Sequence[_Candidate], planner: _Planner, config: PlanConfig, baseline: Cost
) -> dict[str, int]:
    """The option value of every unit under the budget."""
    if config.delta is not None:
        allowed = 1.0 - math.exp(-config.delta)
        return {
            c.unit.key: min(
                (o for o in c.unit.options if c.worst(o.value) <= allowed + 1e-12),
                key=lambda o: o.cost,
            ).value
            for c in candidates
        }
    assert config.keep is not None
    target = config.keep * baseline.params
    if config.method in ("magnitude", "random"):
        return _uniform(candidates, planner, target)
    # Units may share operators (a conv consumes one channel group and produces the
    # next), so their full costs overlap; budget the *savings* instead, which add up
    # (but for the product of two groups' removed channels, corrected below).
    units = [c.unit for c in candidates]
    full = sum(u.options[0].cost for u in units)
    budget = full - (baseline.params - target)
    choice: dict[str, int] = {}
    for _ in range(12):
        picked = allocate(units, budget)
        choice = {key: option.value for key, option in picked.items()}
        spent = _exact_params(candidates, planner, choice)
        if spent <= target + 0.5:
            break
        budget -= spent - target
    return choice


def _uniform(candidates: Sequence[_Candidate], planner: _Planner, target: float) -> dict[str, int]:
    """The largest common fraction of channels kept in every group that meets ``target``."""
    def pick(fraction: float) -> dict[str, int]:
        return {
            c.unit.key: max(1, min(c.unit.options[0].value,
                                   round(fraction * c.unit.options[0].value)))
            for c in candidates
        }

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if _exact_params(candidates, planner, pick(middle)) <= target:
            low = middle
        else:
            high = middle
    return pick(low)


def _exact_params(
    candidates: Sequence[_Candidate], planner: _Planner, choice: Mapping[str, int]
) -> float:
    kept = {}
    total = 0.0
    touched: set[str] = set()
    for c in candidates:
        value = choice[c.unit.key]
        if c.unit.key.startswith("prune:"):
            kept[c.unit.key.removeprefix("prune:")] = value
            continue
        option = next(o for o in c.unit.options if o.value == value)
        total += option.cost
        touched.update(c.operators)
    costs = _pruned_costs(planner, kept)
    for name, cost in costs.items():
        if name not in touched:
            total += cost.params
    return total


def _pruned_costs(planner: _Planner, kept: Mapping[str, int]) -> dict[str, Cost]:
    """Exact parameters and FLOPs of every operator touched by channel groups when group
    ``g`` keeps ``kept[g]`` channels (weights scale with the kept fraction of both their
    input and output channels; biases and folded BatchNorm with the output channels)."""
    out_frac: dict[str, float] = {}
    in_frac: dict[str, float] = {}
    depthwise: set[str] = set()
    for group in planner.groups:
        if group.name not in kept:
            continue
        frac = kept[group.name] / group.channels
        for producer in group.producers:
            out_frac[producer.node] = out_frac.get(producer.node, 1.0) * frac
        for sliced in group.sliced:
            op = planner.ops.get(sliced.node)
            if op is not None and op.geometry is not None and op.geometry.groups > 1:
                depthwise.add(op.name)
                out_frac[op.name] = frac
        for consumer in group.consumers:
            in_frac[consumer.node] = in_frac.get(consumer.node, 1.0) - (1 - frac) * \
                group.channels / max(1, consumer.width)
    costs: dict[str, Cost] = {}
    for name in set(out_frac) | set(in_frac):
        op = planner.ops.get(name)
        if op is None:
            continue
        o, i = out_frac.get(name, 1.0), in_frac.get(name, 1.0)
        weight = _weight_params(op)
        scale = o if name in depthwise else o * i
        params = weight * scale + (op.params - weight) * o
        costs[name] = Cost(round(params), round(op.flops * scale))
    return costs


def _sum_costs(exact: Mapping[str, Cost], operators: Sequence[str], planner: _Planner) -> Cost:
    params = flops = 0
    for name in operators:
        if name in exact:
            params += exact[name].params
            flops += exact[name].flops
        elif name in planner.ops:
            params += planner.ops[name].params
            flops += planner.ops[name].flops
    return Cost(params, flops)

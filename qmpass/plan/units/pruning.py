"""Pruning units: a channel group with one variant per kept channel count.

``qmfrg`` orders channels by greedy forward selection and compensates the consumers by
least squares; ``magnitude`` and ``random`` order them by L1 norm or at random and do not
compensate. The costs of pruned operators (:func:`pruned_costs`,
:func:`pruned_resource`) follow from the kept fraction of their channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from qmpass.extract import Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.factors import compensation, greedy_channel_order
from qmpass.plan.plan import Cost, Step
from qmpass.plan.resource import PARAMS, Resource, Scale
from qmpass.plan.units.common import Built, Candidate, StatsLike, Variant, unchanged
from qmpass.spectral import operator_norm

__all__ = ["channel_candidate", "pruned_costs", "pruned_resource", "pruned_scales"]


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

    variants = [unchanged(cost(channels))] + [
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

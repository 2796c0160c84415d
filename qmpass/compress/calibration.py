"""Calibration inputs: the seeded split into the part that fits and the part that verifies,
and the statistics a data-aware plan reads (measured on the part that fits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from qmpass.extract import Extraction
from qmpass.extract.channels import ChannelGroup
from qmpass.extract.shapes import dim_size
from qmpass.plan.planner import Method, stats_requests
from qmpass.spill import Spilled
from qmpass.verify import StatsRequest, TensorStats, collect_stats
from qmpass.verify.stats import LowRankCov

__all__ = ["CALIBRATION_VECTORS", "FEW_HELD_OUT", "Split", "calibration_stats", "split_feeds",
           "stats_bytes"]

#: vectors per calibration statistic, at most (about): the fixtures stay below it
CALIBRATION_VECTORS = 50_000
#: bytes of covariance sums accumulated at once, at most; past it the calibration inputs
#: run through the model once per group of statistics that fits, and the finished ones
#: wait on disk (a 1.1B-parameter decoder's are 7.8 GB)
STATS_BYTES = 1 << 30
#: bytes of covariance sums a model of few weights may still accumulate at once
STATS_MIN_BYTES = 64 << 20


def stats_bytes(extraction: Extraction) -> int:
    """The covariance sums held at once for a model: half its weight operators' float32
    bytes, within ``[STATS_MIN_BYTES, STATS_BYTES]``. Issue 13 bounds a command's memory
    by 1.5x the weights + 1 GiB; ONNX's light densenet121 (30 MiB of weights) held 0.94 GB
    of sums in one pass, at 1.67 GiB, and in 13 passes of 64 MB peaks at 0.44 GiB, four
    seconds slower, with the same plan."""
    weights = 4 * sum(op.params for op in extraction.operators)
    return int(min(STATS_BYTES, max(STATS_MIN_BYTES, weights // 2)))


def calibration_stats(
    model: onnx.ModelProto,
    extraction: Extraction,
    groups: Sequence[ChannelGroup],
    method: Method,
    feeds: Mapping[str, np.ndarray],
    shrink: bool = True,
) -> dict[str, TensorStats]:
    """The calibration statistics a data-aware plan of ``method`` reads
    (:func:`qmpass.plan.planner.stats_requests`), measured on ``feeds``. Each request
    takes at most about ``CALIBRATION_VECTORS`` vectors (a seeded random subsample): a
    3x3 convolution over 56x56 images gives 200,000 receptive fields per 64 samples,
    far more than its covariance needs. A covariance of fewer vectors than dimensions is
    :func:`shrunk` (``shrink=False``: the sample covariance as it is)."""
    ops = {op.name: op for op in extraction.operators}
    requests = {
        key: StatsRequest(want.tensor, want.kind, want.axis,
                          ops[want.operator].geometry if want.operator else None)
        for key, want in stats_requests(extraction, groups, method).items()
    }
    if not requests:
        return {}
    stats = collect_stats(model, feeds, requests, max_vectors=CALIBRATION_VECTORS,
                          max_bytes=stats_bytes(extraction))
    return {key: shrunk(value) if shrink else value for key, value in stats.items()}


def shrunk(stats: TensorStats) -> TensorStats:
    """``stats`` with a small ridge, ``RIDGE · tr C / d`` on the diagonal, when there are
    fewer vectors than dimensions: the sample covariance is then singular, and a whitened
    truncation takes every direction it cannot see for lossless, so no rank past the
    number of samples is offered (16 samples of 256 features gave ``--keep 0.75`` 0.19 of
    the weights and a held-out error of 0.96). A full shrinkage estimator (OAS, towards
    ``tr C / d · I`` with its own intensity) was measured worse on the MLP fixture (48
    samples of 64 features, ``--keep 0.5``: 0.0187 against 0.0137 held-out error)."""
    d, n = stats.dim, stats.count
    if n > d or d == 0:
        return stats
    held = stats.held_cov
    if isinstance(held, LowRankCov):  # the same ridge, on the factor's form
        return replace(stats, cov=held.plus_ridge(  # type: ignore[arg-type]
            RIDGE * held.trace() / d))
    cov = np.array(stats.cov, dtype=np.float64)
    cov[np.diag_indices(d)] += RIDGE * float(np.trace(cov)) / d
    cov.setflags(write=False)
    return replace(stats, cov=Spilled(cov) if stats.spilled else cov)  # type: ignore[arg-type]


#: the ridge of :func:`shrunk`, relative to the mean variance
RIDGE = 1e-3

#: fewer held-out samples than this, and the report warns that the error means little
FEW_HELD_OUT = 16


@dataclass(frozen=True)
class Split:
    """The calibration inputs as fitted and verified: ``fit`` plans (the statistics),
    ``held_out`` verifies (the tolerance applies to it). ``note`` says when the two are
    the same inputs or the held-out part is small."""

    fit: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    samples: tuple[int, int]  # fit, held out
    note: str | None = None

    @property
    def separate(self) -> bool:
        return self.fit is not self.held_out


def split_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], holdout: float,
                seed: int) -> Split:
    """A seeded split of ``feeds`` along their batch axis: ``holdout`` of the samples (at
    least one) verify, the rest fit. Feeds split only where every graph input has a
    dynamic first dimension and they agree on its length; otherwise (one sample, or a
    static batch) the same inputs fit and verify, and the note says so."""
    feeds = dict(feeds)
    count = _batch(model, feeds)
    if count is None or count < 2:
        why = "one sample" if count == 1 else "a static batch dimension"
        return Split(feeds, feeds, (count or 1, count or 1),
                     f"the calibration inputs ({why}) cannot be split, so the verified "
                     "error is measured on the data the plan was fitted to")
    held = max(1, round(count * holdout))
    order = np.random.default_rng(seed).permutation(count)
    fit_rows, held_rows = np.sort(order[held:]), np.sort(order[:held])
    note = None
    if held < FEW_HELD_OUT:
        note = (f"only {held} held-out calibration sample(s) verify the rewrites; the "
                "measured error means little (give more calibration samples)")
    return Split({k: v[fit_rows] for k, v in feeds.items()},
                 {k: v[held_rows] for k, v in feeds.items()}, (count - held, held), note)


def _batch(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int | None:
    """The common axis-0 length of the feeds if every graph input's first dimension is
    dynamic (a batch that may be split), else None."""
    stored = {t.name for t in model.graph.initializer}
    lengths = set()
    for info in model.graph.input:
        if info.name in stored:
            continue
        dims = info.type.tensor_type.shape.dim
        array = feeds.get(info.name)
        if array is None or np.ndim(array) == 0 or not dims or dim_size(dims[0]) is not None:
            return None
        lengths.add(int(np.shape(array)[0]))
    return lengths.pop() if len(lengths) == 1 else None

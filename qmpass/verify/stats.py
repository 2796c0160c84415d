"""Calibration statistics of the vectors an operator reads, for data-aware planning.

An operator ``y = W x + b`` is compressed with the least output error on the data when
``W`` is truncated in the metric of the second moment ``C = E[x x^T]`` of its input
vectors: ``W' = [W C^(1/2)]_q C^(+1/2)`` (docs/DESIGN.md, "Whitened truncation: the
data-aware limit"; ``C^(+1/2)`` is the pseudo-inverse square root, which gives the
same optimum when ``C`` is singular, as it is for dead ReLU channels). If the bias is
re-fitted as well (``b' = b + (W - W') mu``), the error is ``E||(W - W')(x - mu)||^2``
and the centred covariance is the metric instead.
:meth:`TensorStats.whitener` returns both square roots.

What "the vectors" are depends on the operator (:class:`StatsRequest`):

* ``vectors``: the tensor's values along one axis. Axis 1 of an NCHW activation gives
  ``N*H*W`` vectors of ``C`` (a 1x1 Conv); axis -1 of a MatMul input flattens all the
  leading dimensions.
* ``patches``: the receptive fields of a Conv (groups 1, 1-D/2-D/3-D), ``Cin*prod(kernel)``
  values each, ordered channel-major then kernel position like the Conv weight reshaped
  to ``(Cout, Cin*prod(kernel))``, so that the patch ``x`` of an output position gives
  ``W @ x`` there. Padding (zeros), strides, dilations and ``auto_pad`` are honoured.

Intermediate tensors are captured by running a copy of the model with them as extra graph
outputs (the model passed in is never changed: analysis does not mutate). Sums of ``x``
and ``x x^T`` are accumulated in float64 over batches of samples and, within a batch,
over chunks of vectors, so memory is bounded by the batch's activations plus ``d x d``
per request. The cost is ``O(n d^2)`` for ``n`` vectors of width ``d``: for a 3x3 Conv
with 256 input channels at 56x56 (``d = 2304``) that is about 17 GFLOP per sample, so
``max_vectors`` offers a seeded random subsample for large convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import numpy as np
import onnx
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view

from qmpass.extract.constants import ConstantScope
from qmpass.extract.operator import ConvGeometry
from qmpass.extract.shapes import infer_shapes
from qmpass.spill import ArrayField, Spilled
from qmpass.verify.runner import DEFAULT_BATCH, batch_size, feed_batches, session_with_tensors

__all__ = ["LowRankCov", "StatsRequest", "TensorStats", "collect_stats", "request_rows"]

#: vectors are materialised (float64) in chunks of about this many values
_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class StatsRequest:
    """Which vectors of ``tensor`` to summarise (see the module docstring)."""

    tensor: str
    kind: Literal["vectors", "patches"]
    axis: int = -1
    geometry: ConvGeometry | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("vectors", "patches"):
            raise ValueError(f"kind must be 'vectors' or 'patches', not {self.kind!r}")
        if self.kind == "patches":
            if self.geometry is None:
                raise ValueError(f"patches of {self.tensor!r} need the Conv's geometry")
            if self.geometry.groups != 1:
                raise ValueError(
                    f"patches of {self.tensor!r}: grouped convolutions (groups="
                    f"{self.geometry.groups}) are not supported"
                )
            if not 1 <= len(self.geometry.kernel_shape) <= 3:
                raise ValueError(f"patches of {self.tensor!r}: 1-D to 3-D kernels only")
        elif self.geometry is not None:
            raise ValueError(f"vectors of {self.tensor!r} take no geometry")


class LowRankCov:
    """A covariance of fewer vectors than dimensions, held as its factor: ``F^T F +
    ridge I`` with ``F`` the ``n x d`` centred vectors divided by ``sqrt(n)``. VGG's first
    FC layer reads 25088-wide vectors: their ``d x d`` covariance is 5 GB, the factor of
    a few hundred of them a few tens of MB. :meth:`load` makes the ``d x d`` matrix (what
    a :class:`TensorStats` field holding this gives); the planner's projections use the
    factor (:func:`qmpass.plan.factors.projection`)."""

    def __init__(self, factor: np.ndarray, ridge: float = 0.0) -> None:
        self.factor = factor
        self.ridge = float(ridge)
        self.factor.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.factor.shape[1], self.factor.shape[1])

    def load(self) -> np.ndarray:
        cov = self.factor.T @ self.factor
        cov[np.diag_indices_from(cov)] += self.ridge
        cov.setflags(write=False)
        return cov

    def variances(self) -> np.ndarray:
        """The diagonal, without the matrix."""
        return np.einsum("ij,ij->j", self.factor, self.factor) + self.ridge

    def trace(self) -> float:
        return float(np.sum(self.variances()))

    def plus_ridge(self, ridge: float) -> LowRankCov:
        return LowRankCov(self.factor, self.ridge + ridge)


#: vectors at least this wide, fewer than ``LOW_RANK_SHARE`` of their width expected,
#: keep their covariance as a factor (:class:`LowRankCov`)
LOW_RANK_WIDTH = 4096
LOW_RANK_SHARE = 0.25


@dataclass(frozen=True, eq=False)
class TensorStats:
    """First and second moments of ``count`` vectors (read-only float64 arrays).

    ``cov`` is the centred covariance ``E[(x - mean)(x - mean)^T]`` (divided by
    ``count``, as ``np.cov(..., bias=True)``); ``second_moment`` is ``E[x x^T]``;
    ``max_norm`` is the largest ``||x||_2`` of a single vector seen (all vectors, also
    when the moments use a subsample): the ``R`` of the certificate on these inputs.
    ``cov`` may be held on disk (:class:`~qmpass.spill.Spilled`, read when used), or as
    the factor of fewer vectors than dimensions (:class:`LowRankCov`, made whole when
    read): :attr:`held_cov` gives it as held.
    """

    tensor: str
    count: int
    mean: np.ndarray
    cov: np.ndarray  # an array, a Spilled or a LowRankCov one: see ArrayField, below
    max_norm: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def held_cov(self) -> np.ndarray | LowRankCov:
        """``cov`` as a :class:`LowRankCov` where it is held so (not made whole), else
        the array."""
        held = self.__dict__["_cov"]
        return held if isinstance(held, LowRankCov) else self.cov

    def variances(self) -> np.ndarray:
        """The diagonal of ``cov`` (without making a low-rank one whole)."""
        held = self.held_cov
        return held.variances() if isinstance(held, LowRankCov) else np.diag(held).copy()

    @property
    def spilled(self) -> bool:
        """Whether ``cov`` waits on disk (read each time it is asked for)."""
        return isinstance(self.__dict__["_cov"], Spilled)

    @cached_property
    def second_moment(self) -> np.ndarray:
        """``E[x x^T] = cov + mean mean^T``, made when first asked for (it is as large as
        ``cov``: 5 GB for VGG's 25088-wide first FC layer)."""
        second = self.cov + np.outer(self.mean, self.mean)
        second.setflags(write=False)
        return second

    def whitener(self, centred: bool = False, rcond: float = 1e-10
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(C^(1/2), C^(+1/2))`` of ``second_moment`` (or ``cov`` if ``centred``).

        Symmetric square root by ``scipy.linalg.eigh`` with eigenvalues clipped at 0; the
        pseudo-inverse root drops eigenvalues below ``rcond`` times the largest.
        """
        matrix = self.cov if centred else self.second_moment
        values, vectors = scipy.linalg.eigh(matrix, driver="evd")  # divide and conquer: ~2x evr
        values = np.clip(values, 0.0, None)
        roots = np.sqrt(values)
        top = float(roots.max()) if roots.size else 0.0
        keep = values > rcond * top * top
        inv = np.zeros_like(roots)
        inv[keep] = 1.0 / roots[keep]
        return (vectors * roots) @ vectors.T, (vectors * inv) @ vectors.T


def collect_stats(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    requests: Mapping[str, StatsRequest],
    batch: int = DEFAULT_BATCH,
    max_vectors: int | None = None,
    seed: int = 0,
    max_bytes: int | None = None,
) -> dict[str, TensorStats]:
    """Statistics of each request on ``feeds``, keyed like ``requests``.

    A request may name a graph input (read from ``feeds``), a constant (an initializer,
    a ``Constant`` node or a constant subgraph; counted once) or a tensor computed in the
    main graph. ``max_vectors`` caps, approximately, how many vectors of each request
    enter the moments (a seeded Bernoulli subsample, unbiased); None keeps all.
    ``max_bytes`` bounds the ``d x d`` sums held at once: past it, the model runs once per
    group of requests that fits, and each finished covariance waits on disk
    (:class:`~qmpass.spill.Spilled`) until it is read.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in initializers}
    produced = {out for node in graph.node for out in node.output if out}
    dynamic = _dynamic_tensors(graph, inputs)
    scope = ConstantScope(graph, {o.domain: o.version for o in model.opset_import})

    constants: dict[str, np.ndarray] = {}
    fetched: list[str] = []
    for name in dict.fromkeys(r.tensor for r in requests.values()):
        if name in inputs:
            if name not in feeds:
                raise ValueError(f"{name!r} is a graph input but has no feed")
            continue
        value = None if name in dynamic else scope.value(name)
        if value is not None:
            constants[name] = np.asarray(value)
        elif name in produced:
            fetched.append(name)
        else:
            raise ValueError(f"{name!r} is not a graph input, a constant or a tensor of the "
                             "main graph")

    accumulators = {key: _Moments(np.random.default_rng([seed, i]))
                    for i, key in enumerate(requests)}
    for key, request in requests.items():
        if request.tensor in constants:
            array = constants[request.tensor]
            accumulators[key].plan(_vector_count(array, request), 1, 1, max_vectors)
            accumulators[key].add_all(_vectors(array, request))

    results = {key: accumulators.pop(key).result(request.tensor)
               for key, request in requests.items() if request.tensor in constants}
    streamed = {k: r for k, r in requests.items() if r.tensor not in constants}
    passes = _passes(model, streamed, max_bytes)
    for part in passes:
        wanted = [name for name in fetched if any(r.tensor == name for r in part.values())]
        for samples, total, values in _runs(model, feeds, wanted, batch):
            for key, request in part.items():
                array = values[request.tensor]
                accumulators[key].plan(_vector_count(array, request), samples, total,
                                       max_vectors)
                accumulators[key].add_all(_vectors(array, request))
        for key, request in part.items():
            stats = accumulators.pop(key).result(request.tensor)
            if len(passes) > 1 and isinstance(stats.held_cov, np.ndarray):
                # the next pass's sums need the memory (a factor is small: it stays)
                stats = replace(stats, cov=Spilled(stats.cov))  # type: ignore[arg-type]
            results[key] = stats
    return {key: results[key] for key in requests}


def _passes(model: onnx.ModelProto, requests: Mapping[str, StatsRequest],
            max_bytes: int | None) -> list[dict[str, StatsRequest]]:
    """``requests`` in runs of the model whose ``d x d`` sums stay within ``max_bytes``
    (as far as shape inference knows ``d``; one run when it fits or None)."""
    if not requests:
        return []
    if max_bytes is None:
        return [dict(requests)]
    shapes = infer_shapes(model)
    passes: list[dict[str, StatsRequest]] = [{}]
    held = 0
    for key, request in requests.items():
        size = 8 * _width(shapes.get(request.tensor), request) ** 2
        if passes[-1] and held + size > max_bytes:
            passes.append({})
            held = 0
        passes[-1][key] = request
        held += size
    return passes


def _width(shape: tuple[int | None, ...] | None, request: StatsRequest) -> int:
    """The length of ``request``'s vectors by the inferred ``shape`` (0 if unknown)."""
    if shape is None or not shape:
        return 0
    try:  # a Conv's input is (N, C, spatial...): its patches read channels on axis 1
        channels = shape[1 if request.kind == "patches" else request.axis]
    except IndexError:
        return 0
    if channels is None:
        return 0
    if request.geometry is None:
        return int(channels)
    return int(channels) * int(np.prod(request.geometry.kernel_shape))


def _runs(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    fetched: list[str],
    batch: int,
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Per batch: its sample count, the total, and the tensors to summarise."""
    if not fetched:
        yield 1, 1, dict(feeds)
        return
    sess = session_with_tensors(model, fetched)
    total = batch_size(sess, feeds)
    for chunk in feed_batches(sess, feeds, batch):
        samples = 1 if total is None else int(next(iter(chunk.values())).shape[0])
        values = dict(zip(fetched, (np.asarray(v) for v in sess.run(fetched, chunk)), strict=True))
        yield samples, total or 1, {**chunk, **values}


def _dynamic_tensors(graph: onnx.GraphProto, inputs: set[str]) -> set[str]:
    """Tensors that depend on a graph input (nodes are in topological order in ONNX).
    Nodes with subgraphs may read outer names implicitly: their outputs count as dynamic."""
    dynamic = set(inputs)
    for node in graph.node:
        if any(i in dynamic for i in node.input) or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _vector_count(array: np.ndarray, request: StatsRequest) -> int:
    if request.kind == "vectors":
        if array.ndim == 0:
            return 1
        axis = _axis(array, request)
        return math.prod(s for i, s in enumerate(array.shape) if i != axis)
    assert request.geometry is not None
    return array.shape[0] * math.prod(_conv_out(array, request.geometry)[0])


def _axis(array: np.ndarray, request: StatsRequest) -> int:
    if not -array.ndim <= request.axis < max(array.ndim, 1):
        raise ValueError(f"axis {request.axis} is out of range for {request.tensor!r} of "
                         f"shape {array.shape}")
    return request.axis % max(array.ndim, 1)


def request_rows(array: np.ndarray, request: StatsRequest) -> Iterator[np.ndarray]:
    """The vectors ``request`` reads of ``array`` (a value of ``request.tensor``), as
    ``(m, d)`` chunks of about ``_CHUNK_VALUES`` values, in the C order of the leading
    axes: for ``patches`` that is ``(N, O1..Or)``, the order of a Conv output's pixels
    with its channel axis moved last. Chunks may be views of ``array``."""
    return _vectors(array, request)


def _vectors(array: np.ndarray, request: StatsRequest) -> Iterator[np.ndarray]:
    """The request's vectors as ``(m, d)`` chunks."""
    if request.kind == "vectors":
        if array.ndim == 0:
            yield array.reshape(1, 1)
            return
        view = np.moveaxis(array, _axis(array, request), -1)
        yield from _row_chunks(view, view.ndim - 1)
        return
    assert request.geometry is not None
    yield from _row_chunks(_patch_view(array, request), len(request.geometry.kernel_shape) + 1)


def _patch_view(array: np.ndarray, request: StatsRequest) -> np.ndarray:
    """A view ``(N, O1..Or, C, k1..kr)`` of the receptive fields (after padding)."""
    geometry = request.geometry
    assert geometry is not None
    rank = len(geometry.kernel_shape)
    if array.ndim != rank + 2:
        raise ValueError(f"patches of {request.tensor!r}: a {rank}-D Conv reads a rank "
                         f"{rank + 2} tensor, not shape {array.shape}")
    _, pads = _conv_out(array, geometry)
    padded = np.pad(array, [(0, 0), (0, 0), *pads])
    extents = _extents(geometry)
    spatial = tuple(range(2, 2 + rank))
    windows = sliding_window_view(padded, extents, axis=spatial)
    steps = (1, 1, *_strides(geometry), *_dilations(geometry))
    windows = windows[tuple(slice(None, None, step) for step in steps)]
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    return windows.transpose(order)


def _strides(geometry: ConvGeometry) -> tuple[int, ...]:
    return geometry.strides or (1,) * len(geometry.kernel_shape)


def _dilations(geometry: ConvGeometry) -> tuple[int, ...]:
    return geometry.dilations or (1,) * len(geometry.kernel_shape)


def _extents(geometry: ConvGeometry) -> list[int]:
    """The span of a dilated kernel along each spatial axis."""
    pairs = zip(geometry.kernel_shape, _dilations(geometry), strict=True)
    return [(k - 1) * d + 1 for k, d in pairs]


def _conv_out(array: np.ndarray, geometry: ConvGeometry
              ) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """Output spatial shape and ``(begin, end)`` pads per spatial axis."""
    rank = len(geometry.kernel_shape)
    sizes = array.shape[2:2 + rank]
    strides = _strides(geometry)
    extents = _extents(geometry)
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, stride, extent in zip(sizes, strides, extents, strict=True):
            total = max(0, (-(-size // stride) - 1) * stride + extent - size)
            small = total // 2
            pads.append((small, total - small) if geometry.auto_pad == "SAME_UPPER"
                        else (total - small, small))
    elif geometry.auto_pad == "VALID":
        pads = [(0, 0)] * rank
    else:
        flat = geometry.pads or (0,) * (2 * rank)
        pads = list(zip(flat[:rank], flat[rank:], strict=True))
    out = tuple((size + b + e - extent) // stride + 1
                for size, (b, e), extent, stride in zip(sizes, pads, extents, strides, strict=True))
    return out, pads


def _row_chunks(view: np.ndarray, lead: int) -> Iterator[np.ndarray]:
    """Rows of ``view`` (leading ``lead`` axes: rows; the rest: one vector) as ``(m, d)``
    copies of about ``_CHUNK_VALUES`` values, splitting the leading axes as needed."""
    width = math.prod(view.shape[lead:])
    if lead == 0:
        yield view.reshape(1, width)
        return
    per_index = math.prod(view.shape[1:lead]) * width
    if per_index <= _CHUNK_VALUES or lead == 1:
        step = max(1, _CHUNK_VALUES // max(per_index, 1))
        for start in range(0, view.shape[0], step):
            yield view[start:start + step].reshape(-1, width)
    else:
        for index in range(view.shape[0]):
            yield from _row_chunks(view[index], lead - 1)


class _Moments:
    """Streaming sums around a shift (the first chunk's mean), for a stable covariance."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._fraction: float | None = None
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(0)
        self._outer = np.zeros((0, 0))
        self._count = 0
        self._max_norm = 0.0
        self._expected = math.inf  # vectors expected in all (after subsampling)
        self._rows: list[np.ndarray] | None = None  # kept instead of sums: low rank

    def plan(self, vectors: int, samples: int, total: int, max_vectors: int | None) -> None:
        """Fix the subsampling fraction from the first batch's vector count."""
        if self._fraction is not None:
            return
        expected = vectors * total / max(samples, 1)
        self._fraction = 1.0 if max_vectors is None or expected <= max_vectors else (
            max_vectors / expected)
        self._expected = expected * self._fraction

    def add_all(self, chunks: Iterator[np.ndarray]) -> None:
        for rows in chunks:
            self.add(rows)

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64)
        if x.shape[0] == 0:
            return
        self._max_norm = max(self._max_norm, float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x)))))
        if self._fraction is not None and self._fraction < 1.0:
            x = x[self._rng.random(x.shape[0]) < self._fraction]
            if x.shape[0] == 0:
                return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            width = x.shape[1]
            if width >= LOW_RANK_WIDTH and self._expected < LOW_RANK_SHARE * width:
                self._rows = []  # the vectors themselves are the smaller form
            else:
                self._outer = np.zeros((width, width))
        x = x - self._shift
        self._sum += x.sum(axis=0)
        if self._rows is not None:
            self._rows.append(x)
        else:
            self._outer += x.T @ x
        self._count += x.shape[0]

    def result(self, tensor: str) -> TensorStats:
        if self._shift is None or self._count == 0:
            raise ValueError(f"no vectors of {tensor!r} were seen (empty tensor, or "
                             "max_vectors too small)")
        n = self._count
        offset = self._sum / n
        if self._rows is not None:  # F^T F is the centred covariance, F = (x - mean)/sqrt n
            factor = np.vstack(self._rows)
            self._rows = None
            factor -= offset
            factor /= math.sqrt(n)
            mean = self._shift + offset
            mean.setflags(write=False)
            return TensorStats(tensor, n, mean, LowRankCov(factor),  # type: ignore[arg-type]
                               self._max_norm)
        # in place, a block of rows at a time: no d x d temporary (d may be 25088)
        cov, self._outer = self._outer, np.zeros((0, 0))
        cov /= n
        step = max(1, _CHUNK_VALUES // max(cov.shape[0], 1))
        for start in range(0, cov.shape[0], step):
            rows = slice(start, start + step)
            cov[rows] -= offset[rows, None] * offset[None, :]
        for start in range(0, cov.shape[0], step):  # exactly symmetric
            rows = slice(start, start + step)
            block = (cov[rows, start:] + cov[start:, rows].T) / 2
            cov[rows, start:] = block
            cov[start:, rows] = block.T
        mean = self._shift + offset
        for array in (mean, cov):
            array.setflags(write=False)
        return TensorStats(tensor, n, mean, cov, self._max_norm)


setattr(TensorStats, "cov", ArrayField("cov"))  # noqa: B010  (after the dataclass is made)

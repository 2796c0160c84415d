"""The QM-FRG: a redundancy graph over operators (read-only analysis).

One vertex per operator. An edge joins two operators whose spectral FS distance is at
most ``threshold`` (each operator keeps its ``max_neighbors`` closest); where the two
read inputs of equal width, the edge also carries the Bures angle of their input-side
density matrices. Since ``d_FS <= d_Bures``, a pair cut by the spectral filter could
never pass a Bures threshold, so computing Bures only on the survivors loses nothing.
The FS distances of all pairs come from one matrix product per block of rows, and only
the kept pairs leave it, so memory stays bounded for tens of thousands of operators.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import numpy as np
import scipy.cluster.vq
import scipy.linalg

from qmpass.errors import QmpassInputError
from qmpass.extract import Operator
from qmpass.parallel import Executor
from qmpass.spectral import (
    SpectralState,
    augmented_matrix,
    bures_angle_of_factors,
    input_factor,
    psi_matrix,
)

__all__ = ["FRGConfig", "build_qmfrg", "clusters", "spectral_edges"]


@dataclass(frozen=True)
class FRGConfig:
    """How the graph is built.

    ``threshold`` (radians) bounds the FS distance of an edge. ``max_neighbors`` keeps,
    for each operator, only its closest operators under the threshold (an edge is kept
    when either end chose it): the graph stays sparse even where a model repeats one
    layer many times. ``bures_work`` caps the Bures computations at that multiple of the
    floating-point work of the spectra themselves, or at ``bures_min_flops``, whichever
    is larger; the closest pairs are taken first, and pairs left over keep their FS
    distance only (the graph says how many). ``block_rows``: rows of the FS distance
    matrix computed at a time (memory, not the result).

    Invalid values raise :class:`~qmpass.errors.QmpassInputError`.
    """

    threshold: float = 0.15
    max_neighbors: int = 16
    bures: bool = True
    bures_work: float = 1.0
    bures_min_flops: float = 2e9
    block_rows: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= math.pi / 2:  # also refuses NaN
            raise QmpassInputError(
                f"--threshold must be within [0, pi/2] radians (an FS distance), "
                f"got {self.threshold}."
            )
        for name in ("max_neighbors", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise QmpassInputError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("bures_work", "bures_min_flops"):
            value = getattr(self, name)
            if not value >= 0.0:  # also refuses NaN; infinity means no cap
                raise QmpassInputError(f"{name} must be non-negative, got {value}.")


def spectral_edges(
    states: Sequence[SpectralState], threshold: float, max_neighbors: int, block_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` with ``d_FS <= threshold``, each among the ``max_neighbors``
    closest of ``i`` or of ``j``, and their distances."""
    count = len(states)
    keep = min(max_neighbors, count - 1)
    if keep <= 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0)
    psi = psi_matrix(states)
    floor = np.cos(threshold)  # d <= t  <=>  overlap >= cos t  (arccos is decreasing)
    firsts, seconds, overlaps = [], [], []
    for start in range(0, count, block_rows):
        rows = np.arange(start, min(start + block_rows, count))
        overlap = psi[rows] @ psi.T
        overlap[np.arange(rows.size), rows] = -1.0  # never one's own neighbour
        if keep < count - 1:
            chosen = np.argpartition(-overlap, keep - 1, axis=1)[:, :keep]
        else:
            chosen = np.broadcast_to(np.arange(count), overlap.shape)
        values = np.take_along_axis(overlap, chosen, axis=1)
        close = values >= floor
        firsts.append(np.broadcast_to(rows[:, None], chosen.shape)[close])
        seconds.append(chosen[close])
        overlaps.append(values[close])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    low, high = np.minimum(first, second), np.maximum(first, second)
    _, unique = np.unique(low * count + high, return_index=True)
    distances = np.arccos(np.clip(np.concatenate(overlaps)[unique], 0.0, 1.0))
    return low[unique], high[unique], distances


#: bytes of Bures input factors kept between pairs
FACTOR_BYTES = 512 * 2**20


def _gram_work(rows: int, cols: int) -> float:
    """Rough floating-point work of a Gram matrix (one triangle, by ``syrk``) and its
    eigenvalues: a spectral state."""
    small, large = min(rows, cols), max(rows, cols)
    return 1.0 * small * small * large + 4.0 * small**3


def _bures_work(rows_a: int, rows_b: int, width: int) -> float:
    """Rough work of one Bures angle: ``F_a F_b^T`` and its singular values (LAPACK's
    bidiagonalisation runs at about a quarter of the speed of the Gram path, hence 16)."""
    small, large = min(rows_a, rows_b), max(rows_a, rows_b)
    return 2.0 * rows_a * rows_b * width + 16.0 * small * small * large


def build_qmfrg(
    operators: Sequence[Operator],
    states: Sequence[SpectralState],
    config: FRGConfig = FRGConfig(),
    known: nx.Graph | None = None,
    executor: Executor | None = None,
    source: str | os.PathLike[str] | None = None,
) -> nx.Graph:
    """The QM-FRG of ``operators`` (``states[i]`` is the state of ``operators[i]``).

    ``known``: a QM-FRG built earlier over some of the same operators. Its Bures angles
    are taken over, and the work it spent on them counts against this graph's budget, so
    two graphs of one analysis spend the Bures budget once between them. ``executor``
    computes the Bures angles in parallel (a Dask worker reads the operators from
    ``source``, the model file; :meth:`~qmpass.parallel.Executor.map`): the same graph."""
    graph = nx.Graph(threshold=config.threshold, max_neighbors=config.max_neighbors)
    for op, state in zip(operators, states, strict=True):
        graph.add_node(
            op.name,
            op_type=op.op_type,
            d_out=op.shape[0],
            d_in=op.shape[1],
            effective_rank=state.effective_rank,
            subgraph=op.graph,
        )
    rows, cols, dists = spectral_edges(
        states, config.threshold, config.max_neighbors, config.block_rows
    )
    names = [op.name for op in operators]
    graph.add_edges_from(
        (names[i], names[j], {"d_fs": d})
        for i, j, d in zip(rows.tolist(), cols.tolist(), dists.tolist(), strict=True)
    )
    if config.bures:
        pairs = _bures_pairs(graph, operators, rows, cols, dists, config, known)
        for (i, j), angle in zip(pairs, _angles(operators, pairs, executor, source),
                                 strict=True):
            graph.edges[names[i], names[j]]["d_bures"] = angle
    return graph


def _bures_pairs(
    graph: nx.Graph,
    operators: Sequence[Operator],
    rows: np.ndarray,
    cols: np.ndarray,
    dists: np.ndarray,
    config: FRGConfig,
    known: nx.Graph | None = None,
) -> list[tuple[int, int]]:
    """The equal-width edges (index pairs) whose Bures angles fit the work budget,
    closest first (less what ``known`` spent; the angles it has are taken over here and
    not returned). Sets the graph's ``bures_pairs`` (those taken over and those
    returned), ``bures_flops`` and ``bures_pairs_over_budget``."""
    width = np.array([op.shape[1] for op in operators], dtype=np.intp)
    order = np.argsort(dists, kind="stable")
    order = order[width[rows[order]] == width[cols[order]]]
    spectra = sum(_gram_work(op.shape[0] + 1, op.shape[1] + 1) for op in operators)
    budget = max(config.bures_work * spectra, config.bures_min_flops)
    spent = 0.0 if known is None else float(known.graph.get("bures_flops", 0.0))
    taken, pairs = 0, []
    for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        first, second = operators[i].name, operators[j].name
        earlier = (known.get_edge_data(first, second) or {}) if known is not None else {}
        if "d_bures" in earlier:
            graph.edges[first, second]["d_bures"] = earlier["d_bures"]
            taken += 1
            continue
        ra, rb = (min(operators[k].shape) + 1 for k in (i, j))
        cost = _bures_work(ra, rb, int(width[i]) + 1)
        if spent + cost > budget:
            continue  # a cheaper pair further down may still fit
        spent += cost
        pairs.append((i, j))
    graph.graph["bures_pairs"] = taken + len(pairs)
    graph.graph["bures_flops"] = spent
    graph.graph["bures_pairs_over_budget"] = int(order.size) - taken - len(pairs)
    return pairs


#: tasks the Bures angles are split into when they are computed in parallel
BURES_TASKS = 16


def _angles(operators: Sequence[Operator], pairs: Sequence[tuple[int, int]],
            executor: Executor | None, source: str | os.PathLike[str] | None
            ) -> list[float]:
    """The Bures angles of ``pairs`` (indices into ``operators``), in order. They are
    computed ordered by operator, so that consecutive pairs share input factors, and in
    parallel split into ``BURES_TASKS`` runs of consecutive pairs, each task sent only
    its own operators."""
    if not pairs:
        return []
    ordered = sorted(range(len(pairs)), key=lambda p: pairs[p])
    parallel = executor if executor is not None and executor.parallel else None
    chunks = [c.tolist() for c in np.array_split(ordered, 1 if parallel is None else BURES_TASKS)
              if c.size]
    tasks = []
    for chunk in chunks:
        members = sorted({k for p in chunk for k in pairs[p]})
        local = {k: n for n, k in enumerate(members)}
        tasks.append(([operators[k] for k in members],
                      [(local[pairs[p][0]], local[pairs[p][1]]) for p in chunk]))
    results = ([_angles_of(*task) for task in tasks] if parallel is None
               else parallel.map(_angles_of, tasks, source=source))
    angles = [0.0] * len(pairs)
    for chunk, values in zip(chunks, results, strict=True):
        for p, angle in zip(chunk, values, strict=True):
            angles[p] = angle
    return angles


def _angles_of(operators: Sequence[Operator], pairs: Sequence[tuple[int, int]]
               ) -> list[float]:
    """The Bures angles of ``pairs`` (indices into ``operators``): a task."""
    # the input factors are d_in x d_in: kept for the next pairs within FACTOR_BYTES, and
    # computed again past that (a model's weights are never all held)
    factors: OrderedDict[int, np.ndarray] = OrderedDict()
    angles = []
    for i, j in pairs:
        for k in (i, j):
            if k not in factors:
                op = operators[k]
                factors[k] = input_factor(augmented_matrix(op.weight, op.bias))
            factors.move_to_end(k)
        while len(factors) > 2 and sum(f.nbytes for f in factors.values()) > FACTOR_BYTES:
            oldest = next(iter(factors))
            if oldest in (i, j):
                break
            factors.popitem(last=False)
        angles.append(bures_angle_of_factors(factors[i], factors[j]))
    return angles


def clusters(
    graph: nx.Graph,
    threshold: float | None = None,
    *,
    metric: Literal["fs", "bures"] = "bures",
    method: Literal["components", "spectral"] = "components",
    n_clusters: int | None = None,
    seed: int = 0,
) -> list[tuple[str, ...]]:
    """Groups of two or more operators close under ``metric``.

    ``components``: connected components of the edges with distance ``<= threshold``
    (default: the graph's own threshold). With ``metric="bures"`` only edges that carry
    a Bures angle count, i.e. operators of equal input width whose density matrices are
    close: the ones a shared input basis can serve. ``spectral``: spectral clustering of
    each component on the affinity ``exp(-(d/threshold)**2)``, ``n_clusters`` clusters
    (default: the largest eigengap of the normalised Laplacian).
    """
    limit = graph.graph.get("threshold", np.pi / 2) if threshold is None else threshold
    key = "d_bures" if metric == "bures" else "d_fs"
    kept = nx.Graph()
    kept.add_edges_from(
        (u, v, {"weight": float(np.exp(-((d[key] / max(limit, 1e-12)) ** 2)))})
        for u, v, d in graph.edges(data=True)
        if key in d and d[key] <= limit
    )
    found: list[tuple[str, ...]] = []
    for component in nx.connected_components(kept):
        members = sorted(component)
        if method == "spectral" and len(members) > 2:
            found.extend(_spectral_split(kept.subgraph(members), n_clusters, seed))
        else:
            found.append(tuple(members))
    return sorted((c for c in found if len(c) > 1), key=lambda c: (-len(c), c))


def _spectral_split(
    component: nx.Graph, n_clusters: int | None, seed: int
) -> Iterable[tuple[str, ...]]:
    nodes = sorted(component.nodes)
    laplacian = nx.normalized_laplacian_matrix(component, nodelist=nodes, weight="weight")
    values, vectors = scipy.linalg.eigh(laplacian.toarray())
    if n_clusters is None:
        gaps = np.diff(values[: min(len(nodes), 10)])
        n_clusters = int(np.argmax(gaps)) + 1 if gaps.size else 1
    if n_clusters <= 1:
        return [tuple(nodes)]
    embedding = vectors[:, :n_clusters]
    embedding /= np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    _, labels = scipy.cluster.vq.kmeans2(embedding, n_clusters, seed=seed, minit="++")
    return [tuple(n for n, lab in zip(nodes, labels, strict=True) if lab == c)
            for c in range(n_clusters)]

"""The QM-FRG: a redundancy graph over operators (read-only analysis).

One vertex per operator. An edge joins two operators whose spectral FS distance is at
most ``threshold``; where the two read inputs of equal width, the edge also carries the
Bures angle of their input-side density matrices. Since ``d_FS <= d_Bures``, a pair cut
by the spectral filter could never pass a Bures threshold, so computing Bures only on the
survivors loses nothing. The FS distances of all pairs come from one matrix product per
block of rows, and only the pairs under the threshold are kept, so the graph stays sparse
and memory stays bounded for tens of thousands of operators.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import numpy as np
import scipy.cluster.vq
import scipy.linalg

from qmpass.extract import Operator
from qmpass.spectral import SpectralState, augmented_matrix, bures_angle

__all__ = ["FRGConfig", "build_qmfrg", "clusters"]


@dataclass(frozen=True)
class FRGConfig:
    """How the graph is built.

    ``threshold`` (radians) bounds the FS distance of an edge; ``max_bures_pairs`` caps
    the Bures computations (the closest pairs first), since each costs a small SVD.
    """

    threshold: float = 0.15
    bures: bool = True
    max_bures_pairs: int = 20_000
    block_rows: int = 1024


def _spectral_edges(
    states: Sequence[SpectralState], threshold: float, block_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` with ``d_FS <= threshold`` and their distances."""
    length = max((s.psi.size for s in states), default=0)
    psi = np.zeros((len(states), length))
    for i, state in enumerate(states):
        psi[i, : state.psi.size] = state.psi
    floor = np.cos(threshold)  # d <= t  <=>  overlap >= cos t  (arccos is decreasing)
    rows, cols, dists = [], [], []
    for start in range(0, len(states), block_rows):
        overlap = psi[start : start + block_rows] @ psi[start:].T
        i, j = np.nonzero(np.triu(overlap >= floor, k=1))
        rows.append(i + start)
        cols.append(j + start)
        dists.append(np.arccos(np.clip(overlap[i, j], 0.0, 1.0)))
    if not rows:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


def build_qmfrg(
    operators: Sequence[Operator],
    states: Sequence[SpectralState],
    config: FRGConfig = FRGConfig(),
) -> nx.Graph:
    """The QM-FRG of ``operators`` (``states[i]`` is the state of ``operators[i]``)."""
    graph = nx.Graph()
    for op, state in zip(operators, states, strict=True):
        graph.add_node(
            op.name, op_type=op.op_type, d_out=op.shape[0], d_in=op.shape[1],
            effective_rank=state.effective_rank, subgraph=op.graph,
        )
    rows, cols, dists = _spectral_edges(states, config.threshold, config.block_rows)
    graph.add_edges_from(
        (operators[i].name, operators[j].name, {"d_fs": float(d)})
        for i, j, d in zip(rows.tolist(), cols.tolist(), dists.tolist(), strict=True)
    )
    if config.bures:
        same_width = [
            k for k in np.argsort(dists, kind="stable")
            if operators[rows[k]].shape[1] == operators[cols[k]].shape[1]
        ][: config.max_bures_pairs]
        augmented: dict[int, np.ndarray] = {}
        for k in same_width:
            i, j = int(rows[k]), int(cols[k])
            for idx in (i, j):
                if idx not in augmented:
                    augmented[idx] = augmented_matrix(operators[idx].weight, operators[idx].bias)
            graph.edges[operators[i].name, operators[j].name]["d_bures"] = bures_angle(
                augmented[i], augmented[j]
            )
    graph.graph["threshold"] = config.threshold
    return graph


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

"""Cross-layer shared-basis candidates from the QM-FRG (read-only analysis).

A shared input-side basis can serve operators that read *different* tensors of one
width only where their input-side states ``rho = W^T W^ / ||W^||_F**2`` point the same
way: the Bures angle of two states is small when their energy lies in the same input
directions. The candidates are merges of *units* (an operator, or the operators that
read one tensor, which already share a basis): the average-linkage tree
(``scipy.cluster.hierarchy``) of the units of one input width, the distance of two units
being the mean Bures angle of their operators' pairs on the QM-FRG (``pi/2``, the
largest, where the graph has no Bures angle for a pair: the spectral filter ruled it out
or the work cap left it), every merge at most ``threshold`` a candidate, closest first.
Average linkage keeps a chain of close pairs from gluing far-apart units into one group,
as connected components would; the nested merges let the planner take the largest group
that still pays.

The threshold is wider than the graph's default (0.15 rad): on the trained fixtures no
pair of layers comes that close (the transformer's nearest cross-layer pair is at
0.57 rad), yet a shared basis can still lose less than separate factorisations at equal
parameters. The QM-FRG only proposes; the planner measures each merge on calibration
data and keeps it only where it wins (:mod:`qmpass.plan.units.crosslayer`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance

from qmpass.extract import Operator
from qmpass.frg.graph import FRGConfig, build_qmfrg
from qmpass.parallel import Executor
from qmpass.spectral import SpectralState, spectral_state

__all__ = ["CROSSLAYER_THRESHOLD", "CrossLayerMerge", "crosslayer_graph", "crosslayer_merges"]

#: the Bures angle (radians, average linkage) under which units are proposed to share
CROSSLAYER_THRESHOLD = 0.75


@dataclass(frozen=True)
class CrossLayerMerge:
    """One merge of the average-linkage tree: two groups of operators (each one unit or
    an earlier merge) proposed to share one basis, at the mean Bures angle ``bures`` of
    their operators' pairs across units; ``units`` counts the units merged."""

    first: tuple[str, ...]
    second: tuple[str, ...]
    bures: float
    units: int

    @property
    def operators(self) -> tuple[str, ...]:
        return (*self.first, *self.second)

    def to_dict(self) -> dict[str, object]:
        return {"operators": list(self.operators), "units": self.units,
                "bures": self.bures}


def crosslayer_graph(operators: Sequence[Operator],
                     states: Sequence[SpectralState] | None = None,
                     threshold: float = CROSSLAYER_THRESHOLD,
                     known: nx.Graph | None = None,
                     executor: Executor | None = None,
                     source: str | os.PathLike[str] | None = None) -> nx.Graph:
    """The QM-FRG of ``operators`` with the spectral filter and the Bures angles taken out
    to ``threshold`` (states computed here when not given). ``known``: the analysis's
    QM-FRG, whose Bures angles and spent work this one takes over
    (:func:`~qmpass.frg.build_qmfrg`). ``executor`` (and ``source``, the model file a
    Dask worker reads the operators from) computes the states and Bures angles in
    parallel: the same graph."""
    if states is None:
        tasks = [(op,) for op in operators]
        states = (executor.map(_state, tasks, source=source) if executor is not None
                  else [_state(*task) for task in tasks])
    return build_qmfrg(operators, states, FRGConfig(threshold=threshold), known, executor,
                       source)


def _state(op: Operator) -> SpectralState:
    """An operator's spectral state from its stored weight (a task)."""
    return spectral_state(op.name, op.stored_weight, op.bias)


def crosslayer_merges(graph: nx.Graph, units: Sequence[Sequence[str]],
                      threshold: float = CROSSLAYER_THRESHOLD) -> list[CrossLayerMerge]:
    """The merges at most ``threshold`` of the average-linkage trees of ``units``
    (operator names, nodes of ``graph``), one tree per input width, closest first.
    Units must not read the same tensor as each other (that is a plain shared basis)."""
    by_width: dict[int, list[tuple[str, ...]]] = {}
    for unit in units:
        widths = {graph.nodes[name]["d_in"] for name in unit}
        if len(widths) == 1:
            by_width.setdefault(widths.pop(), []).append(tuple(unit))
    found: list[CrossLayerMerge] = []
    for same in by_width.values():
        if len(same) < 2:
            continue
        distance = np.array([[_distance(graph, a, b) for b in same] for a in same])
        np.fill_diagonal(distance, 0.0)
        tree = scipy.cluster.hierarchy.linkage(
            scipy.spatial.distance.squareform(distance, checks=False), method="average")
        nodes: list[tuple[str, ...]] = list(same)
        counts = [1] * len(same)
        for left, right, height, _ in tree.tolist():
            a, b = nodes[int(left)], nodes[int(right)]
            nodes.append((*a, *b))
            counts.append(counts[int(left)] + counts[int(right)])
            if height <= threshold:
                found.append(CrossLayerMerge(a, b, float(height), counts[-1]))
    return sorted(found, key=lambda m: (m.bures, m.operators))


def _distance(graph: nx.Graph, a: Sequence[str], b: Sequence[str]) -> float:
    """Mean Bures angle over the operator pairs of units ``a`` and ``b``."""
    angles = []
    for u in a:
        for v in b:
            data = graph.get_edge_data(u, v) or {}
            angles.append(float(data.get("d_bures", math.pi / 2)))
    return float(np.mean(angles))

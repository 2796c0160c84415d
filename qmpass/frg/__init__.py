"""The QM-FRG redundancy graph and its clusters.

Built by ``analyze`` (from the spectral states), for its report, GraphML and clusters.
``compress`` uses it for one thing: :mod:`qmpass.frg.crosslayer` proposes the units that
read different tensors to share one basis (its same-input clusters are extraction's
fusion groups).
"""

from qmpass.frg.export import graph_to_graphml, graph_to_json
from qmpass.frg.graph import FRGConfig, build_qmfrg, clusters, spectral_edges

__all__ = [
    "FRGConfig",
    "build_qmfrg",
    "clusters",
    "graph_to_graphml",
    "graph_to_json",
    "spectral_edges",
]

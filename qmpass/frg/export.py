"""QM-FRG export: JSON (networkx node-link) and GraphML."""

from __future__ import annotations

from typing import Any

import networkx as nx

__all__ = ["graph_to_graphml", "graph_to_json"]


def graph_to_json(graph: nx.Graph) -> dict[str, Any]:
    """Node-link JSON of the graph (plain floats and strings)."""
    return nx.node_link_data(graph, edges="edges")


def graph_to_graphml(graph: nx.Graph) -> str:
    """GraphML text; readable by ``networkx.read_graphml``, Gephi, yEd."""
    return "\n".join(nx.generate_graphml(graph))

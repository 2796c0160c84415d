"""Union-find over tensor names: the channel spaces of a graph."""

from __future__ import annotations

__all__ = ["UnionFind"]


class UnionFind:
    """Disjoint sets of tensor names, in the order the names were first seen.

    The earlier-seen root stays the root of a union, so a set is named after its first
    tensor in graph order (and a group after its first producer).
    """

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.order: list[str] = []
        self.position: dict[str, int] = {}

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.parent

    def touch(self, tensor: str) -> None:
        if tensor not in self.parent:
            self.parent[tensor] = tensor
            self.position[tensor] = len(self.order)
            self.order.append(tensor)

    def find(self, tensor: str) -> str:
        root = tensor
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[tensor] != root:  # path compression
            self.parent[tensor], tensor = root, self.parent[tensor]
        return root

    def join(self, a: str, b: str) -> None:
        self.touch(a)
        self.touch(b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, second = sorted((ra, rb), key=self.position.__getitem__)
            self.parent[second] = first

"""Connected components by union-find: copies of one image, subjects of one person."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Protocol, TypeVar

__all__ = ["connected_components"]


class _Node(Hashable, Protocol):
    """A graph node: hashable (a dict key) and ordered (a component is named by its smallest member)."""

    def __lt__(self, other: Any, /) -> bool: ...


N = TypeVar("N", bound=_Node)


def connected_components(nodes: Iterable[N], edges: Iterable[tuple[N, N]]) -> dict[N, N]:
    """Map every node (including those only named by an edge) to its component's smallest member."""
    parent: dict[N, N] = {n: n for n in nodes}

    def find(n: N) -> N:
        parent.setdefault(n, n)
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo
    return {n: find(n) for n in list(parent)}

"""Connected components by union-find: copies of one image, subjects of one person."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

__all__ = ["connected_components"]

N = TypeVar("N", bound=Hashable)


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
            lo, hi = sorted((ra, rb))  # type: ignore[type-var]
            parent[hi] = lo
    return {n: find(n) for n in list(parent)}

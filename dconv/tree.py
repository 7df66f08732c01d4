"""The reduction tree's shape: its nodes, what each covers, its children, its height, its frontier.

The tree adds consecutive runs of at most ``split_every`` (``s``) nodes, as
dask's ``_tree_reduce`` does. Over ``n`` chunks it has
``ceil(log(n, s))`` combine levels, and at least one (a single chunk still
passes through one combine)::

    depth 2              (2, 0)                      chunks 0-8 (all of them)
    depth 1     (1, 0)   (1, 1)   (1, 2)             chunks 0-2, 3-5, 6-8
    depth 0     0 1 2    3 4 5    6 7 8              the chunks      (n = 9, s = 3)

Node ``(depth, index)`` covers the chunks ``index * s**depth`` up to
``(index + 1) * s**depth`` (fewer at the end of the batch); depth 0 is a chunk.
Its children are nodes ``index * s`` up to ``(index + 1) * s`` of the level
below, in chunk order. Every user of the tree (the Dask graph, the records, a
resume, the waves) asks this module, which imports nothing but NumPy.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = [
    "Node",
    "tree_height",
    "level_width",
    "node_chunks",
    "children",
    "tree_nodes",
    "frontier",
    "covered",
    "split_at_depth",
]

Node = tuple[int, int]
"""``(depth, index)``: depth 0 is chunk ``index``; depth d >= 1 is node ``index`` of combine level d - 1."""


def tree_height(n_chunks: int, split_every: int) -> int:
    """The root's depth: ``ceil(log(n_chunks, split_every))`` in exact integer arithmetic, at least 1."""
    height, capacity = 0, 1
    while capacity < n_chunks:
        height, capacity = height + 1, capacity * split_every
    return max(height, 1)


def level_width(depth: int, n_chunks: int, split_every: int) -> int:
    """The number of nodes of depth ``depth``: ``ceil(n_chunks / split_every**depth)``."""
    return -(-n_chunks // split_every**depth)


def node_chunks(depth: int, index: int, split_every: int, n_chunks: int) -> range:
    """The chunks node ``(depth, index)`` covers, in order."""
    width = split_every**depth
    return range(index * width, min((index + 1) * width, n_chunks))


def children(node: Node, n_chunks: int, split_every: int) -> list[Node]:
    """The nodes that node ``node`` (depth >= 1) adds, in chunk order: at most ``split_every``."""
    depth, index = node
    first = index * split_every
    stop = min(first + split_every, level_width(depth - 1, n_chunks, split_every))
    return [(depth - 1, i) for i in range(first, stop)]


def tree_nodes(n_chunks: int, split_every: int) -> int:
    """The number of nodes of the tree, chunks and root included."""
    return sum(level_width(depth, n_chunks, split_every) for depth in range(tree_height(n_chunks, split_every) + 1))


def frontier(stored: Iterable[Node], n_chunks: int, split_every: int) -> list[Node]:
    """The nodes of ``stored`` that no other node of ``stored`` covers, in chunk order.

    Pairs that are not nodes of this tree are left out. The chunks the
    frontier covers (:func:`covered`) are those ``stored`` covers.
    """
    stored = set(stored)
    height = tree_height(n_chunks, split_every)
    maximal = []
    for depth, index in stored:
        if depth > height or index * split_every**depth >= n_chunks:
            continue  # not a node of this tree
        ancestor = index
        for above in range(depth + 1, height + 1):
            ancestor //= split_every
            if (above, ancestor) in stored:
                break
        else:
            maximal.append((depth, index))
    return sorted(maximal, key=lambda node: node[1] * split_every ** node[0])


def covered(nodes: Iterable[Node], n_chunks: int, split_every: int) -> np.ndarray:
    """Boolean mask, shape (n_chunks,): the chunks ``nodes`` cover."""
    mask = np.zeros(n_chunks, dtype=bool)
    for depth, index in nodes:
        chunks = node_chunks(depth, index, split_every, n_chunks)
        mask[chunks.start : chunks.stop] = True
    return mask


def split_at_depth(
    depth: int, n_chunks: int, split_every: int, stored: Iterable[Node] = ()
) -> tuple[list[Node], dict[Node, list[Node]]]:
    """The tree cut at ``depth``: the subtrees below the cut, and the nodes above it.

    Parameters
    ----------
    depth : int
        The depth of the subtrees' roots (the root's, if the tree is no higher).
    stored : iterable of (depth, index)
        Nodes already computed: neither they nor what they cover are returned.

    Returns
    -------
    roots : list of (depth, index)
        The roots of the subtrees to compute, in chunk order.
    above : dict
        Each node above the cut to compute, with its children (:func:`children`), root first.
    """
    stored = set(stored)
    roots: list[Node] = []
    above: dict[Node, list[Node]] = {}
    pending = [(tree_height(n_chunks, split_every), 0)]
    while pending:
        node = pending.pop()
        if node in stored:
            continue
        if node[0] <= depth:
            roots.append(node)
            continue
        above[node] = children(node, n_chunks, split_every)
        pending.extend(reversed(above[node]))
    return roots, above

"""dconv.tree: the reduction tree's nodes, coverage, children, height and frontier, checked as properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dconv.tree import (
    children,
    covered,
    frontier,
    level_width,
    node_chunks,
    split_at_depth,
    tree_height,
    tree_nodes,
)

n_chunks = st.integers(min_value=1, max_value=3000)
split_every = st.integers(min_value=2, max_value=17)


def all_nodes(n: int, s: int) -> list[tuple[int, int]]:
    return [(depth, index) for depth in range(tree_height(n, s) + 1) for index in range(level_width(depth, n, s))]


@pytest.mark.parametrize("n, s", [(1, 2), (2, 2), (8, 2), (9, 2), (125, 5), (126, 5), (4096, 8), (4097, 8), (5, 16)])
def test_height_is_the_ceiling_of_the_log_with_no_float_rounding(n, s):
    """log(125, 5) is 3.0000000000000004 in floating point; a single chunk still has one combine level."""
    expected = {1: 1, 2: 1, 8: 3, 9: 4, 125: 3, 126: 4, 4096: 4, 4097: 5, 5: 1}[n]
    assert tree_height(n, s) == expected


@given(st.integers(min_value=2, max_value=10**12), split_every)
def test_height_is_the_least_h_with_split_every_to_the_h_at_least_n(n, s):
    height = tree_height(n, s)
    assert s ** (height - 1) < n <= s**height


@given(n_chunks, split_every)
def test_the_root_covers_every_chunk_and_the_level_below_has_more_than_one_node(n, s):
    height = tree_height(n, s)
    assert level_width(height, n, s) == 1 and node_chunks(height, 0, s, n) == range(n)
    assert height == 1 or level_width(height - 1, n, s) > 1


@given(n_chunks, split_every)
def test_every_chunk_is_covered_by_exactly_one_node_of_each_depth(n, s):
    for depth in range(tree_height(n, s) + 1):
        count = np.zeros(n, dtype=int)
        for index in range(level_width(depth, n, s)):
            chunks = node_chunks(depth, index, s, n)
            assert len(chunks) >= 1
            count[chunks.start : chunks.stop] += 1
        assert (count == 1).all()


@given(n_chunks, split_every)
def test_children_partition_the_parent_in_order_with_fan_in_at_most_split_every(n, s):
    for depth, index in all_nodes(n, s):
        if depth == 0:
            continue
        below = children((depth, index), n, s)
        assert 1 <= len(below) <= s
        assert [child[0] for child in below] == [depth - 1] * len(below)
        ranges = [node_chunks(*child, s, n) for child in below]
        assert [c for r in ranges for c in r] == list(node_chunks(depth, index, s, n))


@given(n_chunks, split_every)
def test_every_node_but_the_root_has_one_parent(n, s):
    parents: dict = {}
    for node in all_nodes(n, s):
        if node[0] > 0:
            for child in children(node, n, s):
                assert child not in parents
                parents[child] = node
    nodes = all_nodes(n, s)
    assert set(parents) == set(nodes) - {(tree_height(n, s), 0)}
    assert tree_nodes(n, s) == len(nodes)


@given(n_chunks, split_every, st.data())
def test_the_frontier_covers_what_the_stored_nodes_cover_once(n, s, data):
    nodes = all_nodes(n, s)
    stored = data.draw(st.sets(st.sampled_from(nodes), max_size=12))
    front = frontier(stored | {(tree_height(n, s) + 1, 0), (0, n)}, n, s)  # two pairs not of this tree
    assert set(front) <= stored
    assert (covered(front, n, s) == covered(stored, n, s)).all()
    count = np.zeros(n, dtype=int)
    for node in front:
        chunks = node_chunks(*node, s, n)
        count[chunks.start : chunks.stop] += 1
    assert count.max(initial=0) <= 1  # no node of the frontier covers another
    starts = [node_chunks(*node, s, n).start for node in front]
    assert starts == sorted(starts)


def test_frontier_is_the_maximal_stored_nodes_in_chunk_order():
    # 20 chunks, fan-in 4: depth 1 has 5 nodes, depth 2 two, depth 3 the root
    stored = {(0, 0), (0, 1), (1, 0), (0, 5), (2, 1), (1, 4), (0, 19), (0, 8), (3, 0), (5, 0), (0, 99)}
    assert frontier(stored - {(3, 0)}, 20, 4) == [(1, 0), (0, 5), (0, 8), (2, 1)]
    assert frontier(stored, 20, 4) == [(3, 0)]
    assert frontier(set(), 20, 4) == []
    mask = covered(frontier(stored - {(3, 0)}, 20, 4), 20, 4)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3, 5, 8, *range(16, 20)]


@given(n_chunks, split_every, st.integers(min_value=1, max_value=8), st.data())
def test_a_cut_covers_every_chunk_not_stored_once(n, s, depth, data):
    """The subtrees at the cut and the stored nodes at or above it cover every chunk once (a stored
    node below the cut is inside a subtree); each node above the cut comes with its children."""
    stored = frontier(data.draw(st.sets(st.sampled_from(all_nodes(n, s)), max_size=6)), n, s)
    roots, above = split_at_depth(depth, n, s, stored)
    if (tree_height(n, s), 0) in stored:
        assert roots == [] and above == {}
        return
    cut = min(depth, tree_height(n, s))
    assert all(node[0] == cut for node in roots)
    count = np.zeros(n, dtype=int)
    for node in [*roots, *(node for node in stored if node[0] >= cut)]:
        chunks = node_chunks(*node, s, n)
        count[chunks.start : chunks.stop] += 1
    assert (count == 1).all()
    starts = [node_chunks(*node, s, n).start for node in roots]
    assert starts == sorted(starts)
    for node, below in above.items():
        assert node[0] > depth and below == children(node, n, s)
        assert all(child in above or child in roots or child in stored for child in below)

"""dconv.graph: batch chunking, the shape of the dW/db reduction tree, and the order of its sums.

The tree is checked on the graph itself, as dask's tests/test_reductions.py::test_tree_reduce_depth
does: walk ``__dask_graph__()`` and count dependencies, never trust the key names for the structure.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from dask.core import get_dependencies

from dconv import InputError
from dconv.graph import (
    CHUNK_PREFIX,
    COMBINE_PREFIX,
    Partial,
    backward_graph,
    batch_bounds,
    combine_partials,
    tree_depth,
    tree_reduce,
    tree_shape,
)
from dconv.options import JobOptions
from dconv.plan import plan_job
from dconv.params import ConvParams
from dconv.store import OutputStore

from _pipeline import read_inputs


def expected_depth(n_leaves: int, split_every: int) -> int:
    """ceil(log(n_leaves, split_every)) in exact integer arithmetic; 1 for a single leaf."""
    depth, capacity = 0, 1
    while capacity < n_leaves:
        depth, capacity = depth + 1, capacity * split_every
    return max(depth, 1)


def key_name(key) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


def tree_structure(graph):
    """(chunk keys, combine keys, dependencies of every key, dependents of every key)."""
    dsk = dict(graph.__dask_graph__())
    deps = {key: set(get_dependencies(dsk, key)) for key in dsk}
    dependents = {key: set() for key in dsk}
    for key, its_deps in deps.items():
        for dep in its_deps:
            dependents[dep].add(key)
    chunks = [k for k in dsk if key_name(k).startswith(CHUNK_PREFIX)]
    combines = [k for k in dsk if key_name(k).startswith(COMBINE_PREFIX)]
    return chunks, combines, deps, dependents


def combine_depth(key, deps, combines) -> set[int]:
    """The number of combine tasks on each path from ``key`` down to a chunk task."""
    below = [d for d in deps[key] if d in combines]
    if not below:
        return {1}
    return {1 + depth for d in below for depth in combine_depth(d, deps, combines)}


def synthetic_graph(n_chunks: int, split_every: int, tmp_path):
    """backward_graph over n_chunks chunks of one sample each; built, never computed."""
    geometry = ConvParams.parse(1, 0, 1).resolve((3, 3), (2, 2))
    bounds = batch_bounds(n_chunks, 1)
    placeholders = [None] * n_chunks
    return backward_graph(
        placeholders,
        placeholders,
        np.zeros((2, 2, 1, 1)),
        geometry,
        OutputStore(str(tmp_path / "never-written.zarr")),
        bounds,
        JobOptions(split_every=split_every),
    )


def assert_tree(graph, n_chunks: int, split_every: int) -> None:
    chunks, combines, deps, dependents = tree_structure(graph)
    combines_set = set(combines)
    assert len(chunks) == n_chunks
    assert combines, "no combine task in the graph"
    # Fan-in: every combine adds at most split_every partials, and only partials.
    for key in combines:
        assert 1 <= len(deps[key]) <= split_every, (key, deps[key])
        assert all(key_name(d).startswith((CHUNK_PREFIX, COMBINE_PREFIX)) for d in deps[key]), deps[key]
    # Every chunk task feeds exactly one combine, and nothing else.
    for key in chunks:
        assert len(dependents[key]) == 1, (key, dependents[key])
        assert dependents[key] <= combines_set
    # One root; every chunk is ceil(log(n, split_every)) combine levels below it.
    roots = [k for k in combines if not dependents[k]]
    assert roots == [graph.key]
    assert combine_depth(graph.key, deps, combines_set) == {expected_depth(n_chunks, split_every)}
    # Every combine but the root feeds exactly one combine.
    for key in combines:
        if key != graph.key:
            assert len(dependents[key]) == 1 and dependents[key] <= combines_set


@pytest.mark.parametrize(
    "n_chunks, split_every",
    [(1, 2), (2, 2), (7, 2), (8, 2), (9, 2), (10, 3), (27, 3), (28, 3), (16, 4), (17, 8), (64, 8), (65, 8), (5, 16)],
)
def test_tree_fan_in_and_depth(n_chunks, split_every, tmp_path):
    assert_tree(synthetic_graph(n_chunks, split_every, tmp_path), n_chunks, split_every)


@pytest.mark.parametrize("source", ["zarr", "dask"])
@pytest.mark.parametrize("m, batch_chunk, split_every", [(20, 2, 3), (20, 5, 2), (21, 4, 8), (5, 8, 2)])
def test_tree_of_a_planned_job(make_input, tmp_path, m, batch_chunk, split_every, source):
    """The graph run_job builds for a real input has the same tree (the call run_job makes)."""
    inp = make_input(m=m, chunk=7)
    if source == "dask":  # in-memory Dask arrays, chunked unlike batch_chunk
        import dask.array as da

        inp = {name: da.from_array(array, chunks=(3, 5, 4, 2)) for name, array in read_inputs(inp).items()}
    plan = plan_job(inp, tmp_path / "out.zarr", padding=1, batch_chunk=batch_chunk, split_every=split_every)
    graph = plan.graph()
    n_chunks = -(-m // batch_chunk)
    assert len(plan.bounds) == n_chunks
    assert_tree(graph, n_chunks, split_every)
    assert not (tmp_path / "out.zarr").exists(), "planning and building the graph must write nothing"


def test_tree_with_finished_chunks_keeps_its_shape(tmp_path):
    """Chunks an earlier run finished become loader tasks under the same keys; the tree is unchanged."""
    geometry = ConvParams.parse().resolve((3, 3), (2, 2))
    out = OutputStore(str(tmp_path / "o.zarr"))
    finished = [i % 3 == 0 for i in range(11)]

    def build(done):
        return backward_graph(
            [None] * 11, [None] * 11, np.zeros((2, 2, 1, 1)), geometry, out, batch_bounds(11, 1),
            JobOptions(split_every=3), finished=done,
        )

    resumed, fresh = build(finished), build(None)
    assert set(dict(resumed.__dask_graph__())) == set(dict(fresh.__dask_graph__()))
    assert_tree(resumed, 11, 3)
    chunks, _, deps, _ = tree_structure(resumed)
    for key in chunks:
        # a loader reads its partial back from the store: it needs neither W nor input blocks
        assert (len(deps[key]) == 0) == finished[key[1]], (key, deps[key])


@pytest.mark.parametrize("n_leaves, split_every", [(1, 2), (5, 2), (13, 3), (30, 4), (100, 8)])
def test_tree_reduce_adds_in_chunk_order(n_leaves, split_every):
    """combine_partials concatenates tuple-valued stats, so the final stats spell the summation order."""
    leaves = [
        dask.delayed(Partial, pure=True)({"dW": np.full((1,), float(i)), "db": np.full((1,), 1.0)}, {"order": (i,)})
        for i in range(n_leaves)
    ]
    total = tree_reduce(leaves, split_every, token=f"order-{n_leaves}-{split_every}").compute(scheduler="sync")
    assert total.stats["order"] == tuple(range(n_leaves))
    assert total.sums["dW"].tolist() == [float(sum(range(n_leaves)))]
    assert total.sums["db"].tolist() == [float(n_leaves)]


def test_combine_partials_does_not_modify_its_inputs():
    first = Partial({"dW": np.ones((2, 2)), "db": np.ones(2), "count": 3}, {"kernel": 1.0})
    second = Partial({"dW": np.full((2, 2), 2.0), "db": np.full(2, 2.0), "count": 4}, {"kernel": 0.5, "write": 0.25})
    total = combine_partials([first, second])
    np.testing.assert_array_equal(total.sums["dW"], np.full((2, 2), 3.0))
    np.testing.assert_array_equal(total.sums["db"], np.full(2, 3.0))
    assert total.sums["count"] == 7
    assert total.stats == {"kernel": 1.5, "write": 0.25}
    np.testing.assert_array_equal(first.sums["dW"], np.ones((2, 2)))
    assert first.sums["count"] == 3 and first.stats == {"kernel": 1.0}


def test_combine_partials_adds_the_simd_counts_level_by_level():
    """Each chunk reports {level: 1}; a combine adds the counts of every level, inputs untouched."""
    leaves = [Partial({"dW": np.zeros(1)}, {"simd": {level: 1}}) for level in ("avx2", "numpy", "avx2")]
    assert combine_partials(leaves).stats["simd"] == {"avx2": 2, "numpy": 1}
    total = tree_reduce([dask.delayed(leaf) for leaf in leaves * 5], 2, token="simd-counts").compute(scheduler="sync")
    assert total.stats["simd"] == {"avx2": 10, "numpy": 5}
    assert [leaf.stats for leaf in leaves] == [{"simd": {"avx2": 1}}, {"simd": {"numpy": 1}}, {"simd": {"avx2": 1}}]


@pytest.mark.parametrize("n_leaves", [1, 2, 3, 8, 9, 27, 28, 125, 243, 1000, 4096, 4097])
@pytest.mark.parametrize("split_every", [2, 3, 5, 8, 10, 16])
def test_tree_depth_is_exact(n_leaves, split_every):
    """No float rounding: log(125, 5) is 3.0000000000000004 in floating point."""
    assert tree_depth(n_leaves, split_every) == expected_depth(n_leaves, split_every)


@pytest.mark.parametrize(
    "m, batch_chunk, bounds",
    [
        (10, 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
        (9, 3, [(0, 3), (3, 6), (6, 9)]),
        (2, 5, [(0, 2)]),
        (1, 1, [(0, 1)]),
        (4, np.int64(2), [(0, 2), (2, 4)]),
    ],
)
def test_batch_bounds(m, batch_chunk, bounds):
    assert batch_bounds(m, batch_chunk) == bounds


@pytest.mark.parametrize("batch_chunk", [0, -1, 2.0, True, "4", None])
def test_batch_bounds_rejects(batch_chunk):
    with pytest.raises(InputError, match="batch_chunk must be an int >= 1"):
        batch_bounds(10, batch_chunk)


@pytest.mark.parametrize("value, expected", [(2, 2), (np.int32(5), 5), (64, 64)])
def test_split_every_is_normalised_once_in_the_options(value, expected):
    result = JobOptions(split_every=value).split_every
    assert result == expected and type(result) is int
    assert JobOptions().split_every == 8


@pytest.mark.parametrize("value", [1, 0, -3, 2.0, True, "8", None])
def test_split_every_rejects(value):
    with pytest.raises(InputError, match="split_every must be an int >= 2"):
        JobOptions(split_every=value)


@pytest.mark.parametrize("n_chunks, split_every", [(1, 2), (7, 2), (9, 3), (65, 8), (5, 16)])
def test_the_graph_is_built_along_tree_shape(n_chunks, split_every, tmp_path):
    """Every combine task adds exactly the nodes tree_shape gives it, level by level (their order: the test above)."""
    graph = synthetic_graph(n_chunks, split_every, tmp_path)
    chunks, combines, deps, _ = tree_structure(graph)
    below = sorted(chunks, key=lambda key: key[1])
    for depth, groups in enumerate(tree_shape(n_chunks, split_every)):
        level = sorted((k for k in combines if key_name(k).startswith(f"{COMBINE_PREFIX}-{depth}-")), key=lambda k: k[1])
        assert len(level) == len(groups)
        for key, group in zip(level, groups):
            assert deps[key] == {below[i] for i in group}, (depth, key)
        below = level
    assert below == [graph.key]


def test_graph_keys_are_deterministic_and_depend_on_the_output(tmp_path):
    """Same job, same keys (pure tasks); another output store, other keys (no collision between jobs)."""
    one, two = synthetic_graph(6, 2, tmp_path), synthetic_graph(6, 2, tmp_path)
    assert set(dict(one.__dask_graph__())) == set(dict(two.__dask_graph__()))
    (tmp_path / "other").mkdir()
    other = synthetic_graph(6, 2, tmp_path / "other")
    assert not set(dict(one.__dask_graph__())) & set(dict(other.__dask_graph__()))

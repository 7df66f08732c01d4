"""dconv.graph and dconv.waves: batch chunks, the dW/db reduction tree as Dask tasks, the order of its sums, waves.

The tree is checked on the graph itself, as dask's tests/test_reductions.py::test_tree_reduce_depth
does: walk ``__dask_graph__()`` and count dependencies, never trust the key names for the structure.
"""

from __future__ import annotations

import pickle

import dask
import numpy as np
import pytest
from dask.core import get_dependencies
from dask.task_spec import DataNode

from dconv import InputError
from dconv.graph import CHUNK_PREFIX, COMBINE_PREFIX, JobContext, Partial, backward_graph, combine_partials
from dconv.statistics import top_samples
from dconv.options import JobOptions
from dconv.params import ConvParams
from dconv.plan import plan_job
from dconv.sources import batch_bounds
from dconv.store import OutputStore
from dconv.store.output import LEVEL_CODES, level_code, level_counts
from dconv.tree import children, level_width, tree_height, tree_nodes

from _pipeline import read_inputs


def key_name(key) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


def is_tree_key(key) -> bool:
    return key_name(key).startswith((CHUNK_PREFIX, COMBINE_PREFIX))


def tree_structure(graph):
    """(chunk keys, combine keys, dependencies of every key, dependents of every key), over the tree's
    keys only: every task also depends on the shared context, and a chunk on its Dask blocks if any."""
    dsk = dict(graph.__dask_graph__())
    deps = {key: {dep for dep in get_dependencies(dsk, key) if is_tree_key(dep)} for key in dsk}
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
    """backward_graph over n_chunks chunks of one sample each, as one Dask graph; built, never computed."""
    return synthetic_job(n_chunks, split_every, tmp_path).to_delayed()


def synthetic_job(n_chunks: int, split_every: int, tmp_path, stored=None, wave_chunks: int = 4096):
    geometry = ConvParams.parse(1, 0, 1).resolve((3, 3), (2, 2))
    return backward_graph(
        None,
        None,
        np.zeros((2, 2, 1, 1)),
        geometry,
        OutputStore(str(tmp_path / "never-written.zarr")),
        batch_bounds(n_chunks, 1),
        JobOptions(split_every=split_every),
        stored=stored,
        wave_chunks=wave_chunks,
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
    # One root; every chunk is ceil(log(n, split_every)) combine levels below it: the tree's height.
    roots = [k for k in combines if not dependents[k]]
    assert roots == [graph.key]
    assert combine_depth(graph.key, deps, combines_set) == {tree_height(n_chunks, split_every)}
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
    graph = plan.graph().to_delayed()
    n_chunks = -(-m // batch_chunk)
    assert len(plan.bounds) == n_chunks
    assert_tree(graph, n_chunks, split_every)
    assert not (tmp_path / "out.zarr").exists(), "planning and building the graph must write nothing"


@pytest.mark.parametrize(
    "n_chunks, split_every, stored",
    [(11, 3, [(1, 0), (0, 4), (0, 9)]), (27, 3, [(2, 1)]), (40, 2, [(3, 0), (2, 3), (1, 9), (0, 39)]), (5, 8, [(1, 0)])],
)
def test_a_stored_frontier_replaces_the_subtrees_under_it(tmp_path, n_chunks, split_every, stored):
    """A stored node is one task, under its own key, that reads its record back (it depends on the
    context alone); what it covers is gone from the graph, and every other task is unchanged."""
    fresh = dict(synthetic_graph(n_chunks, split_every, tmp_path).__dask_graph__())
    job = synthetic_job(n_chunks, split_every, tmp_path, stored=stored)
    resumed = dict(job.to_delayed().__dask_graph__())
    below = set()
    for depth, index in stored:
        for d in range(depth):
            width = split_every ** (depth - d)
            below |= {job.key((d, i)) for i in range(index * width, (index + 1) * width)}
    assert set(resumed) == set(fresh) - below
    for key, task in resumed.items():
        if key in {job.key(node) for node in stored}:
            assert task.func.__name__ == "read_stored_node" and task.dependencies == {job.context_key}
        elif is_tree_key(key):
            assert task.func is fresh[key].func, key
    chunks = n_chunks - sum(len(range(i * split_every**d, min((i + 1) * split_every**d, n_chunks))) for d, i in stored)
    assert job.chunks_to_compute() == chunks


def test_chunk_tasks_carry_only_small_arguments(make_input, tmp_path):
    """W, the geometry, the output and the options are one shared key, fetched once per worker; a chunk
    task is its index and samples."""
    inp = make_input(m=64, chunk=1, height=8, width=8, in_channels=4, out_channels=4)
    plan = plan_job(inp, tmp_path / "out.zarr", batch_chunk=1)
    job = plan.graph()
    dsk = dict(job.to_delayed().__dask_graph__())
    chunks = [task for key, task in dsk.items() if key_name(key).startswith(CHUNK_PREFIX)]
    assert len(chunks) == 64
    for task in chunks:
        assert task.dependencies == {job.context_key}
        assert len(pickle.dumps(task)) < 400, len(pickle.dumps(task))
    assert isinstance(dsk[job.context_key].value, JobContext)
    assert len(pickle.dumps(dsk[job.context_key])) > 1000  # the zarr arrays and the output: once


def test_batch_bounds_hold_two_numbers_whatever_the_chunks():
    bounds = batch_bounds(10**9, 3)
    assert len(bounds) == 333_333_334 and bounds[-1] == (999_999_999, 10**9) and bounds[1] == (3, 6)
    assert bounds[2:4] == [(6, 9), (9, 12)] and len(pickle.dumps(bounds)) < 200
    with pytest.raises(IndexError, match="chunk index must be in"):
        bounds[333_333_334]


@pytest.mark.parametrize("n_chunks, split_every", [(1, 2), (5, 2), (13, 3), (30, 4), (100, 8)])
def test_the_graph_adds_in_chunk_order(n_chunks, split_every, tmp_path):
    """Every combine task is given its children's partials in chunk order (combine_partials adds them
    in the order given), and computing the graph's combines concatenates the chunks' levels in chunk order."""
    job = synthetic_job(n_chunks, split_every, tmp_path)
    dsk = dict(job.to_delayed().__dask_graph__())
    for key, task in dsk.items():
        if key_name(key).startswith(COMBINE_PREFIX):
            node = task.args[1:3]
            expected = [job.key(child) for child in children(node, n_chunks, split_every)]
            assert [ref.key for ref in task.args[3].args] == expected
    # the graph's own combine tasks (they write their records under tmp_path), over leaves that spell their chunk
    leaves = {
        job.key((0, i)): DataNode(job.key((0, i)), Partial({"dW": np.full(1, float(i))}, {}, np.uint8([i % 7])))
        for i in range(n_chunks)
    }
    total = dask.get({**dsk, **leaves}, job.key(job.root))
    assert total.levels.tolist() == [i % 7 for i in range(n_chunks)]
    assert total.reduced["dW"].tolist() == [float(sum(range(n_chunks)))]


def test_combine_partials_does_not_modify_its_inputs():
    first = Partial({"dW": np.ones((2, 2)), "db": np.ones(2), "count": 3}, {"kernel": 1.0})
    second = Partial({"dW": np.full((2, 2), 2.0), "db": np.full(2, 2.0), "count": 4}, {"kernel": 0.5, "write": 0.25})
    total = combine_partials([first, second])
    np.testing.assert_array_equal(total.reduced["dW"], np.full((2, 2), 3.0))
    np.testing.assert_array_equal(total.reduced["db"], np.full(2, 3.0))
    assert total.reduced["count"] == 7
    assert total.seconds == {"kernel": 1.5, "write": 0.25}
    np.testing.assert_array_equal(first.reduced["dW"], np.ones((2, 2)))
    assert first.reduced["count"] == 3 and first.seconds == {"kernel": 1.0}


def test_combine_partials_merges_the_top_samples_of_statistics_partials():
    """The top samples are merged by their own combine (the layout's), not added: no layout is needed."""
    rng = np.random.default_rng(3)
    norms = [rng.random(6) for _ in range(3)]
    leaves = [
        Partial({"stats/dW_sq": np.full(2, 1.0), "stats/top_samples": top_samples(norm, 6 * i)}, {})
        for i, norm in enumerate(norms)
    ]
    total = combine_partials(leaves)
    assert total.reduced["stats/dW_sq"].tolist() == [3.0, 3.0]
    assert total.reduced["stats/top_samples"].tobytes() == top_samples(np.concatenate(norms), 0).tobytes()


def test_combine_partials_concatenates_the_level_codes():
    """Each chunk carries its level code; a combine concatenates them in chunk order, inputs untouched."""
    codes = {name: np.array([level_code(name)], dtype=np.uint8) for name in ("avx2", "numpy")}
    leaves = [Partial({"dW": np.zeros(1)}, {}, codes[level]) for level in ("avx2", "numpy", "avx2")]
    assert level_counts(combine_partials(leaves).levels) == {"avx2": 2, "numpy": 1}
    total = combine_partials([combine_partials(leaves[:2]), combine_partials(leaves[2:] * 3)])
    assert total.levels.tolist() == [LEVEL_CODES.index(level) for level in ("avx2", "numpy", "avx2", "avx2", "avx2")]
    assert level_counts(total.levels) == {"avx2": 4, "numpy": 1}
    assert [leaf.levels.tolist() for leaf in leaves] == [codes[level].tolist() for level in ("avx2", "numpy", "avx2")]


@pytest.mark.parametrize("n_chunks, split_every", [(1, 2), (7, 2), (9, 3), (65, 8), (5, 16)])
def test_the_graph_is_built_along_the_tree(n_chunks, split_every, tmp_path):
    """Every combine task adds exactly the children dconv.tree gives its node (their order: the test above)."""
    job = synthetic_job(n_chunks, split_every, tmp_path)
    graph = job.to_delayed()
    chunks, combines, deps, _ = tree_structure(graph)
    assert len(combines) == tree_nodes(n_chunks, split_every) - n_chunks
    for depth in range(1, tree_height(n_chunks, split_every) + 1):
        for index in range(level_width(depth, n_chunks, split_every)):
            below = {job.key(child) for child in children((depth, index), n_chunks, split_every)}
            assert deps[job.key((depth, index))] == below, (depth, index)


def test_graph_keys_are_deterministic_and_depend_on_the_output(tmp_path):
    """Same job, same keys (pure tasks); another output store, other keys (no collision between jobs)."""
    one, two = synthetic_graph(6, 2, tmp_path), synthetic_graph(6, 2, tmp_path)
    assert set(dict(one.__dask_graph__())) == set(dict(two.__dask_graph__()))
    (tmp_path / "other").mkdir()
    other = synthetic_graph(6, 2, tmp_path / "other")
    assert not set(dict(one.__dask_graph__())) & set(dict(other.__dask_graph__()))

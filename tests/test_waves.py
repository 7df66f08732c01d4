"""dconv.waves: the tree submitted as whole subtrees, each task once, and how deep a wave goes."""

from __future__ import annotations

import pytest

from dconv.waves import Waves, choose_wave_depth

from test_graph import synthetic_job


@pytest.mark.parametrize("stored", [[], [(1, 0), (0, 4), (2, 1), (0, 40)]])
@pytest.mark.parametrize("wave_chunks, depth", [(1, 1), (3, 1), (9, 2), (26, 2), (27, 3), (81, 4), (4096, 4)])
def test_waves_cover_the_tree_once(tmp_path, stored, wave_chunks, depth):
    """The waves (subtrees at the wave depth, in chunk order) and the combines above them are exactly the
    tree's tasks, each once; every combine above the waves adds at most split_every children."""
    n_chunks, split_every = 41, 3
    job = synthetic_job(n_chunks, split_every, tmp_path, stored=stored, wave_chunks=wave_chunks)
    assert Waves(job).depth == depth
    whole = dict(job.to_delayed().__dask_graph__())
    waves, combines = Waves(job).split()
    assert all(node[0] == depth for node in waves) or waves == [job.root]
    assert [index for _, index in waves] == sorted(index for _, index in waves)
    keys = [key for node in waves for key in job.subtree(node)]
    keys += [job.key(node) for node in combines] + [job.key(node) for node in stored if node[0] >= depth]
    assert len(keys) == len(set(keys)) and set(keys) | {job.context_key} == set(whole)
    for node, children in combines.items():
        assert 1 <= len(children) <= split_every and children == job.children(node)


@pytest.mark.parametrize(
    "n_chunks, split_every, nbytes, expected",
    [(10**6, 8, 8, 2), (10**6, 2, 8, 8), (10**6, 3, 8, 5), (10**6, 16, 8, 2), (10**6, 8, 18_900_000, 1),
     (10**6, 2, 18_900_000, 5), (100, 8, 8, 2), (1, 8, 8, 1), (8, 8, 8, 1)],
)
def test_wave_depth(n_chunks, split_every, nbytes, expected):
    """As many chunks as WAVE_CHUNKS (256) allow, fewer when their partials pass 1 GiB; at most the tree."""
    assert choose_wave_depth(n_chunks, split_every, nbytes) == expected

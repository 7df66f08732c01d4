"""dconv.store.records: the tree-node records of a running job, and the frontier they leave."""

from __future__ import annotations

import numpy as np
import pytest

from dconv.store.records import RecordStore
from dconv.tree import covered, frontier


def test_frontier_is_the_maximal_stored_nodes_in_chunk_order():
    # 20 chunks, fan-in 4: depth 1 has 5 nodes, depth 2 two, depth 3 the root
    stored = {(0, 0), (0, 1), (1, 0), (0, 5), (2, 1), (1, 4), (0, 19), (0, 8), (3, 0), (5, 0), (0, 99)}
    assert frontier(stored - {(3, 0)}, 20, 4) == [(1, 0), (0, 5), (0, 8), (2, 1)]
    assert frontier(stored, 20, 4) == [(3, 0)]  # the root covers everything
    assert frontier(set(), 20, 4) == []
    mask = covered(frontier(stored - {(3, 0)}, 20, 4), 20, 4)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3, 5, 8, *range(16, 20)]


def test_a_record_round_trips_and_is_a_plain_npy(tmp_path):
    records = RecordStore(str(tmp_path / "out.zarr"))
    sums = {"dW": np.arange(24.0).reshape(1, 2, 3, 4), "db": np.array([1.5, -2.0]), "nonfinite_dA_prev": np.int64(7)}
    records.write((2, 3), sums, np.array([1, 2, 3], dtype=np.uint8))
    arrays, levels = records.read((2, 3))
    assert levels.tolist() == [1, 2, 3]
    assert set(arrays) == set(sums)
    for name, value in sums.items():
        assert arrays[name].dtype == np.asarray(value).dtype and arrays[name].tobytes() == np.asarray(value).tobytes()
    assert records.read_levels((2, 3), 3).tolist() == [1, 2, 3]
    path = tmp_path / "out.zarr" / "_progress" / "tree" / "2-3.npy"
    assert np.load(path)[0]["db"].tolist() == [1.5, -2.0]  # readable without dconv
    assert [p.name for p in path.parent.iterdir()] == ["2-3.npy"]  # no temporary file left


def test_listing_ignores_foreign_files_and_deleting_ignores_missing_ones(tmp_path):
    records = RecordStore(str(tmp_path / "out.zarr"))
    assert records.list() == set()
    for node in [(0, 0), (0, 1), (1, 0)]:
        records.write(node, {"db": np.zeros(2)}, [1] * (1 if node[0] == 0 else 2))
    directory = tmp_path / "out.zarr" / "_progress" / "tree"
    (directory / ".half-written.tmp").write_bytes(b"x")
    (directory / "notes.txt").write_text("x")
    assert records.list() == {(0, 0), (0, 1), (1, 0)}
    records.delete([(0, 0), (0, 1), (0, 2)])
    assert records.list() == {(1, 0)}
    with pytest.raises(FileNotFoundError):
        records.read((0, 0))
    records.remove_all()
    assert not directory.exists() and records.list() == set()

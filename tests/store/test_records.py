"""dconv.store.records: the tree-node records of a running job, and the frontier they leave."""

from __future__ import annotations

import numpy as np
import pytest

from dconv.store.records import HEAD_BYTES, RecordStore


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
    records.delete([(0, 2), (0, 0), (0, 1)])  # the missing one first: the others are deleted all the same
    assert records.list() == {(1, 0)}
    with pytest.raises(FileNotFoundError):
        records.read((0, 0))
    records.remove_all()
    assert not directory.exists() and records.list() == set()


@pytest.mark.parametrize("location", ["local", "memory"])
def test_records_on_a_local_disk_and_on_an_fsspec_store_behave_alike(tmp_path, location):
    url = str(tmp_path / "out.zarr") if location == "local" else f"memory://records-{tmp_path.name}/out.zarr"
    records = RecordStore(url)
    for node in [(0, 0), (0, 1), (1, 0)]:
        records.write(node, {"db": np.full(2, float(node[1]))}, [2] * (1 if node[0] == 0 else 2))
    assert records.list() == {(0, 0), (0, 1), (1, 0)}
    assert records.read((0, 1))[0]["db"].tolist() == [1.0, 1.0] and records.read_levels((1, 0), 2).tolist() == [2, 2]
    records.delete([(0, 5), (0, 0), (0, 1)])
    assert records.list() == {(1, 0)}
    records.remove_all()
    assert records.list() == set()


def test_levels_are_read_after_a_header_longer_than_the_first_read(tmp_path):
    """A record of many partials has a header longer than HEAD_BYTES: its level codes are still found."""
    records = RecordStore(str(tmp_path / "out.zarr"))
    arrays = {f"stats/partial_number_{i}": np.full(3, float(i)) for i in range(40)}
    records.write((1, 0), arrays, np.arange(7, dtype=np.uint8))
    path = tmp_path / "out.zarr" / "_progress" / "tree" / "1-0.npy"
    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        np.lib.format.read_array_header_1_0(file)
        assert file.tell() > HEAD_BYTES
    assert records.read_levels((1, 0), 7).tolist() == list(range(7))
    assert records.read((1, 0))[0]["stats/partial_number_39"].tolist() == [39.0] * 3

"""dconv.sources: one interface for the two kinds of input source, and a chunk's block from either."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from dconv import InputError
from dconv.plan import plan_job
from dconv.sources import DaskBatches, ZarrBatches, batch_bounds, batch_sources

from _pipeline import read_inputs


@pytest.mark.parametrize("kind", ["zarr", "dask"])
def test_each_source_gives_a_task_its_block_as_a_key_or_to_read(make_input, kind):
    """A Zarr source: no key, no tasks, the task reads rows start:stop. A Dask source: block i's key,
    the tasks that make exactly the blocks asked for, and block i computed here."""
    path = make_input(m=20, chunk=7)
    array = zarr.open_group(path, mode="r")["dZ"]
    bounds = batch_bounds(20, 6)
    source = batch_sources(array if kind == "zarr" else da.from_array(array[...], chunks=5), "dZ", bounds)
    assert isinstance(source, ZarrBatches if kind == "zarr" else DaskBatches)
    start, stop = bounds[3]
    if kind == "zarr":
        assert source.block_key(3) is None and source.block_tasks([0, 3]) == {} and source.block(3) is None
        assert source.reader is source and source.read(start, stop).tobytes() == array[start:stop].tobytes()
    else:
        assert source.reader is None and source.block(3).tobytes() == array[start:stop].tobytes()
        tasks = source.block_tasks([3])
        assert source.block_key(3) in tasks and source.block_key(0) not in tasks


def test_a_chunk_run_here_gives_the_same_bits_from_zarr_and_from_dask(make_input, tmp_path):
    path = make_input(m=20, chunk=7)
    arrays = {name: da.from_array(value, chunks=(3, 8, 8, 2)) for name, value in read_inputs(path).items()}
    partials = []
    for name, inputs in (("zarr", path), ("dask", arrays)):
        plan = plan_job(inputs, tmp_path / f"{name}.zarr", padding=1, batch_chunk=6)
        plan.open_output()
        partials.append(plan.run_chunk(2))
    from_zarr, from_dask = partials
    assert set(from_zarr.reduced) == set(from_dask.reduced)
    for entry, value in from_zarr.reduced.items():
        assert np.asarray(value).tobytes() == np.asarray(from_dask.reduced[entry]).tobytes(), entry


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

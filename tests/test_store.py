"""dconv.store: the input layout make_inputs writes, the output layout a job leaves, provenance,
and "complete" as the last write of a job."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from dask.callbacks import Callback
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

import dconv
from dconv import InputError
from dconv.job import plan_job, prepare_output, run_job
from dconv.store import DIMENSIONS, _reads_whole_chunks, open_inputs, public_location, read_batch, store_exists

from _pipeline import kernel_gradients, provenance, read_inputs, read_output


@pytest.fixture
def finished_job(make_input, tmp_path):
    """A complete float32 job: m=11 in 3 chunks of 4, stride 2, "same" padding."""
    inp = make_input(m=11, chunk=5, dtype="float32", height=7, width=6, kernel=(3, 2), stride=2, padding="same")
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(inp, out, batch_chunk=4, split_every=2, scheduler="threads")
    return inp, out, result


def test_output_layout(finished_job):
    inp, out, _ = finished_job
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 3
    expected = {
        "dA_prev": ((11, 7, 6, 3), (4, 7, 6, 3)),
        "dW": ((3, 2, 3, 4), (3, 2, 3, 4)),
        "db": ((1, 1, 1, 4), (1, 1, 1, 4)),
    }
    for name, (shape, chunks) in expected.items():
        array = group[name]
        assert (array.shape, array.chunks, array.dtype) == (shape, chunks, np.dtype("float32")), name
        assert tuple(array.metadata.dimension_names) == DIMENSIONS[name]
    assert group["_progress/done"][:].tolist() == [1, 1, 1]
    partials = group["_progress/dW_partial"][:]
    assert partials.shape == (3, 3, 2, 3, 4) and partials.dtype == np.float64
    # the partials add up (in float64) to the reduced dW
    np.testing.assert_allclose(partials.sum(axis=0).astype(np.float32), group["dW"][...], rtol=1e-6)
    np.testing.assert_allclose(group["_progress/db_partial"][:].sum(axis=0), group["db"][...].ravel(), rtol=1e-6)
    assert group["_progress/nonfinite"][:].tolist() == [0, 0, 0]


def test_every_dA_prev_block_is_stored_zeros_included(make_input, tmp_path):
    """A block of zeros (dZ = 0) is written like any other: a reader sees every chunk the job made."""
    inp = make_input(m=9, chunk=4, padding=1)
    zarr.open_group(inp, mode="r+")["dZ"][...] = 0
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=4, scheduler="threads")
    dA_prev = zarr.open_group(str(out), mode="r")["dA_prev"]
    assert dA_prev.nchunks_initialized == 3
    assert not dA_prev[...].any()


def test_output_provenance(finished_job):
    inp, out, result = finished_job
    stored = provenance(out)
    assert stored["status"] == "complete"
    assert stored["input"] == inp
    assert stored["params"] == {"stride": [2, 2], "padding": "same", "dilation": [1, 1]}
    assert stored["pads"] == [[1, 1], [0, 0]]  # (4-1)*2+3-7 = 2 rows, (3-1)*2+2-6 = 0 columns
    assert stored["shapes"] == {"A_prev": [11, 7, 6, 3], "dZ": [11, 4, 3, 4], "W": [3, 2, 3, 4]}
    assert stored["dtypes"] == {"A_prev": "float32", "dZ": "float32", "W": "float32", "compute": "float32"}
    assert (stored["batch_chunk"], stored["split_every"], stored["n_chunks"]) == (4, 2, 3)
    assert stored["nonfinite"] == {"dA_prev": 0, "dW": 0, "db": 0}
    assert set(stored["versions"]) == {"dconv", "numpy", "dask", "zarr"}
    assert {"started", "finished", "seconds", "fingerprint"} <= set(stored)
    assert result.out == str(out)


def test_complete_is_the_last_write(make_input, tmp_path):
    """While any task runs the output says "running" and dW is not written; "complete" comes after."""
    inp = make_input(m=9, chunk=4, padding=1)
    out = tmp_path / "out.zarr"
    seen = []

    class Watch(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            group = zarr.open_group(str(out), mode="r")
            seen.append((group.attrs["dconv"]["status"], bool(np.any(group["dW"][...]))))

    plan = plan_job(inp, out, batch_chunk=2, split_every=2)
    with Watch():
        run_job(plan, scheduler="synchronous")
    assert len(seen) >= 5 + 4  # 5 chunk tasks and at least 4 combines
    assert set(seen) == {("running", False)}
    assert provenance(out)["status"] == "complete"
    assert_all = read_output(out)
    np.testing.assert_allclose(assert_all["dW"], kernel_gradients(read_inputs(inp), padding=1).dW, rtol=1e-12)


def test_open_result_refuses_an_unfinished_output(make_input, tmp_path):
    inp = make_input(m=6)
    out = tmp_path / "out.zarr"
    prepare_output(plan_job(inp, out, batch_chunk=2))
    with pytest.raises(InputError, match="status 'running'"):
        dconv.open_result(str(out))
    group = dconv.open_result(str(out), allow_incomplete=True)
    assert group["_progress/done"][:].tolist() == [0, 0, 0]


@pytest.mark.parametrize("make", ["missing", "plain_group"])
def test_open_result_refuses_non_outputs(tmp_path, make):
    path = tmp_path / "x.zarr"
    if make == "plain_group":
        zarr.create_group(store=str(path), zarr_format=3)
    with pytest.raises(InputError):
        dconv.open_result(str(path))


# --------------------------------------------------------------------------- make_inputs


def test_make_inputs_layout_and_hparameters(tmp_path):
    path = str(tmp_path / "in.zarr")
    dconv.make_inputs(
        path, m=10, height=9, width=7, in_channels=2, out_channels=3, kernel=(3, 2),
        stride=(2, 1), padding=((0, 2), (1, 0)), dilation=(1, 2), dtype="float64", chunk=4, seed=1,
    )
    group = zarr.open_group(path, mode="r")
    assert group["A_prev"].shape == (10, 9, 7, 2) and group["A_prev"].chunks == (4, 9, 7, 2)
    # (9 + 2 - 3) // 2 + 1 = 5 rows; (7 + 1 - 3) // 1 + 1 = 6 columns (dilated width 3)
    assert group["dZ"].shape == (10, 5, 6, 3) and group["dZ"].chunks == (4, 5, 6, 3)
    assert group["W"].shape == (3, 2, 2, 3) and group["b"].shape == (1, 1, 1, 3)
    for name in ("A_prev", "dZ", "W", "b"):
        assert group[name].dtype == np.float64
        assert tuple(group[name].metadata.dimension_names) == DIMENSIONS[name]
    assert dict(group.attrs["hparameters"]) == {"stride": [2, 1], "pad": [[0, 2], [1, 0]], "dilation": [1, 2]}
    opened = open_inputs(path)
    assert opened.location == path and opened.b is not None
    assert opened.hparameters == {"stride": [2, 1], "pad": [[0, 2], [1, 0]], "dilation": [1, 2]}


def test_make_inputs_is_seeded(tmp_path):
    kwargs = dict(m=9, height=4, width=4, in_channels=2, out_channels=2, chunk=4)
    one = read_inputs(dconv.make_inputs(str(tmp_path / "a.zarr"), seed=3, **kwargs))
    same = read_inputs(dconv.make_inputs(str(tmp_path / "b.zarr"), seed=3, **kwargs))
    other = read_inputs(dconv.make_inputs(str(tmp_path / "c.zarr"), seed=4, **kwargs))
    for name in one:
        assert one[name].tobytes() == same[name].tobytes()
        assert one[name].tobytes() != other[name].tobytes()


def test_make_inputs_refuses_existing_path(tmp_path):
    path = str(tmp_path / "in.zarr")
    dconv.make_inputs(path, m=2, height=4, width=4, in_channels=1, out_channels=1, seed=1)
    before = read_inputs(path)
    with pytest.raises(InputError, match="already exists"):
        dconv.make_inputs(path, m=3, height=4, width=4, in_channels=1, out_channels=1, seed=2)
    assert read_inputs(path)["A_prev"].tobytes() == before["A_prev"].tobytes()
    dconv.make_inputs(path, m=3, height=4, width=4, in_channels=1, out_channels=1, seed=2, overwrite=True)
    assert read_inputs(path)["A_prev"].shape == (3, 4, 4, 1)


# --------------------------------------------------------------------------- locations


@pytest.mark.parametrize(
    "url, public",
    [
        ("s3://AKIA:secret@bucket/data/out.zarr?versionId=1#frag", "s3://bucket/data/out.zarr"),
        ("https://user:pw@example.org:8443/x.zarr", "https://example.org:8443/x.zarr"),
        ("memory://out.zarr", "memory://out.zarr"),
        ("/tmp/out.zarr", "/tmp/out.zarr"),
    ],
)
def test_public_location(url, public):
    assert public_location(url) == public


def test_public_location_of_a_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_location("relative/out.zarr") == str(tmp_path / "relative" / "out.zarr")


def test_store_exists(tmp_path):
    assert not store_exists(str(tmp_path / "nothing"))
    (tmp_path / "file").write_text("x")
    assert store_exists(str(tmp_path / "file"))
    assert store_exists(f"file://{tmp_path / 'file'}")
    assert not store_exists(f"file://{tmp_path / 'nothing'}")


# --------------------------------------------------------------------------- reading whole chunks

@pytest.mark.parametrize("store", ["local", "fsspec"])
@pytest.mark.parametrize("compressors", [None, "blosc"], ids=["raw", "blosc"])
@pytest.mark.parametrize("start, stop", [(0, 10), (4, 10), (8, 10), (0, 4), (4, 8)])
def test_whole_chunk_reads_match_zarr(tmp_path, store, compressors, start, stop):
    """Reads of whole chunks decode straight into the result; the last chunk is stored whole
    but only its rows inside the array come back, and a chunk never written reads as the fill value.
    Local chunk files are mapped; other stores (here fsspec's memory filesystem) fetch the chunks."""
    codec = BloscCodec(cname="lz4", shuffle="shuffle", typesize=4) if compressors else None
    url = str(tmp_path / "g.zarr") if store == "local" else f"memory://{tmp_path.name}/g.zarr"
    array = zarr.open_group(url, mode="w").create_array(
        "x", shape=(10, 3, 2), chunks=(4, 3, 2), dtype="float32", fill_value=-1.5, compressors=codec
    )
    values = np.arange(60, dtype=np.float32).reshape(10, 3, 2)
    array[:4] = values[:4]
    array[8:] = values[8:]  # chunk 1 (rows 4..7) is never written
    expected = values.copy()
    expected[4:8] = -1.5
    assert isinstance(array.store, LocalStore) == (store == "local")
    assert _reads_whole_chunks(array, start, stop)
    result = read_batch(array, "x", start, stop)
    assert result.dtype == np.float32 and result.flags.c_contiguous
    np.testing.assert_array_equal(result, expected[start:stop])
    np.testing.assert_array_equal(result, array[start:stop])


def test_reads_that_cut_chunks_or_use_other_codecs_go_through_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    blosc = group.create_array("b", shape=(10, 3), chunks=(4, 3), dtype="float64", compressors=BloscCodec())
    zstd = group.create_array("z", shape=(10, 3), chunks=(4, 3), dtype="float64")  # zarr's default: Zstd
    split = group.create_array("s", shape=(10, 3), chunks=(4, 2), dtype="float64", compressors=None)
    assert not _reads_whole_chunks(blosc, 1, 8)
    assert not _reads_whole_chunks(zstd, 0, 4)
    assert not _reads_whole_chunks(split, 0, 4)
    for array in (blosc, zstd, split):
        array[:] = np.arange(30.0).reshape(10, 3)
        np.testing.assert_array_equal(read_batch(array, "x", 1, 8), np.arange(30.0).reshape(10, 3)[1:8])


@pytest.mark.parametrize("compressors", [None, "blosc"], ids=["raw", "blosc"])
def test_whole_chunk_read_names_a_chunk_of_the_wrong_size(tmp_path, compressors):
    """A chunk file that holds another size than the chunk's (truncated, or written for
    another shape) is an InputError naming the chunk, never a partly filled result."""
    codec = BloscCodec(typesize=4) if compressors else None
    path = tmp_path / "g.zarr"
    array = zarr.open_group(str(path), mode="w").create_array(
        "x", shape=(8, 5), chunks=(4, 5), dtype="float32", compressors=codec
    )
    array[:] = np.ones((8, 5), dtype=np.float32)
    other = zarr.open_group(str(tmp_path / "h.zarr"), mode="w").create_array(
        "x", shape=(8, 4), chunks=(4, 4), dtype="float32", compressors=codec
    )
    other[:] = np.ones((8, 4), dtype=np.float32)
    (path / "x" / "c" / "1" / "0").write_bytes((tmp_path / "h.zarr" / "x" / "c" / "1" / "0").read_bytes())
    with pytest.raises(InputError, match=r"x chunk 1 \(along the first axis, samples 4..7\)"):
        read_batch(array, "x", 0, 8)

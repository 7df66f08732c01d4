"""dconv.store: the input layout make_inputs writes, the output layout a job leaves, provenance,
and "complete" as the last write of a job."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from dask.callbacks import Callback

import dconv
from dconv import InputError
from dconv.job import run_job
from dconv.plan import plan_job
from dconv.store import DIMENSIONS, LEVEL_CODES, OutputStore, open_inputs, public_location, store_exists

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
    # a complete output's bookkeeping: the chunks' SIMD levels in one array, and no records
    assert group["_progress/level"][:].tolist() == [LEVEL_CODES.index(_level())] * 3
    assert group["_progress/level"].nchunks == 1
    assert not (out / "_progress" / "tree").exists()
    bookkeeping = [path for path in (out / "_progress").rglob("*") if path.is_file()]
    assert len(bookkeeping) == 3, bookkeeping  # _progress/zarr.json, level/zarr.json, level/c/0


def _level():
    from dconv import simd

    return simd.active_level()


def test_keep_partials_keeps_the_records(make_input, tmp_path):
    """keep_partials=True leaves the tree's records; the chunks' partials add up (in float64) to dW and db."""
    inp = make_input(m=11, chunk=5, dtype="float32", height=7, width=6, kernel=(3, 2), stride=2, padding="same")
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=4, split_every=2, scheduler="threads", keep_partials=True)
    records = OutputStore(str(out)).records
    stored = records.list()
    assert (2, 0) in stored  # the root of a 3-chunk tree of fan-in 2
    leaves = [records.read((0, index))[0] for index in range(3) if (0, index) in stored]
    root, levels = records.read((2, 0))
    assert levels.tolist() == [LEVEL_CODES.index(_level())] * 3
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(root["dW"].astype(np.float32), group["dW"][...], rtol=1e-6)
    np.testing.assert_allclose(root["db"], group["db"][...].ravel(), rtol=1e-6)
    assert int(root["nonfinite_dA_prev"]) == 0
    if len(leaves) == 3:  # combines that keep partials keep their children too
        np.testing.assert_array_equal(sum(leaf["dW"] for leaf in leaves), root["dW"])


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
    plan_job(inp, out, batch_chunk=2).open_output()
    with pytest.raises(InputError, match="status 'running'"):
        dconv.open_result(str(out))
    dconv.open_result(str(out), allow_incomplete=True)
    assert OutputStore(str(out)).done_chunks().tolist() == [False, False, False]


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


@pytest.mark.parametrize("recipe", [dict(m=40, chunk=16), dict(m=9, chunk=16, stride=2, padding=1, dtype="float64")])
def test_recipe_metadata_is_what_make_inputs_writes(tmp_path, recipe):
    """The in-memory metadata of a recipe's group: the arrays make_inputs writes, as Zarr describes them."""
    from dconv.options import InputRecipe
    from dconv.store import recipe_metadata

    recipe = InputRecipe(height=8, width=8, in_channels=3, out_channels=4, **recipe)
    location = str(tmp_path / "in.zarr")
    planned = recipe_metadata(recipe, location)
    assert list(tmp_path.iterdir()) == []
    written = open_inputs(dconv.make_inputs(location, recipe))
    for name in ("A_prev", "dZ", "W"):
        ours, theirs = getattr(planned, name).metadata.to_dict(), getattr(written, name).metadata.to_dict()
        assert ours == theirs, name
    assert planned.hparameters == written.hparameters and planned.location == written.location

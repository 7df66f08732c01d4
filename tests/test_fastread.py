"""dconv.store.fastread: whole input chunks decoded straight into place, against zarr's own read.

The reader uses zarr's private API behind a feature check; these tests check that
it gives what zarr's public ``array[start:stop]`` gives, byte for byte, and that
with it switched off (``DCONV_FAST_READ=0``) or with the private API changed,
reads go through zarr and still name a corrupt chunk.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import numpy as np
import pytest
import zarr
import zarr.core.metadata
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from dconv import InputError
from dconv.store import fastread, inputs, read_batch
from dconv.store.fastread import _reads_whole_chunks

FILL = -1.5
READS = [(0, 4), (4, 8), (12, 14), (8, 14), (0, 14)]
"""One written chunk, one missing chunk, the partial last chunk alone, several chunks, all of them."""


@pytest.fixture
def reader(monkeypatch):
    """The fast reader on, its feature check passed, nothing logged yet; restored afterwards."""
    monkeypatch.delenv(fastread.FAST_READ_ENV, raising=False)
    monkeypatch.setattr(fastread, "_unavailable", None)
    monkeypatch.setattr(fastread, "_warned", False)
    return fastread


def make_array(url: str, dtype: str = "float32", compressors: str | None = "blosc", missing: str = "odd") -> zarr.Array:
    """A (14, 3, 2) array in chunks of 4 rows (the last holds 2), fill value -1.5;
    the chunks of indices ``missing`` ("odd": 1 and the partial last, "even": 0 and 2) are never written."""
    codec = BloscCodec(cname="lz4", shuffle="shuffle", typesize=np.dtype(dtype).itemsize) if compressors else None
    array = zarr.open_group(url, mode="w").create_array(
        "x", shape=(14, 3, 2), chunks=(4, 3, 2), dtype=dtype, fill_value=FILL, compressors=codec
    )
    values = np.arange(84, dtype=dtype).reshape(14, 3, 2)
    for chunk in (0, 2) if missing == "odd" else (1, 3):
        array[chunk * 4 : chunk * 4 + 4] = values[chunk * 4 : chunk * 4 + 4]
    return array


def store_url(tmp_path, store: str) -> str:
    return str(tmp_path / "g.zarr") if store == "local" else f"memory://{tmp_path.name}/g.zarr"


def assert_identical(result: np.ndarray, expected: np.ndarray) -> None:
    assert (result.dtype, result.shape) == (expected.dtype, expected.shape)
    assert result.tobytes() == expected.tobytes()


@pytest.mark.parametrize("missing", ["odd", "even"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("store", ["local", "fsspec"])
@pytest.mark.parametrize("compressors", [None, "blosc"], ids=["raw", "blosc"])
def test_fast_read_is_zarrs_public_read(reader, tmp_path, store, compressors, dtype, missing):
    """Byte for byte what ``array[start:stop]`` gives: one chunk or several, the partial last
    chunk (stored whole, only its rows inside the array come back), chunks never written
    (the fill value). Local chunk files are mapped; other stores (here fsspec's memory
    filesystem) fetch the chunks."""
    array = make_array(store_url(tmp_path, store), dtype, compressors, missing)
    assert isinstance(array.store, LocalStore) == (store == "local")
    for start, stop in READS:
        assert _reads_whole_chunks(array, start, stop)
        result = reader.read_rows(array, start, stop)
        assert result is not None and result.flags.c_contiguous
        assert_identical(result, np.asarray(array[start:stop]))
        assert_identical(read_batch(array, "x", start, stop), result)
    assert reader._unavailable is None and not reader._warned


def test_reads_that_cut_chunks_or_use_other_codecs_go_through_zarr(reader, tmp_path):
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
    assert reader.read_rows(zstd, 0, 4) is None


@pytest.mark.parametrize("value, on", [("0", False), (" 0 ", False), ("1", True), ("", True)])
def test_fast_read_env_switch(reader, tmp_path, monkeypatch, value, on):
    """``DCONV_FAST_READ=0`` sends every read through zarr's public API; anything else keeps the reader."""
    array = make_array(store_url(tmp_path, "local"))
    monkeypatch.setenv(fastread.FAST_READ_ENV, value)
    assert (reader.read_rows(array, 0, 14) is not None) == on
    assert_identical(read_batch(array, "x", 0, 14), np.asarray(array[0:14]))


def moved_sync(coro, *, loop):  # a stand-in for zarr.core.sync.sync with another signature
    raise AssertionError("unreachable: the reader's call lacks loop=")


@pytest.mark.parametrize(
    "name, stand_in, store",
    [("RegularChunkGrid", None, "local"), ("RegularChunkGrid", None, "fsspec"), ("sync", moved_sync, "fsspec")],
    ids=["class-gone-local", "class-gone-fsspec", "signature-changed"],
)
def test_changed_private_api_falls_back_to_zarr_and_says_so_once(
    reader, tmp_path, monkeypatch, caplog, name, stand_in, store
):
    """A private name of zarr that moved or changed (the reader then raises TypeError) turns
    the reader off for the process: reads go through zarr, and one WARNING says so."""
    array = make_array(store_url(tmp_path, store))
    original = getattr(fastread, name)
    monkeypatch.setattr(fastread, name, stand_in)
    with caplog.at_level(logging.WARNING, logger=fastread.__name__):
        for start, stop in READS:
            assert_identical(read_batch(array, "x", start, stop), np.asarray(array[start:stop]))
        monkeypatch.setattr(fastread, name, original)  # back, but the reader stays off in this process
        assert reader.read_rows(array, 0, 4) is None
    assert "TypeError" in reader._unavailable
    warnings = [r for r in caplog.records if r.name == fastread.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falls back to zarr's public read" in warnings[0].getMessage()


def load_fastread_copy(monkeypatch, change: str):
    """A fresh import of fastread (as another module, the real one untouched) against a zarr whose
    private API changed: ``zarr.core.sync`` gone, or ``ArrayV3Metadata.encode_chunk_key`` renamed."""
    spec = importlib.util.spec_from_file_location("dconv_fastread_copy", fastread.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    with pytest.MonkeyPatch.context() as zarr_changed:
        if change == "module-gone":
            zarr_changed.setitem(sys.modules, "zarr.core.sync", None)
        else:
            zarr_changed.delattr(zarr.core.metadata.ArrayV3Metadata, "encode_chunk_key")
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "change, reason", [("module-gone", "zarr.core.sync"), ("method-renamed", "ArrayV3Metadata.encode_chunk_key")]
)
def test_feature_check_at_import(tmp_path, monkeypatch, caplog, change, reason):
    """The feature check at import finds the changed private API: every read goes through
    zarr, and the first read says so, once."""
    copy = load_fastread_copy(monkeypatch, change)
    assert reason in copy._unavailable
    monkeypatch.setattr(inputs, "fastread", copy)
    array = make_array(store_url(tmp_path, "local"))
    with caplog.at_level(logging.WARNING):
        assert copy.read_rows(array, 0, 14) is None
        for start, stop in READS:
            assert_identical(read_batch(array, "x", start, stop), np.asarray(array[start:stop]))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()


@pytest.mark.parametrize("mode", ["fast", "off", "fallback"])
@pytest.mark.parametrize("corruption", ["wrong-size", "garbage"])
@pytest.mark.parametrize("compressors", [None, "blosc"], ids=["raw", "blosc"])
def test_corrupt_chunk_is_named(reader, tmp_path, monkeypatch, caplog, compressors, corruption, mode):
    """A chunk file that holds another size than the chunk's (truncated, or written for another
    shape) or garbage is an InputError naming the chunk, never a partly filled result: with the
    fast reader, through zarr (``DCONV_FAST_READ=0``), and after a fallback. A corrupt chunk
    never turns the fast reader off."""
    codec = BloscCodec(typesize=4) if compressors else None
    path = tmp_path / "g.zarr"
    array = zarr.open_group(str(path), mode="w").create_array(
        "x", shape=(8, 5), chunks=(4, 5), dtype="float32", compressors=codec
    )
    array[:] = np.ones((8, 5), dtype=np.float32)
    if corruption == "wrong-size":
        other = zarr.open_group(str(tmp_path / "h.zarr"), mode="w").create_array(
            "x", shape=(8, 4), chunks=(4, 4), dtype="float32", compressors=codec
        )
        other[:] = np.ones((8, 4), dtype=np.float32)
        data = (tmp_path / "h.zarr" / "x" / "c" / "1" / "0").read_bytes()
    else:
        data = np.random.default_rng(0).integers(0, 256, 77, dtype=np.uint8).tobytes()
    (path / "x" / "c" / "1" / "0").write_bytes(data)
    if mode == "off":
        monkeypatch.setenv(fastread.FAST_READ_ENV, "0")
    elif mode == "fallback":
        monkeypatch.setattr(fastread, "RegularChunkGrid", None)
    with caplog.at_level(logging.WARNING, logger=fastread.__name__):
        with pytest.raises(InputError, match=r"x chunk 1 \(along the first axis, samples 4..7\)"):
            read_batch(array, "x", 0, 8)
    assert (reader._unavailable is None) == (mode != "fallback")
    assert len(caplog.records) == (mode == "fallback")


def test_job_is_bitwise_the_same_with_the_fast_reader_off(reader, tmp_path, monkeypatch):
    """A small job through zarr's public read (``DCONV_FAST_READ=0``) writes the same bits as with the
    fast reader, which only the first run used."""
    import dconv
    from dconv.store import make_inputs, open_result

    url = make_inputs(str(tmp_path / "in.zarr"), m=12, height=6, width=5, in_channels=3, out_channels=4, chunk=4)
    plans = []
    plan = fastread._plan
    monkeypatch.setattr(fastread, "_plan", lambda *args: plans.append(args) or plan(*args))
    outputs = {}
    for value in ("1", "0"):
        monkeypatch.setenv(fastread.FAST_READ_ENV, value)
        before = len(plans)
        out = str(tmp_path / f"out-{value}.zarr")
        dconv.backward_job(url, out, batch_chunk=4, scheduler="threads")
        group = open_result(out)
        outputs[value] = {name: np.asarray(group[name][...]) for name in ("dA_prev", "dW", "db")}
        assert (len(plans) > before) == (value == "1")
    for name, fast in outputs["1"].items():
        assert_identical(outputs["0"][name], fast)

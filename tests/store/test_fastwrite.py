"""dconv.store.fastwrite: whole uncompressed chunks written from the block's memory, against zarr's own write.

Every test compares the files: the store the fast writer (with zarr writing what
it leaves) produces must hold, file for file and byte for byte, what zarr's
``array[start:stop] = block`` produces.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ShardingCodec

from dconv.store import fastwrite

ROWS, SHAPE = 4, (14, 3, 2)
"""Chunks of 4 rows; the array's last chunk holds 2."""

WRITES = [(0, 4), (4, 12), (8, 14), (12, 14), (0, 14), (4, 6)]
"""One chunk, two, two and the partial last, the partial last alone, everything, a block shorter than its chunk."""


@pytest.fixture
def writer(monkeypatch):
    """The fast writer on, nothing logged yet; restored afterwards."""
    monkeypatch.delenv(fastwrite.FAST_WRITE_ENV, raising=False)
    monkeypatch.setattr(fastwrite, "_unavailable", None)
    return fastwrite


def make_array(root, dtype="float32", **options) -> zarr.Array:
    """An empty (14, 3, 2) array ``x`` in chunks of 4 rows, as dconv creates its blocks' arrays unless ``options``."""
    settings = dict(chunks=(ROWS, 3, 2), fill_value=0, compressors=None, dimension_names=("m", "h", "w"))
    settings.update(options)
    group = zarr.open_group(str(root), mode="w")
    return group.create_array("x", shape=SHAPE, dtype=dtype, **settings).with_config({"write_empty_chunks": True})


def values(dtype="float32") -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 0.7 - 3).astype(dtype)


def write(array: zarr.Array, start: int, block: np.ndarray) -> int:
    """What :meth:`dconv.store.output.OutputStore.write_chunk` does: the fast writer, then zarr for the rest."""
    written = fastwrite.write_rows(array, start, block)
    if written < block.shape[0]:
        array[start + written : start + block.shape[0]] = block[written:]
    return written


def files(root) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16"])
@pytest.mark.parametrize("start, stop", WRITES)
def test_files_are_zarrs(writer, tmp_path, dtype, start, stop):
    """The fast writer takes the whole chunks at the block's front; the store's files are zarr's, byte for byte."""
    fast, plain = make_array(tmp_path / "fast.zarr", dtype), make_array(tmp_path / "plain.zarr", dtype)
    assert writer.write_path(fast) == "raw/local"
    block = values(dtype)[start:stop]
    written = write(fast, start, block)
    plain[start:stop] = block
    whole_chunks = min(stop - start, SHAPE[0] - start) // ROWS * ROWS
    assert written == (whole_chunks if start % ROWS == 0 else 0)
    assert files(tmp_path / "fast.zarr") == files(tmp_path / "plain.zarr")
    assert np.asarray(fast[start:stop]).tobytes() == block.tobytes()
    assert not any(name.endswith(".partial") for name in files(tmp_path / "fast.zarr"))


def test_rewrites_a_chunk_in_place(writer, tmp_path):
    """A chunk written again (a resumed job's chunk) replaces the file whole."""
    fast, plain = make_array(tmp_path / "fast.zarr"), make_array(tmp_path / "plain.zarr")
    assert write(fast, 0, np.ones((8, 3, 2), np.float32)) == 8
    plain[0:8] = 1
    block = values()[:8]
    assert write(fast, 0, block) == 8
    plain[0:8] = block
    assert files(tmp_path / "fast.zarr") == files(tmp_path / "plain.zarr")


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_job_output_is_bitwise_the_same(writer, tmp_path, monkeypatch, stats):
    """A job's output with the fast writer holds the files of the same job written through zarr (the last
    chunk of 10 samples in chunks of 4 cut by the array's end), and its block arrays take the fast path."""
    import dconv

    rng = np.random.default_rng(7)
    arrays = {"A_prev": rng.standard_normal((10, 6, 6, 8), dtype=np.float32),
              "W": rng.standard_normal((3, 3, 8, 16), dtype=np.float32),
              "b": np.zeros((1, 1, 1, 16), np.float32)}
    arrays["dZ"] = rng.standard_normal((10, 6, 6, 16), dtype=np.float32)
    fast_rows = []
    write_rows = fastwrite.write_rows
    monkeypatch.setattr(fastwrite, "write_rows", lambda *a: fast_rows.append(write_rows(*a)) or fast_rows[-1])
    written = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(fastwrite.FAST_WRITE_ENV, switch)
        out = tmp_path / f"out{switch}.zarr"
        dconv.backward_job(arrays, str(out), batch_chunk=4, padding=1, stats=stats, scheduler="threads")
        written[switch] = {name: data for name, data in files(out).items() if name.startswith(("dA_prev", "stats"))}
    assert any(name.startswith("dA_prev/c/") for name in written["1"])
    assert written["1"] == written["0"]
    assert sum(fast_rows) >= 8  # the two whole chunks of dA_prev (and of the per-sample statistics) when on


@pytest.mark.parametrize(
    "options",
    [
        dict(compressors=BloscCodec(cname="lz4")),
        dict(compressors="auto"),
        dict(chunks=(ROWS, 1, 2)),
        dict(chunks=(ROWS, 3, 2), shards=(8, 3, 2)),
    ],
    ids=["blosc", "zstd-default", "chunks-cut-an-axis", "sharded"],
)
def test_other_layouts_are_left_to_zarr(writer, tmp_path, options):
    """Compression, chunks that cut a trailing axis and sharding: the writer writes nothing; zarr writes it all."""
    array = make_array(tmp_path / "a.zarr", **options)
    if "shards" in options:
        assert any(isinstance(codec, ShardingCodec) for codec in array.metadata.codecs)
    assert writer.write_path(array) is None
    assert writer.write_rows(array, 0, values()[:8]) == 0
    assert files(tmp_path / "a.zarr").keys() == {"zarr.json", "x/zarr.json"}


def test_memory_store_is_left_to_zarr(writer):
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=SHAPE, chunks=(ROWS, 3, 2), dtype="float32",
                              compressors=None)
    assert writer.write_path(array) is None
    assert writer.write_rows(array, 0, values()[:4]) == 0


@pytest.mark.parametrize(
    "block, start",
    [
        (values("float64")[:8], 0),                 # not the array's dtype
        (np.asfortranarray(values()[:8]), 0),       # not C-contiguous
        (values()[::2][:4], 0),                     # a strided view
        (values()[:8, :2], 0),                      # another trailing shape
        (values()[2:10], 2),                        # not chunk-aligned
        (values()[:4], 16),                         # past the array's end (zarr says so)
    ],
    ids=["dtype", "fortran", "strided", "shape", "unaligned", "past-the-end"],
)
def test_blocks_it_does_not_take(writer, tmp_path, block, start):
    array = make_array(tmp_path / "a.zarr")
    assert writer.write_rows(array, start, block) == 0
    assert files(tmp_path / "a.zarr").keys() == {"zarr.json", "x/zarr.json"}


def test_switched_off(writer, tmp_path, monkeypatch):
    """``DCONV_FAST_WRITE=0``: zarr writes every chunk, the same files."""
    monkeypatch.setenv(fastwrite.FAST_WRITE_ENV, "0")
    array = make_array(tmp_path / "a.zarr")
    assert writer.write_rows(array, 0, values()[:8]) == 0
    monkeypatch.setenv(fastwrite.FAST_WRITE_ENV, "1")
    assert writer.write_rows(array, 0, values()[:8]) == 8


def test_changed_zarr_turns_it_off_once(writer, tmp_path, monkeypatch, caplog):
    """An attribute it reads missing: it writes nothing, says so once at WARNING, and stays off."""
    array = make_array(tmp_path / "a.zarr")
    monkeypatch.delattr(type(array), "serializer")
    with caplog.at_level(logging.WARNING, logger="dconv.store.fastwrite"):
        assert writer.write_rows(array, 0, values()[:4]) == 0
        assert writer.write_rows(array, 4, values()[4:8]) == 0
    said = [r for r in caplog.records if r.name == "dconv.store.fastwrite"]
    assert len(said) == 1 and "fast chunk writer is off" in said[0].getMessage()
    assert "serializer" in said[0].getMessage()
    monkeypatch.undo()
    assert fastwrite._unavailable is None  # the fixture's monkeypatch restored it with the rest


def test_failed_write_leaves_no_file(writer, tmp_path, monkeypatch):
    """A write that fails before the rename leaves neither the chunk nor its temporary file, and raises."""
    array = make_array(tmp_path / "a.zarr")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastwrite.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        writer.write_rows(array, 0, values()[:4])
    assert files(tmp_path / "a.zarr").keys() == {"zarr.json", "x/zarr.json"}

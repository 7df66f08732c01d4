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

import numcodecs
import numpy as np
import pytest
import zarr
import zarr.core.metadata
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec
from zarr.storage import LocalStore, StorePath

from dconv import InputError
from dconv.store import fastread, inputs, read_batch

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
        result = reader.read_rows(array, start, stop)
        assert result is not None and result.flags.c_contiguous
        assert_identical(result, np.asarray(array[start:stop]))
        assert_identical(read_batch(array, "x", start, stop), result)
    assert reader._unavailable is None and not reader._warned


CHAINS = {
    "raw": None,
    "zstd": "default",  # zarr-python 3's default: bytes + zstd
    "gzip": GzipCodec(level=5),
    "blosc-lz4-shuffle": BloscCodec(cname="lz4", shuffle="shuffle"),
    "blosc-zstd-bitshuffle": BloscCodec(cname="zstd", shuffle="bitshuffle", clevel=3),
    "blosc-zlib-noshuffle": BloscCodec(cname="zlib", shuffle="noshuffle"),
    "blosc-blosclz": BloscCodec(cname="blosclz"),
}
"""Codec chains the fast reader decodes, after the bytes codec."""

M, ROWS, SHARD = 31, 4, 12
WRITTEN = [(0, 4), (8, 12), (24, 31)]
"""Rows written: chunk 1 and chunks 3-5 (all of shard 1) are never written; the last chunk and shard are partial."""
BOUNDS = [
    (0, M), (0, 4), (4, 8), (1, 3), (2, 7), (3, 13), (0, 12), (8, 12), (11, 12), (12, 24),
    (10, 26), (5, 29), (24, M), (28, M), (29, 30),
]
"""Whole chunks, missing ones, cuts through chunks and through shards, the partial last chunk."""


def chain_array(url: str, chain: str, sharded: bool, dtype: str, fill: float = FILL) -> tuple[zarr.Array, np.ndarray]:
    """A (31, 3, 2) array of random values in chunks of 4 rows (shards of 12 if ``sharded``), rows
    ``WRITTEN`` written: the chunks between are missing (empty inner chunks, one whole missing shard)."""
    codec = CHAINS[chain]
    options = {} if codec == "default" else {"compressors": codec}
    if sharded:
        options["shards"] = (SHARD, 3, 2)
    array = zarr.open_group(url, mode="w").create_array(
        "x", shape=(M, 3, 2), chunks=(ROWS, 3, 2), dtype=dtype, fill_value=fill, **options
    )
    values = np.random.default_rng(len(chain)).standard_normal((M, 3, 2)).astype(dtype)
    for start, stop in WRITTEN:
        array[start:stop] = values[start:stop]
    return array, values


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("store", ["local", "fsspec"])
@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "sharded"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_every_codec_chain_is_read_fast_and_bitwise_as_zarr_reads_it(reader, tmp_path, chain, sharded, store, dtype):
    """Each covered chain, plain or as a shard's inner chunks, on a local or fetched store: the fast
    path runs (it does not fall back) and gives zarr's bytes at every bound: cuts through chunks and
    shards, missing chunks and shards (the fill value), empty inner chunks, the partial last chunk."""
    array, _ = chain_array(store_url(tmp_path, store), chain, sharded, dtype)
    name = ("sharded+" if sharded else "") + chain.split("-")[0]
    assert reader.read_path(array) == f"{name}/{'mapped' if store == 'local' else 'fetched'}"
    for start, stop in BOUNDS:
        result = reader.read_rows(array, start, stop)
        assert result is not None and result.flags.c_contiguous, (start, stop)
        assert_identical(result, np.asarray(array[start:stop]))
    assert reader._unavailable is None and not reader._warned


@pytest.mark.parametrize("store", ["local", "fsspec"])
def test_a_shard_index_at_the_start_without_crc32c(reader, tmp_path, store):
    """Another index layout: at the start of the shard, bytes only (no crc32c): zarr's own index codecs decode it."""
    sharding = ShardingCodec(
        chunk_shape=(ROWS, 3, 2),
        codecs=[BytesCodec(), GzipCodec()],
        index_codecs=[BytesCodec()],
        index_location="start",
    )
    array = zarr.open_group(store_url(tmp_path, store), mode="w").create_array(
        "x", shape=(M, 3, 2), chunks=(SHARD, 3, 2), dtype="float64", fill_value=FILL, serializer=sharding,
        compressors=None,
    )
    for start, stop in WRITTEN:
        array[start:stop] = np.random.default_rng(start).standard_normal((stop - start, 3, 2))
    assert array.metadata.codecs[0].index_location.value == "start"
    assert reader.read_path(array).startswith("sharded+gzip/")
    for start, stop in BOUNDS:
        assert_identical(reader.read_rows(array, start, stop), np.asarray(array[start:stop]))


@pytest.mark.parametrize("fill", [0.0, -0.0, np.nan, 3.25])
def test_fill_values_are_zarrs(reader, tmp_path, fill):
    """Missing chunks and empty inner chunks read as zarr fills them, bit for bit (-0.0 and NaN too)."""
    array, _ = chain_array(store_url(tmp_path, "local"), "zstd", True, "float32", fill)
    for start, stop in [(0, M), (4, 8), (13, 20)]:
        assert_identical(reader.read_rows(array, start, stop), np.asarray(array[start:stop]))


def test_shards_are_read_by_byte_range_once_per_inner_chunk(reader, tmp_path, monkeypatch):
    """On a fetched store, each shard's index is read once per call and each inner chunk the read
    touches once, by its byte range; never a whole shard, never an empty inner chunk."""
    array, _ = chain_array(store_url(tmp_path, "fsspec"), "zstd", True, "float32")
    expected = np.asarray(array[2:27])
    requests = []
    get = StorePath.get

    async def counting_get(self, prototype=None, byte_range=None):
        requests.append((self.path.split("/c/")[-1].split("/")[0], type(byte_range).__name__))
        return await get(self, prototype=prototype, byte_range=byte_range)

    monkeypatch.setattr(StorePath, "get", counting_get)
    # shards 0, 1 (never written) and 2; inner chunks 0 and 2 of shard 0 (1 is empty), 0 of shard 2
    assert_identical(reader.read_rows(array, 2, 27), expected)
    assert sorted(requests) == sorted(
        [("0", "SuffixByteRequest"), ("1", "SuffixByteRequest"), ("2", "SuffixByteRequest"),
         ("0", "RangeByteRequest"), ("0", "RangeByteRequest"), ("2", "RangeByteRequest")]
    )


def test_layouts_it_does_not_decode_go_through_zarr(reader, tmp_path):
    """Filters (a transpose), big-endian bytes, two compressors, chunks that split an inner axis,
    a v2 array: :func:`read_path` says zarr reads them, ``read_rows`` declines, and ``read_batch``
    gives zarr's read, cuts included."""
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    shape = (10, 3, 2)
    arrays = {
        "transpose": group.create_array(
            "t", shape=shape, chunks=(4, 3, 2), dtype="float64", filters=[TransposeCodec(order=(0, 2, 1))]
        ),
        "big-endian": group.create_array(
            "e", shape=shape, chunks=(4, 3, 2), dtype="float64", serializer=BytesCodec(endian="big")
        ),
        "two-compressors": group.create_array(
            "c", shape=shape, chunks=(4, 3, 2), dtype="float64", compressors=[ZstdCodec(), GzipCodec()]
        ),
        "split": group.create_array("s", shape=shape, chunks=(4, 2, 2), dtype="float64", compressors=None),
        "split-inner": group.create_array("h", shape=shape, chunks=(4, 1, 2), shards=(8, 3, 2), dtype="float64"),
        "v2": zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2).create_array(
            "x", shape=shape, chunks=(4, 3, 2), dtype="float64", fill_value=FILL
        ),
    }
    values = np.arange(60.0).reshape(shape)
    for name, array in arrays.items():
        array[:8] = values[:8]
        assert reader.read_path(array) is None, name
        assert reader.read_rows(array, 0, 4) is None, name
        for start, stop in [(0, 10), (1, 8), (4, 8), (8, 10)]:
            assert_identical(read_batch(array, "x", start, stop), np.asarray(array[start:stop]))
    assert reader.read_path(values) is None


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
@pytest.mark.parametrize("compressors", ["raw", "blosc", "zstd", "gzip"])
def test_corrupt_chunk_is_named(reader, tmp_path, monkeypatch, caplog, compressors, corruption, mode):
    """A chunk file that holds another size than the chunk's (truncated, or written for another
    shape) or garbage is an InputError naming the chunk, never a partly filled result: with the
    fast reader, through zarr (``DCONV_FAST_READ=0``), and after a fallback. A corrupt chunk
    never turns the fast reader off."""
    codec = {"raw": None, "blosc": BloscCodec(typesize=4), "zstd": ZstdCodec(), "gzip": GzipCodec()}[compressors]
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


@pytest.mark.parametrize("damage", ["truncated", "index-garbage", "chunk-garbage"])
def test_corrupt_shard_is_named(reader, tmp_path, damage):
    """A shard cut short, with a damaged index (its crc32c no longer matches) or a damaged inner
    chunk is an InputError naming the chunk, never fill values; the reader stays on."""
    array, _ = chain_array(store_url(tmp_path, "local"), "zstd", True, "float32")
    shard = tmp_path / "g.zarr" / "x" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        at = len(data) - 10 if damage == "index-garbage" else 0  # the first inner chunk's zstd magic number
        data[at : at + 4] = b"\xde\xad\xbe\xef"
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"x chunk 0 \(along the first axis, samples 0..3\)"):
        read_batch(array, "x", 0, 4)
    assert reader._unavailable is None


@pytest.mark.parametrize("batch_chunk", [4, 3], ids=["whole-chunks", "cut-chunks"])
def test_job_is_bitwise_the_same_with_the_fast_reader_off(reader, tmp_path, monkeypatch, batch_chunk):
    """A small job through zarr's public read (``DCONV_FAST_READ=0``) writes the same bits as with the
    fast reader, which only the first run used: tasks that read whole input chunks, or cut them."""
    import dconv
    from dconv.store import make_inputs, open_result

    url = make_inputs(str(tmp_path / "in.zarr"), m=12, height=6, width=5, in_channels=3, out_channels=4, chunk=4)
    plans = []
    run = fastread._Read.run
    monkeypatch.setattr(fastread._Read, "run", lambda self: plans.append(self) or run(self))
    outputs = {}
    for value in ("1", "0"):
        monkeypatch.setenv(fastread.FAST_READ_ENV, value)
        before = len(plans)
        out = str(tmp_path / f"out-{value}.zarr")
        dconv.backward_job(url, out, batch_chunk=batch_chunk, scheduler="threads")
        group = open_result(out)
        outputs[value] = {name: np.asarray(group[name][...]) for name in ("dA_prev", "dW", "db")}
        assert (len(plans) > before) == (value == "1")
    for name, fast in outputs["1"].items():
        assert_identical(outputs["0"][name], fast)


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_decoders_read_what_numcodecs_reads(codec):
    """Streams other writers make: gzip in two members with zero padding (Python's gzip reads
    them), zstd in two frames (numcodecs sums their sizes); a wrong size is an error."""
    data = np.random.default_rng(1).standard_normal(3000).astype("float32").view(np.uint8)
    numcodec = numcodecs.GZip(5) if codec == "gzip" else numcodecs.Zstd(1)
    halves = [numcodec.encode(data[:5000]), numcodec.encode(data[5000:])]
    encoded = np.frombuffer(halves[0] + (b"\0" * 7 if codec == "gzip" else b"") + halves[1], dtype=np.uint8)
    decode = fastread._gzip_into if codec == "gzip" else fastread._zstd_into
    assert np.frombuffer(numcodec.decode(encoded), dtype=np.uint8).tobytes() == data.tobytes()
    dest = np.empty(data.nbytes, dtype=np.uint8)
    decode(encoded, dest, "0")
    assert dest.tobytes() == data.tobytes()
    for size in (data.nbytes - 4, data.nbytes + 4):
        with pytest.raises(ValueError, match="chunk 0 decodes to"):
            decode(encoded, np.empty(size, dtype=np.uint8), "0")


@pytest.mark.parametrize("store", ["local", "fsspec"])
@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "sharded"])
def test_a_read_holds_what_read_memory_counts(reader, tmp_path, monkeypatch, store, sharded):
    """tracemalloc's peak of reads that cut chunks at both ends: the result, one scratch chunk and,
    fetched, the encoded chunks in flight (2 at once here); never a whole shard."""
    import gc
    import tracemalloc

    rows, sample = 8, 64 * 1024
    array = zarr.open_group(store_url(tmp_path, store), mode="w").create_array(
        "x", shape=(64, 128, 128), chunks=(rows, 128, 128), dtype="float32",
        **({"shards": (32, 128, 128)} if sharded else {}),
    )
    array[:] = np.random.default_rng(0).standard_normal(array.shape).astype("float32")
    with zarr.config.set({"async.concurrency": 2}):
        reader.read_rows(array, 3, 61)  # imports and first-call caches, outside the measurement
        gc.collect()
        tracemalloc.start()
        try:
            result = reader.read_rows(array, 3, 61)
            peak = tracemalloc.get_traced_memory()[1] - result.nbytes
        finally:
            tracemalloc.stop()
    encoded = 2 * rows * sample if store == "fsspec" else 0
    assert peak <= rows * sample + encoded + 512 * 1024, (peak, store, sharded)  # + Python's own, zarr's loop

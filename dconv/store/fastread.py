"""The fast chunk reader: input chunks decoded straight into the batch buffer.

It reads ``array[start:stop]`` along the first axis of a Zarr v3 array whose
chunks span every axis but the first, stored as little-endian bytes, then one
of: no compression, zstd (zarr-python 3's default), gzip, or Blosc (any inner
codec, any shuffle); or such chunks as the inner chunks of a ``ShardingCodec``
whose shards also span every axis but the first. Each chunk the read covers
whole is decoded into its rows of the result (``out=``); a chunk the read cuts
(the batch bounds, or the array's end inside it) is decoded once into a scratch
buffer and its rows copied. A shard's index is read once per shard per call,
and each inner chunk the read touches is read once, by its byte range. Local
chunk and shard files are mapped, not read; other stores fetch at most zarr's
``async.concurrency`` chunks at a time. Anything else (transposes, big-endian
bytes, filters, other codecs, irregular chunk grids, v2 arrays) is left to
zarr's public read: :func:`read_path` says which path an array takes.

This is the one module of dconv that uses zarr's private API (``zarr.core``,
and the sharding codec's index methods), and only behind a feature check:

- at import, the private names it needs are imported and the attributes it
  reads on zarr's classes are looked up; if one is missing, the reader is off;
- at run time, an ``AttributeError``, ``TypeError`` or ``ImportError`` raised
  while it looks at zarr's metadata or fetches chunks or shard indexes through
  zarr means the private API has changed: the reader turns itself off for the
  rest of the process.

Either way :func:`read_rows` returns None from then on, so that
:func:`dconv.store.inputs.read_batch` reads through zarr's public
``array[start:stop]``, and the logger ``dconv.store.fastread`` says so once
per process, at WARNING. The fallback cannot hide a data error: decoding
(codecs, chunk sizes, byte ranges, mapping a file) happens outside the check
and its errors propagate; and a store error that looks like an API change is
raised again by zarr's own read of the same chunks.

Decoding calls numcodecs (Blosc, Zstd) and the standard library's zlib (gzip),
which all release the GIL while they decode. Blosc uses its own threads only
when numcodecs allows it (the main thread of the main process); a dconv task
runs in a worker thread, where Blosc decodes on that one thread.

The environment variable ``DCONV_FAST_READ`` switches the reader: ``0`` turns it
off (every read goes through zarr's public API), anything else or unset keeps it
on. It is read at every call, so tests can set it with ``monkeypatch.setenv`` and
worker processes started afterwards inherit it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import os
import sys
import threading
import zlib
from typing import Any, Callable, Iterator

import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.abc.store import RangeByteRequest
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, ZstdCodec
from zarr.storage import LocalStore, MemoryStore, StorePath

__all__ = ["FAST_READ_ENV", "read_path", "read_rows"]

FAST_READ_ENV = "DCONV_FAST_READ"
"""Environment variable: ``0`` turns the fast reader off."""

MAX_UINT64 = 2**64 - 1
"""An empty inner chunk's offset and length in a shard index (the sharding spec's marker)."""

_API_ERRORS = (AttributeError, TypeError, ImportError)
"""What zarr raises at the reader when a private name has moved or changed signature."""

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- feature check


def _missing_attributes() -> str | None:
    """The attributes of zarr's classes the reader uses that this zarr lacks, or None."""
    needed = {
        zarr.Array: ("metadata", "store_path", "fill_value"),
        ArrayV3Metadata: ("zarr_format", "chunk_grid", "codecs", "encode_chunk_key"),
        BytesCodec: ("endian",),
        ShardingCodec: ("chunk_shape", "codecs", "index_location", "_shard_index_size", "_decode_shard_index",
                        "_load_shard_index_maybe"),
        StorePath: ("get", "__truediv__"),
        Buffer: ("as_numpy_array", "from_array_like"),
    }
    missing = [
        f"{cls.__name__}.{name}"
        for cls, names in needed.items()
        for name in names
        if not (hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {}))
    ]
    if not callable(sync):
        missing.append("zarr.core.sync.sync()")
    return f"missing {', '.join(missing)}" if missing else None


# _unavailable: why the reader is off in this process (zarr's private API is not what it expects), or None.
try:
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.core.sync import sync
except ImportError as e:
    RegularChunkGrid = ArrayV3Metadata = sync = None
    _unavailable: str | None = f"{type(e).__name__}: {e}"
else:
    _unavailable = _missing_attributes()

_lock = threading.Lock()
_warned = False
_said_off = False


class _APIChanged(Exception):
    """zarr's private API raised one of ``_API_ERRORS`` while the reader used it."""


def _fall_back(reason: str | None = None) -> None:
    """Turn the reader off for this process (if ``reason``) and say so once, at WARNING."""
    global _unavailable, _warned
    with _lock:
        if reason is not None and _unavailable is None:
            _unavailable = reason
        if _warned:
            return
        _warned = True
    log.warning(
        "dconv's fast chunk reader is off: zarr %s's private API is not what it expects (%s); "
        "dconv falls back to zarr's public read (the same data, slower).",
        zarr.__version__,
        _unavailable,
    )


def _switched_off() -> bool:
    """Whether ``DCONV_FAST_READ=0`` turns the reader off (said once, at DEBUG)."""
    global _said_off
    if os.environ.get(FAST_READ_ENV, "").strip() != "0":
        return False
    if not _said_off:
        _said_off = True
        log.debug("fast chunk reader switched off (%s=0): reading through zarr's public API.", FAST_READ_ENV)
    return True


# --------------------------------------------------------------------------- the layouts it reads


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How an array's chunks are stored, in a form this reader decodes.

    ``rows`` is the rows per decoded chunk (the inner chunk, if sharded);
    ``decode(encoded, dest, key)`` decodes one chunk into ``dest`` (flat uint8,
    exactly the chunk's bytes); ``name`` is the codec chain (``"zstd"``,
    ``"sharded+zstd"``...); ``sharding`` the array's sharding codec, if any,
    and ``shard_rows`` its rows per shard.
    """

    rows: int
    decode: Callable[[np.ndarray, np.ndarray, str], None]
    name: str
    sharding: ShardingCodec | None = None
    shard_rows: int = 0


def _layout(array: zarr.Array) -> _Layout | None:
    """The layout of ``array`` if this reader decodes it, else None (then zarr reads it)."""
    metadata = array.metadata
    if metadata.zarr_format != 3 or sys.byteorder != "little" or not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return None
    shape, grid = tuple(array.shape), tuple(metadata.chunk_grid.chunk_shape)
    codecs = tuple(metadata.codecs)
    sharding = codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
    if sharding is not None:
        inner, codecs = tuple(sharding.chunk_shape), tuple(sharding.codecs)
        if grid[1:] != shape[1:] or grid[0] % inner[0] != 0:
            return None
    else:
        inner = grid
    if not codecs or inner[1:] != shape[1:] or len(codecs) > 2:
        return None
    first, compressor = codecs[0], (codecs[1] if len(codecs) == 2 else None)
    if type(first) is not BytesCodec or (first.endian is not None and first.endian.value != "little"):
        return None
    found = _DECODERS.get(type(compressor))
    if found is None:
        return None
    name, decode = found
    if sharding is None:
        return _Layout(inner[0], decode, name)
    return _Layout(inner[0], decode, f"sharded+{name}", sharding, grid[0])


def read_path(array: Any) -> str | None:
    """Which path a read of ``array`` takes when the reader is on.

    Returns
    -------
    str or None
        ``"<chain>/mapped"`` (local chunk or shard files, mapped), ``"<chain>/memory"``
        (zarr's MemoryStore: its own buffers) or ``"<chain>/fetched"`` (another
        store: the encoded chunks are fetched), ``<chain>`` naming the codecs
        (``raw``, ``zstd``, ``gzip``, ``blosc``, each maybe ``sharded+``); None when
        zarr's public read takes it (not a zarr array, a layout this reader
        does not decode, or the reader unavailable in this process).
    """
    if _unavailable is not None or not isinstance(array, zarr.Array):
        return None
    try:
        layout = _layout(array)
    except _API_ERRORS:
        return None
    if layout is None:
        return None
    if isinstance(array.store, LocalStore):
        return f"{layout.name}/mapped"
    return f"{layout.name}/{'memory' if isinstance(array.store, MemoryStore) else 'fetched'}"


# --------------------------------------------------------------------------- the read


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray | None:
    """``array[start:stop]`` along the first axis, or None when this reader does not handle the read.

    None means: the layout is not one it decodes (:func:`read_path`),
    ``DCONV_FAST_READ=0``, or zarr's private API has changed (see the module docstring).

    Raises
    ------
    ValueError, RuntimeError, OSError, zlib.error
        A chunk or shard is truncated, corrupt or cannot be read (the caller names it).
    """
    if _switched_off():
        return None
    if _unavailable is not None:
        _fall_back()
        return None
    try:
        layout = _layout(array)
        if layout is None or not 0 <= start < stop <= array.shape[0]:
            return None
        read = _Read(array, layout, start, stop)
        read.run()
    except _API_ERRORS as e:
        _fall_back(f"{type(e).__name__}: {e}")
        return None
    except _APIChanged as e:
        cause = e.__cause__
        _fall_back(f"{type(cause).__name__}: {cause}")
        return None
    return read.out


class _Read:
    """One call's read: where each chunk's rows land, its bytes, and the decoding.

    ``out`` is the result. Chunks are placed in order of the first axis; a chunk
    never written (or an empty inner chunk of a shard) is the fill value.
    """

    def __init__(self, array: zarr.Array, layout: _Layout, start: int, stop: int) -> None:
        self.array, self.layout, self.start, self.stop = array, layout, start, stop
        self.out = np.empty((stop - start, *array.shape[1:]), dtype=np.dtype(array.dtype))
        self.row_bytes = self.out[0].nbytes
        self.chunk_nbytes = layout.rows * self.row_bytes
        self.scratch: np.ndarray | None = None
        self.local = isinstance(array.store, LocalStore)

    def run(self) -> None:
        """Read every chunk of ``[start, stop)`` into ``out``."""
        if self.layout.sharding is None:
            pieces = self._chunks()
        else:
            pieces = self._inner_chunks()
        if self.local:
            for row, key, encoded in pieces:
                self.place(row, key, _map_file(encoded) if isinstance(encoded, str) else encoded)
        else:
            self._fetch_and_place(pieces)

    # -- where the bytes are

    def _keys(self, rows: int) -> Iterator[tuple[int, str]]:
        """``(first row, key)`` of every stored chunk (or shard) of ``rows`` rows that ``[start, stop)`` touches."""
        ndim = self.array.ndim
        for index in range(self.start // rows, -(-self.stop // rows)):
            yield index * rows, self.array.metadata.encode_chunk_key((index,) + (0,) * (ndim - 1))

    def _location(self, key: str) -> str | StorePath:
        if self.local:
            return os.path.join(str(self.array.store.root), self.array.path, key)
        return self.array.store_path / key

    def _chunks(self) -> list[tuple[int, str, Any]]:
        """``(first row, key, where)`` of each chunk: a file's path, or a store path to fetch."""
        return [(row, key, self._location(key)) for row, key in self._keys(self.layout.rows)]

    def _inner_chunks(self) -> list[tuple[int, str, Any]]:
        """``(first row, key, where)`` of each inner chunk the read touches, from its shard's index.

        ``where`` is the chunk's bytes in a mapped shard file, or ``(store path,
        byte range)`` to fetch, or None for an empty inner chunk or a shard never written.
        """
        rows, shard_rows = self.layout.rows, self.layout.shard_rows
        per_shard = (shard_rows // rows,) + (1,) * (self.array.ndim - 1)
        shards = list(self._keys(shard_rows))
        if self.local:
            mapped = [_map_file(self._location(key)) for _, key in shards]
            indexes = [
                None if data is None else self._index_of(data, per_shard, key) for data, (_, key) in zip(mapped, shards)
            ]
        else:
            mapped = [None] * len(shards)
            indexes = self._fetch_indexes([self._location(key) for _, key in shards], per_shard)
        pieces = []
        for (shard_row, key), data, index in zip(shards, mapped, indexes):
            for j in range(shard_rows // rows):
                row = shard_row + j * rows
                if row + rows <= self.start or row >= self.stop:
                    continue
                offset, length = (MAX_UINT64, MAX_UINT64) if index is None else (int(index[j, 0]), int(index[j, 1]))
                if (offset, length) == (MAX_UINT64, MAX_UINT64):
                    where = None
                elif data is not None:
                    if offset + length > data.nbytes:
                        raise ValueError(
                            f"shard {key}: inner chunk {j} is bytes {offset}..{offset + length} of a "
                            f"{data.nbytes}-byte shard."
                        )
                    where = data[offset : offset + length]
                else:
                    where = (self._location(key), RangeByteRequest(offset, offset + length))
                pieces.append((row, f"{key} (inner chunk {j})", where))
        return pieces

    def _index_of(self, shard: np.ndarray, per_shard: tuple[int, ...], key: str) -> np.ndarray:
        """The ``(offset, length)`` rows of a mapped shard's index, decoded by zarr's own index codecs."""
        sharding = self.layout.sharding
        size = sharding._shard_index_size(per_shard)
        if shard.nbytes < size:
            raise ValueError(f"shard {key} holds {shard.nbytes} bytes, less than its {size}-byte index.")
        at_start = sharding.index_location.value == "start"
        raw = shard[:size] if at_start else shard[shard.nbytes - size :]
        buffer = default_buffer_prototype().buffer.from_array_like(raw)
        return self._decoded_index(sync(sharding._decode_shard_index(buffer, per_shard)))

    def _fetch_indexes(self, paths: list[StorePath], per_shard: tuple[int, ...]) -> list[np.ndarray | None]:
        sharding = self.layout.sharding
        found = _gather([sharding._load_shard_index_maybe(path, per_shard) for path in paths])
        return [None if index is None else self._decoded_index(index) for index in found]

    @staticmethod
    def _decoded_index(index: Any) -> np.ndarray:
        return np.asarray(index.offsets_and_lengths, dtype=np.uint64).reshape(-1, 2)

    def _fetch_and_place(self, pieces: list[tuple[int, str, Any]]) -> None:
        """Fetch the pieces' bytes, at most zarr's ``async.concurrency`` at once, and place each."""
        group = max(1, int(zarr.config.get("async.concurrency") or 1))
        for first in range(0, len(pieces), group):
            self._fetch_and_place_group(pieces[first : first + group])

    def _fetch_and_place_group(self, pieces: list[tuple[int, str, Any]]) -> None:
        """Fetch the pieces' bytes together and place each; they are freed when this returns."""
        wanted = [(i, where) for i, (_, _, where) in enumerate(pieces) if where is not None]
        fetched = _gather([_get(where) for _, where in wanted])
        encoded: list[np.ndarray | None] = [None] * len(pieces)
        for (i, _), data in zip(wanted, fetched):
            encoded[i] = None if data is None else data.as_numpy_array()
        for (row, key, _), data in zip(pieces, encoded):
            self.place(row, key, data)

    # -- decoding

    def place(self, row: int, key: str, encoded: np.ndarray | None) -> None:
        """Decode the chunk whose first row is ``row`` into its rows of ``out`` (or fill them)."""
        rows = self.layout.rows
        lo, hi = max(row, self.start), min(row + rows, self.stop)
        block = self.out[lo - self.start : hi - self.start]
        if encoded is None:
            block[...] = self.array.fill_value
        elif (lo, hi) == (row, row + rows):  # the whole chunk lands in the batch: decode in place
            self._decode(encoded, block.reshape(-1).view(np.uint8), key)
        else:  # cut by the batch bounds or the array's end: one scratch decode, then the rows
            if self.scratch is None:
                self.scratch = np.empty(self.chunk_nbytes, dtype=np.uint8)
            self._decode(encoded, self.scratch, key)
            part = self.scratch[(lo - row) * self.row_bytes : (hi - row) * self.row_bytes]
            block.reshape(-1).view(np.uint8)[...] = part

    def _decode(self, encoded: np.ndarray, dest: np.ndarray, key: str) -> None:
        """Decode one chunk; a codec's TypeError is a data error, never taken for a change of zarr's API."""
        try:
            self.layout.decode(encoded, dest, key)
        except _API_ERRORS as e:
            raise ValueError(f"chunk {key} cannot be decoded: {type(e).__name__}: {e}") from e


def _get(where: StorePath | tuple[StorePath, RangeByteRequest]):
    """The coroutine that fetches a chunk (a store path) or an inner chunk (a shard's path and byte range)."""
    prototype = default_buffer_prototype()
    if isinstance(where, StorePath):
        return where.get(prototype=prototype)
    path, byte_range = where
    return path.get(prototype=prototype, byte_range=byte_range)


def _gather(awaitables: list) -> list:
    """Run zarr store coroutines together on zarr's loop; an API error is :class:`_APIChanged`."""

    async def gather() -> list:
        return await asyncio.gather(*awaitables)

    coroutine = gather()
    try:
        return sync(coroutine)
    except _API_ERRORS as e:
        raise _APIChanged() from e
    finally:
        coroutine.close()  # a no-op once awaited; spares a warning if sync() changed and never ran it
        for awaitable in awaitables:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()


# --------------------------------------------------------------------------- decoding (no zarr)


def _map_file(path: str) -> np.ndarray | None:
    """The bytes of file ``path``, mapped read-only; None if there is no such file."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return np.empty(0, dtype=np.uint8)
            return np.frombuffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    except FileNotFoundError:
        return None


def _raw_into(encoded: np.ndarray, dest: np.ndarray, key: str) -> None:
    """Copy an uncompressed chunk into ``dest``."""
    if encoded.nbytes != dest.nbytes:
        raise ValueError(f"chunk {key} holds {encoded.nbytes} bytes; expected {dest.nbytes}.")
    dest[...] = encoded


def _blosc_into(encoded: np.ndarray, dest: np.ndarray, key: str) -> None:
    """Decompress a Blosc chunk (any inner codec, any shuffle) into ``dest``."""
    # Blosc header: version, versionlz, flags, typesize, then uint32 LE nbytes (decoded size)
    nbytes = int.from_bytes(encoded[4:8].tobytes(), "little") if encoded.nbytes >= 16 else -1
    if nbytes != dest.nbytes:
        raise ValueError(f"chunk {key} decodes to {nbytes} bytes; expected {dest.nbytes}.")
    numcodecs.blosc.decompress(encoded, dest)


def _zstd_frame_size(encoded: np.ndarray) -> int | None:
    """The content size the first zstd frame's header states, or None if it states none."""
    if encoded.nbytes < 6 or int.from_bytes(encoded[:4].tobytes(), "little") != 0xFD2FB528:
        return None
    descriptor = int(encoded[4])
    field, single, dictionary = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dictionary]
    width = (1 if single else 0, 2, 4, 8)[field]
    if width == 0 or encoded.nbytes < at + width:
        return None
    size = int.from_bytes(encoded[at : at + width].tobytes(), "little")
    return size + 256 if width == 2 else size


def _zstd_into(encoded: np.ndarray, dest: np.ndarray, key: str) -> None:
    """Decompress a zstd chunk into ``dest``.

    numcodecs decodes into ``dest`` the size the frames state, and checks that
    it fits; a frame that states exactly the chunk's size is decoded in place,
    anything else (no size stated, several frames) into a buffer of its own, then
    checked and copied.
    """
    if _zstd_frame_size(encoded) == dest.nbytes:
        numcodecs.zstd.decompress(encoded, dest)
        return
    decoded = np.frombuffer(numcodecs.zstd.decompress(encoded), dtype=np.uint8)
    if decoded.nbytes != dest.nbytes:
        raise ValueError(f"chunk {key} decodes to {decoded.nbytes} bytes; expected {dest.nbytes}.")
    dest[...] = decoded


_GZIP_PIECE = 1 << 18
"""Bytes of compressed input zlib takes per call, and of output it gives at most."""


def _gzip_into(encoded: np.ndarray, dest: np.ndarray, key: str) -> None:
    """Decompress a gzip chunk (one or more members, maybe zero-padded, as Python's gzip reads) into ``dest``.

    zlib cannot write into a given buffer, so it decodes in pieces of at most
    ``_GZIP_PIECE`` bytes, each copied into place.
    """
    view, pos, at = memoryview(encoded).cast("B"), 0, 0
    while at < len(view):
        decompressor = zlib.decompressobj(wbits=31)
        while not decompressor.eof and at < len(view):
            data = view[at : at + _GZIP_PIECE]
            at += len(data)
            while data:
                piece = decompressor.decompress(data, min(_GZIP_PIECE, dest.nbytes - pos + 1))
                if pos + len(piece) > dest.nbytes:
                    raise ValueError(f"chunk {key} decodes to more than {dest.nbytes} bytes.")
                dest[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                pos += len(piece)
                data = decompressor.unconsumed_tail
        if not decompressor.eof:
            raise ValueError(f"chunk {key}: compressed data ended before the end-of-stream marker.")
        at -= len(decompressor.unused_data)  # another member may follow, after zero padding
        while at < len(view) and view[at] == 0:
            at += 1
    if pos != dest.nbytes:
        raise ValueError(f"chunk {key} decodes to {pos} bytes; expected {dest.nbytes}.")


_DECODERS: dict[type | None, tuple[str, Callable[[np.ndarray, np.ndarray, str], None]]] = {
    type(None): ("raw", _raw_into),
    ZstdCodec: ("zstd", _zstd_into),
    GzipCodec: ("gzip", _gzip_into),
    BloscCodec: ("blosc", _blosc_into),
}
"""The compressor after the bytes codec (None: no compression) -> the chain's name and its decoder."""

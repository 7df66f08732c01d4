"""The fast chunk reader: whole input chunks decoded straight into place.

This is the one module of dconv that uses zarr's private API (``zarr.core``),
and only behind a feature check:

- at import, the private names it needs are imported and the attributes it
  reads on zarr's classes are looked up; if one is missing, the reader is off;
- at run time, an ``AttributeError``, ``TypeError`` or ``ImportError`` raised
  while it looks at zarr's metadata or fetches chunks through zarr's store
  means the private API has changed: the reader turns itself off for the rest
  of the process.

Either way :func:`read_rows` returns None from then on, so that
:func:`dconv.store.inputs.read_batch` reads through zarr's public
``array[start:stop]``, and the logger ``dconv.store.fastread`` says so once
per process, at WARNING. The fallback cannot hide a data error: decoding
(Blosc, chunk sizes, mapping a file) happens after the check and its errors
propagate; and a store error that looks like an API change is raised again by
zarr's own read of the same chunks.

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
from typing import Callable

import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, BytesCodec
from zarr.storage import LocalStore, StorePath

__all__ = ["FAST_READ_ENV", "read_rows"]

FAST_READ_ENV = "DCONV_FAST_READ"
"""Environment variable: ``0`` turns the fast reader off."""

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
        StorePath: ("get", "__truediv__"),
        Buffer: ("as_numpy_array",),
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


# --------------------------------------------------------------------------- the read


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray | None:
    """``array[start:stop]`` along the first axis, or None when this reader does not handle the read.

    None means: the layout or the read is not one it decodes, ``DCONV_FAST_READ=0``,
    or zarr's private API has changed (see the module docstring).

    Raises
    ------
    ValueError, RuntimeError, OSError
        A chunk is truncated, corrupt or cannot be read (the caller names it).
    """
    if _switched_off():
        return None
    if _unavailable is not None:
        _fall_back()
        return None
    try:
        if not _reads_whole_chunks(array, start, stop):
            return None
        plan = _plan(array, start, stop)
    except _API_ERRORS as e:
        _fall_back(f"{type(e).__name__}: {e}")
        return None
    for key, block, encoded in plan.chunks:
        if isinstance(encoded, str):
            encoded = _map_file(encoded)
        if encoded is None:  # never written: all fill value
            block[...] = plan.fill_value
        else:
            plan.decode(encoded, block, plan.chunk_nbytes, key)
    return plan.out


def _reads_whole_chunks(array: zarr.Array, start: int, stop: int) -> bool:
    """Whether ``array[start:stop]`` is whole chunks in a layout :func:`read_rows` decodes.

    That layout is the one ``make_inputs`` and ``OutputStore`` write: Zarr v3,
    chunks that span every axis but the first, little-endian bytes, then Blosc
    or no compression. Anything else (sharding, other codecs, a read that cuts
    a chunk) goes through zarr's own path.
    """
    metadata = array.metadata
    if metadata.zarr_format != 3 or sys.byteorder != "little" or not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return False
    size = array.chunks[0]
    aligned = start % size == 0 and (stop % size == 0 or stop == array.shape[0])
    codecs = tuple(metadata.codecs)
    first, compressors = (codecs[0], codecs[1:]) if codecs else (None, ())
    return (
        aligned
        and 0 <= start < stop <= array.shape[0]
        and tuple(array.chunks[1:]) == tuple(array.shape[1:])
        and isinstance(first, BytesCodec)
        and (first.endian is None or first.endian.value == "little")
        and (not compressors or (len(compressors) == 1 and isinstance(compressors[0], BloscCodec)))
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A read of whole chunks, worked out through zarr's private API; decoding it uses none.

    ``chunks`` holds, per chunk: its key, its rows of ``out``, and its encoded bytes
    (the path of a local chunk file, to be mapped; or bytes a store returned; None if
    it was never written).
    """

    out: np.ndarray
    chunks: list[tuple[str, np.ndarray, str | np.ndarray | None]]
    decode: Callable[[np.ndarray, np.ndarray, int, str], None]
    chunk_nbytes: int
    fill_value: object


def _plan(array: zarr.Array, start: int, stop: int) -> _Plan:
    """Where each chunk of ``array[start:stop]`` lands, and its bytes (or the path of its file).

    zarr's own read copies a chunk file into a new buffer, decodes it into
    another, and copies that into the result; this reader maps a local chunk
    file into memory (other stores fetch the chunks concurrently) and decodes
    it in place (measured in docs/DESIGN.md, "Where data lands").
    """
    size = array.chunks[0]
    out = np.empty((stop - start, *array.shape[1:]), dtype=np.dtype(array.dtype))
    indices = range(start // size, -(-stop // size))
    keys = [array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1)) for index in indices]
    blocks = [out[index * size - start : (index + 1) * size - start] for index in indices]
    if isinstance(array.store, LocalStore):
        encoded = [os.path.join(str(array.store.root), array.path, key) for key in keys]
    else:
        fetch = _get_all([array.store_path / key for key in keys])
        try:
            fetched = sync(fetch)
        finally:
            fetch.close()  # a no-op once awaited; spares a warning if sync() changed and never ran it
        encoded = [None if data is None else data.as_numpy_array() for data in fetched]
    return _Plan(
        out=out,
        chunks=list(zip(keys, blocks, encoded)),
        decode=_blosc_into if isinstance(array.metadata.codecs[-1], BloscCodec) else _raw_into,
        chunk_nbytes=size * out[0].nbytes,
        fill_value=array.fill_value,
    )


async def _get_all(paths: list[StorePath]) -> list[Buffer | None]:
    prototype = default_buffer_prototype()
    return await asyncio.gather(*(path.get(prototype=prototype) for path in paths))


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


def _blosc_into(encoded: np.ndarray, block: np.ndarray, chunk_nbytes: int, key: str) -> None:
    """Decompress a Blosc chunk of ``chunk_nbytes`` into ``block`` (the whole chunk, or the array's last rows)."""
    # Blosc header: version, versionlz, flags, typesize, then uint32 LE nbytes (decoded size)
    nbytes = int.from_bytes(encoded[4:8].tobytes(), "little") if encoded.nbytes >= 16 else -1
    if nbytes != chunk_nbytes:
        raise ValueError(f"chunk {key} decodes to {nbytes} bytes; expected {chunk_nbytes}.")
    if block.nbytes == chunk_nbytes:
        numcodecs.blosc.decompress(encoded, block)
    else:  # the last chunk, stored whole, of an array that ends inside it
        decoded = np.frombuffer(numcodecs.blosc.decompress(encoded), dtype=block.dtype)
        block[...] = decoded[: block.size].reshape(block.shape)


def _raw_into(encoded: np.ndarray, block: np.ndarray, chunk_nbytes: int, key: str) -> None:
    """Copy an uncompressed chunk of ``chunk_nbytes`` into ``block``."""
    if encoded.nbytes != chunk_nbytes:
        raise ValueError(f"chunk {key} holds {encoded.nbytes} bytes; expected {chunk_nbytes}.")
    block[...] = encoded.view(block.dtype)[: block.size].reshape(block.shape)

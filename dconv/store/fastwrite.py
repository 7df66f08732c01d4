"""The fast chunk writer: whole uncompressed chunks written to their files from the block's own memory.

zarr's ``array[start:stop] = block`` copies each chunk into buffers of its own
before the store writes it (measured on an AMD EPYC Zen 4: 0.45-0.55 s of user
CPU per GiB of dA_prev, against 0.00-0.02 s here, beside the file system's own
cost). For the arrays dconv
creates for its blocks (:meth:`dconv.store.output.OutputStore.create`: local,
uncompressed, chunks spanning every axis but the first), a whole chunk's file
holds exactly the chunk's C-ordered little-endian bytes, so this writer hands
the block's rows to ``write`` with no copy. Like zarr's ``LocalStore``, it
writes a temporary file beside the chunk and renames it into place, so a chunk
file is either whole or absent; the files are bitwise the ones zarr writes
(tested).

:func:`write_rows` writes the whole chunks at the front of a block and says how
many rows it wrote; the caller gives the rest to zarr (a chunk the block or the
array's end cuts, whose file zarr pads with the fill value). Anything else
(compression, filters, sharding, other stores, v2 arrays, a block not in the
array's dtype or not C-contiguous, a big-endian machine) is zarr's.

It reads only zarr's public attributes (``Array.compressors``, ``filters``,
``serializer``, ``shards``, ``chunks``, ``store.root``, ``store.read_only``, ``path``,
``metadata.encode_chunk_key``). Should one of them be missing or change type, the
writer turns itself off for the rest of the process and the logger
``dconv.store.fastwrite`` says so once, at WARNING; the environment variable
``DCONV_FAST_WRITE=0`` turns it off too (read at every call).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.storage import LocalStore

__all__ = ["FAST_WRITE_ENV", "write_path", "write_rows"]

FAST_WRITE_ENV = "DCONV_FAST_WRITE"
"""Environment variable: ``0`` turns the fast writer off."""

log = logging.getLogger(__name__)

_unavailable: str | None = None
"""Why the writer is off in this process (zarr's public attributes are not what it expects), or None."""


def _chunk_rows(array: zarr.Array) -> int | None:
    """Rows per chunk when this writer writes ``array``'s chunks, else None."""
    if not isinstance(array, zarr.Array) or sys.byteorder != "little" or array.metadata.zarr_format != 3:
        return None
    store = array.store
    if not isinstance(store, LocalStore) or store.read_only or array.shards is not None:
        return None
    if array.filters or array.compressors:
        return None
    serializer = array.serializer
    if type(serializer) is not BytesCodec or (serializer.endian is not None and serializer.endian.value != "little"):
        return None
    chunks, shape = tuple(array.chunks), tuple(array.shape)
    if len(chunks) != len(shape) or chunks[1:] != shape[1:]:
        return None
    return chunks[0]


def write_path(array: Any) -> str | None:
    """``"raw/local"`` when this writer takes ``array``'s whole chunks, else None (zarr writes them)."""
    if _unavailable is not None:
        return None
    try:
        return None if _chunk_rows(array) is None else "raw/local"
    except (AttributeError, TypeError):
        return None


def write_rows(array: zarr.Array, start: int, block: np.ndarray) -> int:
    """Write the whole chunks at the front of ``block`` as ``array[start:start + len(block)]``.

    Parameters
    ----------
    array : zarr.Array, shape (m, ...)
    start : int
        The block's first row in ``array``.
    block : ndarray, shape (b, ...)
        The rows, with ``array``'s trailing shape.

    Returns
    -------
    int
        How many rows of ``block``, from the first, are written: a multiple of
        the chunk's rows; 0 when this writer does not take the write (the
        layout, a block not chunk-aligned, not C-contiguous or in another
        dtype, ``DCONV_FAST_WRITE=0``, or zarr's attributes changed). The
        caller writes the rest through zarr.

    Raises
    ------
    OSError
        A chunk file cannot be written (nothing is left half-written).
    """
    if os.environ.get(FAST_WRITE_ENV, "").strip() == "0" or _unavailable is not None:
        return 0
    try:
        rows = _chunk_rows(array)
        key_of = array.metadata.encode_chunk_key
        root, path = str(array.store.root), array.path
        dtype = np.dtype(array.dtype)
    except (AttributeError, TypeError) as e:
        _fall_back(f"{type(e).__name__}: {e}")
        return 0
    fits = block.dtype == dtype and block.flags.c_contiguous and block.shape[1:] == tuple(array.shape[1:])
    if rows is None or not fits or start % rows or not 0 <= start < array.shape[0]:
        return 0
    whole = min(block.shape[0], array.shape[0] - start) // rows * rows
    trailing = (0,) * (array.ndim - 1)
    for row in range(0, whole, rows):
        key = key_of(((start + row) // rows, *trailing))
        _write_file(os.path.join(root, path, key), block[row : row + rows])
    return whole


def _write_file(path: str, rows: np.ndarray) -> None:
    """Write ``rows``' bytes as the file ``path``, through a temporary file renamed into place (as zarr does)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(memoryview(rows).cast("B"))
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise


def _fall_back(reason: str) -> None:
    """Turn the writer off for this process and say so once, at WARNING."""
    global _unavailable
    if _unavailable is not None:
        return
    _unavailable = reason
    log.warning(
        "dconv's fast chunk writer is off: zarr %s's attributes are not what it expects (%s); "
        "dconv writes through zarr's public API (the same files, slower).",
        zarr.__version__,
        reason,
    )

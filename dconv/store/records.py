"""Tree-node records: a running job's bookkeeping, one stored object per node of its reduction tree.

Node ``(depth, index)`` of the reduction tree (:mod:`dconv.tree`) covers the
chunks ``index * s**depth`` up to ``(index + 1) * s**depth`` (``s`` =
split_every; depth 0 is a chunk). A record holds one node's REDUCE partials and the SIMD level
code of every chunk it covers::

    <out>/_progress/tree/<depth>-<index>.npy

A record is a ``.npy`` file holding one structured value: ``_levels`` (uint8,
one per chunk) first, then one field per REDUCE entry, by name, so
``np.load(path)[0]["dW"]`` reads a partial, and the level codes are the first
bytes after the header.

- A chunk task writes its leaf record (depth 0) after its blocks: the record's
  existence is the chunk's completion.
- A combine task writes its node's record, then deletes its children's
  (unless the job keeps its partials), so while a job runs only a *frontier* of
  about ``(s - 1) x depth`` records exists, whatever the number of chunks.
- A resumed job reads the frontier back (:func:`dconv.tree.frontier`): a few records, not
  one per finished chunk. ``inspect`` lists the records and reads only the
  level codes of the frontier.

Records are written whole or not at all: on a local disk through a temporary
file and a rename, on an object store as one PUT. They are plain objects, not
Zarr nodes: Zarr, xarray and ``zarr.open_group(...).tree()`` do not see them.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dconv.store.layout import PROGRESS
from dconv.store.locations import is_local
from dconv.tree import Node

__all__ = ["TREE", "RecordStore"]

TREE = f"{PROGRESS}/tree"
"""Where the records live, relative to the output group."""

HEAD_BYTES = 512
"""Bytes of a record's header :meth:`RecordStore.read_levels` reads at once, with the codes: a header is about 200."""

LEVELS_KEY = "_levels"
"""The record member that holds the level codes (the others are REDUCE partials, by entry name)."""

def _key(node: Node) -> str:
    return f"{node[0]}-{node[1]}.npy"


def _parse_key(name: str) -> Node | None:
    stem, dot, suffix = name.partition(".")
    depth, dash, index = stem.partition("-")
    if suffix != "npy" or not dash or not depth.isdigit() or not index.isdigit():
        return None  # a temporary file, or anything else
    return int(depth), int(index)


def _encode(levels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> bytes:
    """A record's bytes: a ``.npy`` of one structured value, ``_levels`` first, then ``arrays`` by name."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    dtype = np.dtype(
        [(LEVELS_KEY, np.uint8, levels.shape)] + [(name, value.dtype, value.shape) for name, value in arrays.items()]
    )
    record = np.zeros(1, dtype=dtype)
    record[LEVELS_KEY] = levels
    for name, value in arrays.items():
        record[name] = value
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, record, allow_pickle=False)
    return buffer.getvalue()


def _read_dtype(file: Any) -> np.dtype:
    """The dtype of the ``.npy`` record in the open ``file``, which is left at the record's first byte."""
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(file)
    return dtype


def _decode(file: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A record's partials and level codes, read from the open ``file``."""
    dtype = _read_dtype(file)
    record = np.frombuffer(file.read(dtype.itemsize), dtype=dtype)[0]
    arrays = {name: np.array(record[name]) for name in dtype.names if name != LEVELS_KEY}
    return arrays, np.array(record[LEVELS_KEY], dtype=np.uint8).reshape(-1)


@lru_cache(maxsize=16)
def _filesystem(url: str, options_json: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` (a LocalFileSystem for a local path) and the path in it."""
    import fsspec

    options = {} if is_local(url) else json.loads(options_json)
    return fsspec.core.url_to_fs(url, **options)


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to the local file ``path`` through a temporary file and a rename: whole or not at all."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{uuid.uuid4().hex}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


@dataclass(frozen=True)
class RecordStore:
    """The records of the output group at ``url`` (picklable; workers write through it).

    Attributes
    ----------
    url : str
        The output group: a local path or an fsspec URL.
    storage_options : dict
        fsspec options for a URL (may hold credentials: never written anywhere).
    """

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)

    @property
    def _fs(self) -> Any:
        return _filesystem(self.url, json.dumps(self.storage_options, sort_keys=True, default=str))[0]

    @cached_property
    def _directory(self) -> str:
        path = _filesystem(self.url, json.dumps(self.storage_options, sort_keys=True, default=str))[1]
        return f"{path.rstrip('/')}/{TREE}"

    def _path(self, node: Node) -> str:
        return f"{self._directory}/{_key(node)}"

    def write(self, node: Node, arrays: Mapping[str, np.ndarray], levels: Sequence[int] | np.ndarray) -> None:
        """Store node ``node``'s record: its partials ``arrays`` (by REDUCE entry name) and the level
        codes of the chunks it covers (uint8, in chunk order), whole or not at all: on a local disk
        through a temporary file and a rename, elsewhere as one PUT."""
        data = _encode(np.asarray(levels, dtype=np.uint8), arrays)
        if is_local(self.url):
            _replace(self._path(node), data)
        else:
            self._fs.pipe_file(self._path(node), data)

    def read(self, node: Node) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Node ``node``'s partials (by REDUCE entry name) and its level codes (uint8).

        Raises
        ------
        FileNotFoundError
            No record of that node.
        """
        with self._fs.open(self._path(node), "rb") as file:
            return _decode(file)

    def read_levels(self, node: Node, n_levels: int) -> np.ndarray:
        """Node ``node``'s level codes (uint8, ``n_levels`` of them: one per chunk it covers), and nothing
        else: the bytes right after the header (inspect reads the codes of every record of the frontier).

        Raises
        ------
        FileNotFoundError
            No record of that node.
        """
        # one read of the magic, the header and the codes (a longer header is read on), not the partials
        with self._fs.open(self._path(node), "rb", block_size=HEAD_BYTES + n_levels) as file:
            _read_dtype(file)
            return np.frombuffer(file.read(n_levels), dtype=np.uint8, count=n_levels)

    def list(self) -> set[Node]:
        """Every node that has a record (one directory listing)."""
        fs, directory = self._fs, self._directory
        fs.invalidate_cache(directory)  # other processes wrote them: never trust a cached listing
        try:
            paths = fs.ls(directory, detail=False)
        except FileNotFoundError:
            return set()
        return {node for node in (_parse_key(path.rsplit("/", 1)[-1]) for path in paths) if node is not None}

    def delete(self, nodes: Iterable[Node]) -> None:
        """Remove the records of ``nodes``; ones already gone are ignored."""
        paths = [self._path(node) for node in nodes]
        if not paths:
            return
        fs = self._fs
        try:
            fs.rm(paths)  # one request on an object store
        except FileNotFoundError:  # a filesystem that stops at a missing one: the others, one by one
            for path in paths:
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass

    def remove_all(self) -> None:
        """Remove every record, and their directory."""
        fs, directory = self._fs, self._directory
        try:
            fs.rm(directory, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(directory)

"""Tree-node records: a running job's bookkeeping, one stored object per node of its reduction tree.

The reduction tree (:func:`dconv.graph.tree_shape`) adds consecutive runs of
``split_every`` nodes, so node ``(depth, index)`` covers the chunks
``index * s**depth`` up to ``(index + 1) * s**depth`` (``s`` = split_every;
depth 0 is a chunk). A record holds one node's REDUCE partials and the SIMD level
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
- A resumed job reads the frontier back (:func:`frontier`): a few records, not
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
import shutil
import uuid
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dconv.store.layout import PROGRESS
from dconv.store.locations import is_local

__all__ = ["TREE", "Node", "RecordStore", "node_chunks", "frontier", "covered", "tree_height", "tree_nodes"]

TREE = f"{PROGRESS}/tree"
"""Where the records live, relative to the output group."""

HEAD_BYTES = 512
"""Bytes :meth:`RecordStore.read_levels` reads first: a record's header is about 200."""

LEVELS_KEY = "_levels"
"""The record member that holds the level codes (the others are REDUCE partials, by entry name)."""

Node = tuple[int, int]
"""``(depth, index)``: depth 0 is chunk ``index``; depth d >= 1 is node ``index`` of combine level d - 1."""


def node_chunks(depth: int, index: int, split_every: int, n_chunks: int) -> range:
    """The chunks node ``(depth, index)`` covers."""
    width = split_every**depth
    return range(index * width, min((index + 1) * width, n_chunks))


def tree_height(n_chunks: int, split_every: int) -> int:
    """The root's depth: the number of combine levels (at least 1, as :func:`dconv.graph.tree_shape`)."""
    depth, width = 0, n_chunks
    while width > 1 or depth == 0:
        width = -(-width // split_every)
        depth += 1
    return depth


def tree_nodes(n_chunks: int, split_every: int) -> int:
    """The number of nodes of the tree, chunks included: the records a job that keeps its partials leaves."""
    total, width = n_chunks, n_chunks
    for _ in range(tree_height(n_chunks, split_every)):
        width = -(-width // split_every)
        total += width
    return total


def frontier(stored: Iterable[Node], n_chunks: int, split_every: int) -> list[Node]:
    """The stored nodes that no stored node above covers, in chunk order.

    A resumed job reads these back instead of recomputing what they cover;
    their coverage is the set of finished chunks (:func:`covered`).
    """
    stored = set(stored)
    height = tree_height(n_chunks, split_every)
    maximal = []
    for depth, index in stored:
        if depth > height or index * split_every**depth >= n_chunks:
            continue  # not a node of this tree
        ancestor = index
        for above in range(depth + 1, height + 1):
            ancestor //= split_every
            if (above, ancestor) in stored:
                break
        else:
            maximal.append((depth, index))
    return sorted(maximal, key=lambda node: node[1] * split_every ** node[0])


def covered(nodes: Iterable[Node], n_chunks: int, split_every: int) -> np.ndarray:
    """Boolean mask, shape (n_chunks,): the chunks ``nodes`` cover."""
    mask = np.zeros(n_chunks, dtype=bool)
    for node in nodes:
        chunks = node_chunks(*node, split_every, n_chunks)
        mask[chunks.start : chunks.stop] = True
    return mask


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


def _decode(file: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A record's partials and level codes, read from the open ``file``."""
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(file)
    record = np.frombuffer(file.read(dtype.itemsize), dtype=dtype)[0]
    arrays = {name: np.array(record[name]) for name in dtype.names if name != LEVELS_KEY}
    return arrays, np.array(record[LEVELS_KEY], dtype=np.uint8).reshape(-1)


@lru_cache(maxsize=16)
def _filesystem(url: str, options_json: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **json.loads(options_json))


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

    @cached_property
    def _local(self) -> bool:
        return is_local(self.url)

    @cached_property
    def _directory(self) -> str:
        if self._local:
            return os.path.join(self.url, *TREE.split("/"))
        fs, path = _filesystem(self.url, json.dumps(self.storage_options, sort_keys=True, default=str))
        return f"{path.rstrip('/')}/{TREE}"

    def _fs(self) -> Any:
        return _filesystem(self.url, json.dumps(self.storage_options, sort_keys=True, default=str))[0]

    def write(self, node: Node, arrays: Mapping[str, np.ndarray], levels: Sequence[int] | np.ndarray) -> None:
        """Store node ``node``'s record: its partials ``arrays`` (by REDUCE entry name) and the level
        codes of the chunks it covers (uint8, in chunk order), whole or not at all."""
        data = _encode(np.asarray(levels, dtype=np.uint8), arrays)
        directory = self._directory
        path = f"{directory}/{_key(node)}"
        if self._local:
            os.makedirs(directory, exist_ok=True)
            temporary = os.path.join(directory, f".{uuid.uuid4().hex}.tmp")
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, path)  # atomic: readers see the whole record or none
        else:
            self._fs().pipe_file(path, data)

    def read(self, node: Node) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Node ``node``'s partials (by REDUCE entry name) and its level codes (uint8).

        Raises
        ------
        FileNotFoundError
            No record of that node.
        """
        path = f"{self._directory}/{_key(node)}"
        with open(path, "rb") if self._local else self._fs().open(path, "rb") as file:
            return _decode(file)

    def read_levels(self, node: Node, n_levels: int) -> np.ndarray:
        """Node ``node``'s level codes (uint8, read-only, ``n_levels`` of them: one per chunk it covers), and
        nothing else: the bytes right after the header, whose dtype is not even parsed (inspect
        reads the codes of every record of the frontier).

        Raises
        ------
        FileNotFoundError
            No record of that node.
        """
        path = f"{self._directory}/{_key(node)}"
        head = self._read_head(path, HEAD_BYTES + n_levels)  # the magic, the header and, usually, the codes
        if head[:6] != b"\x93NUMPY":
            raise ValueError(f"{path} is not a .npy record")
        size = 2 if head[6] == 1 else 4  # the header's length: uint16 in .npy 1.0, uint32 after
        start = 8 + size + int.from_bytes(head[8 : 8 + size], "little")
        if len(head) < start + n_levels:  # a long header: read on
            head = self._read_head(path, start + n_levels)
        return np.frombuffer(head, dtype=np.uint8, count=n_levels, offset=start)

    def _read_head(self, path: str, n_bytes: int) -> bytes:
        """The first ``n_bytes`` of the object at ``path`` (fewer if it is shorter): one system call
        locally, where inspect reads one per record of the frontier."""
        if not self._local:
            with self._fs().open(path, "rb") as file:
                return file.read(n_bytes)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            return os.pread(descriptor, n_bytes, 0)
        finally:
            os.close(descriptor)

    def list(self) -> set[Node]:
        """Every node that has a record (one directory listing)."""
        directory = self._directory
        try:
            if self._local:
                names = [entry.name for entry in os.scandir(directory)]
            else:
                fs = self._fs()
                fs.invalidate_cache(directory)  # other processes wrote them: never trust a cached listing
                names = [path.rsplit("/", 1)[-1] for path in fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return set()
        return {node for node in map(_parse_key, names) if node is not None}

    def delete(self, nodes: Iterable[Node]) -> None:
        """Remove the records of ``nodes``; ones already gone are ignored."""
        paths = [f"{self._directory}/{_key(node)}" for node in nodes]
        if not paths:
            return
        if self._local:
            for path in paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        else:
            try:
                self._fs().rm(paths)
            except FileNotFoundError:
                pass

    def remove_all(self) -> None:
        """Remove every record, and their directory."""
        directory = self._directory
        if self._local:
            shutil.rmtree(directory, ignore_errors=True)
            return
        fs = self._fs()
        try:
            fs.rm(directory, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(directory)

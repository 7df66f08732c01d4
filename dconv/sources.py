"""Where the chunk tasks get their batches: the batch chunks, and one source per input array.

The batch of ``m`` samples is cut into ``ceil(m / batch_chunk)`` chunks
(:class:`BatchBounds`); chunk ``i`` is samples ``bounds[i] = (start, stop)``.
A chunk task gets its block of ``dZ`` and ``A_prev`` from a *source*, which
is one of two kinds:

- :class:`ZarrBatches`: the task reads rows ``start:stop`` of a Zarr array
  itself; the task depends on no other task.
- :class:`DaskBatches`: block ``i`` of a Dask array chunked as the batch;
  the task depends on that block's key.

Both have the same interface, so no caller asks which kind a source is:
``block_key(i)`` (the Dask key a task depends on, or None), ``block_tasks(indices)``
(the Dask tasks that make those blocks), ``reader`` (what a task's context
carries to read the block itself, or None) and ``block(i)`` (the block made
here, or None when the task reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.store import read_batch

__all__ = ["BatchBounds", "BatchSource", "DaskBatches", "ZarrBatches", "batch_bounds", "batch_sources"]


class BatchBounds(Sequence):
    """``[(start, stop), ...]`` of the batch chunks, computed on demand; the last may be shorter.

    A sequence of ``ceil(m / batch_chunk)`` pairs that holds two integers,
    whatever the number of chunks.
    """

    def __init__(self, m: int, batch_chunk: int) -> None:
        if not isinstance(batch_chunk, (int, np.integer)) or isinstance(batch_chunk, bool) or batch_chunk < 1:
            raise InputError(f"batch_chunk must be an int >= 1; got {batch_chunk!r} instead.")
        self.m, self.batch_chunk = int(m), int(batch_chunk)

    def __len__(self) -> int:
        return -(-self.m // self.batch_chunk)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk index must be in [0, {len(self)}); got {index} instead.")
        start = int(index) * self.batch_chunk
        return start, min(start + self.batch_chunk, self.m)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, BatchBounds):
            return (self.m, self.batch_chunk) == (other.m, other.batch_chunk)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BatchBounds(m={self.m}, batch_chunk={self.batch_chunk})"

    def __dask_tokenize__(self) -> tuple:
        return ("BatchBounds", self.m, self.batch_chunk)


def batch_bounds(m: int, batch_chunk: int) -> BatchBounds:
    """``[(start, stop), ...]`` of the batch chunks (a :class:`BatchBounds`); the last may be shorter."""
    return BatchBounds(m, batch_chunk)


@dataclass(frozen=True)
class ZarrBatches:
    """A Zarr array read by batch chunks: each task reads its own samples ``start:stop``.

    Picklable (zarr.Array is opened again on the worker) and carried by every
    task's shared context (:class:`dconv.graph.JobContext`).
    """

    array: Any  # zarr.Array
    name: str

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop``, shape (stop - start, ...)."""
        return read_batch(self.array, self.name, start, stop)

    @property
    def reader(self) -> ZarrBatches:
        """What a task's context carries to read its block: this source."""
        return self

    def block_key(self, index: int) -> None:
        """None: a task reads its block itself and depends on no task for it."""
        return None

    def block_tasks(self, indices: Sequence[int]) -> dict:
        """No Dask task makes a block."""
        return {}

    def block(self, index: int) -> None:
        """None: the chunk task reads its block itself."""
        return None


@dataclass(frozen=True)
class DaskBatches:
    """A Dask array chunked along m as the batch chunks: block ``i`` is chunk ``i``.

    Each wave's graph carries the part of this array's graph its chunks need.
    """

    array: Any  # dask.array.Array

    reader = None
    """No task reads the block itself: it is the result of the task :meth:`block_key` names."""

    def block_key(self, index: int) -> tuple:
        """The key of block ``index`` in the array's graph."""
        return (self.array.name, index, *[0] * (self.array.ndim - 1))

    def block_tasks(self, indices: Sequence[int]) -> dict:
        """The tasks that make blocks ``indices``, and nothing else."""
        return dict(self.array.__dask_graph__().cull({self.block_key(i) for i in indices}))

    def block(self, index: int) -> np.ndarray:
        """Block ``index``, computed in this process, shape (b, ...)."""
        return np.asarray(self.array.blocks[index].compute(scheduler="synchronous"))


BatchSource = Union[ZarrBatches, DaskBatches]
"""Where a chunk task gets its block of one input array."""


def batch_sources(array: Any, name: str, bounds: BatchBounds) -> BatchSource:
    """How the tasks get their batch of ``array``: a Zarr array is read by each task
    (:class:`ZarrBatches`), anything else becomes a Dask array chunked along ``bounds``."""
    if isinstance(array, zarr.Array):
        return ZarrBatches(array, name)
    import dask.array as da

    chunks = (tuple(stop - start for start, stop in bounds), *[(n,) for n in array.shape[1:]])
    return DaskBatches(da.asarray(array).rechunk(chunks))

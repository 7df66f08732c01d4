"""The Dask layer: one task per batch chunk, and a tree reduction of the partials.

For a batch of ``m`` samples cut into ``n = ceil(m / batch_chunk)`` chunks::

    chunk task i:  set the job's SIMD level  ->  read A_prev[i], dZ[i]  ->  kernel
                   ->  write dA_prev[i], partials and level to Zarr
                   returns Partial(dW_i, db_i) in float64
    combine:       adds at most ``split_every`` partials, in chunk order
    result:        one Partial (dW, db) after ceil(log(n, split_every)) combine levels

The chunk tasks write their dA_prev blocks themselves, so dA_prev never passes
through the client, and the inputs are read once: the stores and the reduction
are one computation. Chunks that an interrupted run already finished are not
recomputed: their partials are read back from the output store, and the tree
keeps the same shape and order, so the result is bitwise the same.

Tasks are pure functions of their arguments: running one twice writes the same
bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import dask
import numpy as np
from dask.delayed import Delayed

from dconv import simd
from dconv.errors import InputError
from dconv.kernel import backward_kernel
from dconv.params import ConvGeometry
from dconv.store import OutputStore, read_batch

__all__ = [
    "Partial",
    "ZarrSlice",
    "batch_bounds",
    "normalize_split_every",
    "tree_reduce",
    "backward_graph",
    "CHUNK_PREFIX",
]

CHUNK_PREFIX = "dconv-chunk"
COMBINE_PREFIX = "dconv-combine"


class Partial(NamedTuple):
    """The reducible part of one or more chunks' gradients.

    Attributes
    ----------
    dW : ndarray, float64, shape (fh, fw, C_prev, C)
    db : ndarray, float64, shape (C,)
    stats : dict
        Summed over the chunks: wall time of the ``read``, ``kernel`` and
        ``write`` steps (seconds), ``nonfinite_dA_prev``, the count of NaN
        and Inf values written to dA_prev, and ``simd``, ``{level: chunks}``,
        the number of chunks that ran at each SIMD level.
    """

    dW: np.ndarray
    db: np.ndarray
    stats: dict


@dataclass(frozen=True)
class ZarrSlice:
    """Samples ``start:stop`` of a Zarr array, read by the task that needs them."""

    array: Any  # zarr.Array: picklable, opened again on the worker
    name: str
    start: int
    stop: int

    def read(self) -> np.ndarray:
        return read_batch(self.array, self.name, self.start, self.stop)


def batch_bounds(m: int, batch_chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the batch chunks; the last may be shorter."""
    if not isinstance(batch_chunk, (int, np.integer)) or isinstance(batch_chunk, bool) or batch_chunk < 1:
        raise InputError(f"batch_chunk must be an int >= 1; got {batch_chunk!r} instead.")
    return [(start, min(start + batch_chunk, m)) for start in range(0, m, batch_chunk)]


def normalize_split_every(split_every: Any) -> int:
    """The fan-in of the tree reduction: an int >= 2 (dask's default is 8)."""
    if split_every is None:
        return 8
    if not isinstance(split_every, (int, np.integer)) or isinstance(split_every, bool) or split_every < 2:
        raise InputError(f"split_every must be an int >= 2; got {split_every!r} instead.")
    return int(split_every)


def _load(batch: Any, dtype: np.dtype) -> np.ndarray:
    array = batch.read() if isinstance(batch, ZarrSlice) else np.asarray(batch)
    return array.astype(dtype, copy=False)


def backward_chunk(
    dz_batch: Any,
    a_batch: Any,
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    index: int,
    start: int,
    check_finite: bool = False,
    simd_word: str | None = None,
) -> Partial:
    """Run the kernel on one batch chunk and write its results (a chunk task).

    Parameters
    ----------
    dz_batch, a_batch : ZarrSlice or ndarray
        ``dZ`` (b, n_H, n_W, C) and ``A_prev`` (b, H, W, C_prev) of this chunk.
    W : ndarray, shape (fh, fw, C_prev, C)
        Already in the compute dtype.
    out : OutputStore
        Receives dA_prev[start:start + b], and the partials and SIMD level at ``index``.
    simd_word : str, optional
        The job's ``DCONV_SIMD`` word, made this worker's level first
        (:func:`dconv.simd.use_level`); None keeps this process's level.
    """
    level = simd.use_level(simd_word) if simd_word is not None else simd.active_level()
    t0 = time.perf_counter()
    dZ, A_prev = _load(dz_batch, W.dtype), _load(a_batch, W.dtype)
    if check_finite:
        for name, array in (("dZ", dZ), ("A_prev", A_prev)):
            if not np.isfinite(array).all():
                raise InputError(
                    f"{name}[{start}:{start + array.shape[0]}] holds {int(np.size(array) - np.isfinite(array).sum())} "
                    "non-finite values (--check-finite is on)."
                )
    t1 = time.perf_counter()
    grads = backward_kernel(dZ, A_prev, W, geometry, threads=1, float64_sums=True)  # Dask runs chunks in parallel
    dW, db = grads.dW, grads.db.reshape(-1)
    nonfinite = int(grads.dA_prev.size - np.count_nonzero(np.isfinite(grads.dA_prev)))
    t2 = time.perf_counter()
    out.write_chunk(index, start, grads.dA_prev, dW, db, nonfinite, level)
    t3 = time.perf_counter()
    _report_progress(out.url, index)
    stats = {"read": t1 - t0, "kernel": t2 - t1, "write": t3 - t2, "nonfinite_dA_prev": nonfinite, "simd": {level: 1}}
    return Partial(dW, db, stats)


def load_finished_chunk(out: OutputStore, index: int) -> Partial:
    """The partial of a chunk that an earlier, interrupted run already finished, with its recorded level."""
    dW, db, nonfinite, level = out.read_partial(index)
    return Partial(dW, db, {"nonfinite_dA_prev": nonfinite, "simd": {level: 1}})


def _add_stat(total: Any, value: Any) -> Any:
    """Numbers and tuples add; mappings (``simd``'s counts) add key by key."""
    if isinstance(value, Mapping):
        return {key: total.get(key, 0) + value.get(key, 0) for key in {**total, **value}}
    return total + value


def combine_partials(partials: Sequence[Partial]) -> Partial:
    """Add partials in the order given (a fixed order makes the sum reproducible)."""
    dW = partials[0].dW.copy()
    db = partials[0].db.copy()
    stats = dict(partials[0].stats)
    for partial in partials[1:]:
        dW += partial.dW
        db += partial.db
        for name, value in partial.stats.items():
            stats[name] = _add_stat(stats[name], value) if name in stats else value
    return Partial(dW, db, stats)


def progress_topic(url: str) -> str:
    """The distributed event topic on which chunk tasks announce completion."""
    return f"dconv-progress-{dask.base.tokenize(url)}"


def _report_progress(url: str, index: int) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker
        return
    worker.log_event(progress_topic(url), index)


def tree_reduce(leaves: Sequence[Delayed], split_every: int, token: str) -> Delayed:
    """Combine ``leaves`` by a tree of fan-in ``split_every``, keeping their order.

    The depth is ``ceil(log(len(leaves), split_every))``; a single leaf still
    passes through one combine task, so the result is always a fresh Partial.
    """
    level, nodes = 0, list(leaves)
    while len(nodes) > 1 or level == 0:
        nodes = [
            dask.delayed(combine_partials, pure=True)(
                nodes[i : i + split_every], dask_key_name=(f"{COMBINE_PREFIX}-{level}-{token}", i // split_every)
            )
            for i in range(0, len(nodes), split_every)
        ]
        level += 1
    return nodes[0]


def tree_depth(n_leaves: int, split_every: int) -> int:
    """Number of combine levels :func:`tree_reduce` builds for ``n_leaves``."""
    return max(1, math.ceil(math.log(n_leaves, split_every) - 1e-12)) if n_leaves > 1 else 1


def backward_graph(
    dz_batches: Sequence[Any],
    a_batches: Sequence[Any],
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    bounds: Sequence[tuple[int, int]],
    *,
    split_every: int,
    finished: Sequence[bool] | None = None,
    check_finite: bool = False,
    simd_word: str | None = None,
) -> Delayed:
    """The whole job as one Dask computation that returns the reduced Partial.

    Parameters
    ----------
    dz_batches, a_batches : sequence of ZarrSlice or Delayed
        One entry per batch chunk: a slice the task reads itself, or a Dask
        block (for in-memory inputs).
    W : ndarray, shape (fh, fw, C_prev, C)
    bounds : sequence of (start, stop)
        From :func:`batch_bounds`.
    finished : sequence of bool, optional
        Chunks an earlier run finished; their partials are read back instead.
    simd_word : str, optional
        The job's ``DCONV_SIMD`` word, which each chunk task makes its
        worker's level; None keeps each worker's own.
    """
    token = dask.base.tokenize(out.url, geometry, bounds, split_every, W, simd_word)
    W_key = dask.delayed(W, name=f"dconv-W-{token}")
    finished = finished if finished is not None else [False] * len(bounds)
    leaves = []
    for index, ((start, _), dz_batch, a_batch, done) in enumerate(zip(bounds, dz_batches, a_batches, finished)):
        key = (f"{CHUNK_PREFIX}-{token}", index)
        if done:
            leaves.append(dask.delayed(load_finished_chunk, pure=True)(out, index, dask_key_name=key))
        else:
            leaves.append(
                dask.delayed(backward_chunk, pure=True)(
                    dz_batch, a_batch, W_key, geometry, out, index, start, check_finite, simd_word,
                    dask_key_name=key,
                )
            )
    return tree_reduce(leaves, split_every, token)

"""The Dask layer: chunk -> combine -> aggregate, as dask's own reductions are written.

For a batch of ``m`` samples cut into ``n = ceil(m / batch_chunk)`` chunks::

    chunk      chunk_partial(dZ_i, A_prev_i, W, geometry) -> {name: value}, one per
               BLOCK and SUM entry of the output layout (pure: arrays in, values out).
               The chunk task wraps it: set the job's SIMD level, read its slices,
               run it, write every value to the output store, announce progress,
               and return the SUM values as a Partial.
    combine    combine_partials([Partial, ...]) -> Partial: adds at most
               ``split_every`` partials, in chunk order, over ceil(log(n, split_every))
               levels (tree_shape).
    aggregate  aggregate(Partial, layout) -> {name: value}: each SUM in its output
               dtype and shape, and each FIGURE; run on the client.

The chunk tasks write their blocks themselves, so ``dA_prev`` never passes
through the client, and the inputs are read once: the stores and the reduction
are one computation. Chunks that an interrupted run already finished are not
recomputed: their partials are read back from the output store, and the tree
keeps the same shape and order, so the result is bitwise the same.

Tasks are pure functions of their arguments: running one twice writes the same
bytes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import dask
import numpy as np
import zarr
from dask.delayed import Delayed

from dconv import simd
from dconv.errors import InputError
from dconv.kernel import backward_kernel
from dconv.options import JobOptions
from dconv.params import ConvGeometry
from dconv.progress import CHUNK_PREFIX, report_chunk_done
from dconv.store import Kind, OutputLayout, OutputStore, read_batch
from dconv.store.layout import count_nonfinite, figures

__all__ = [
    "Partial",
    "ZarrSlice",
    "chunk_partial",
    "combine_partials",
    "aggregate",
    "tree_shape",
    "tree_reduce",
    "batch_bounds",
    "batch_sources",
    "backward_graph",
    "CHUNK_PREFIX",
]

COMBINE_PREFIX = "dconv-combine"


# --------------------------------------------------------------------------- chunk


def chunk_partial(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, options: JobOptions
) -> dict[str, Any]:
    """One chunk's values: one per BLOCK and SUM entry of :data:`dconv.store.layout.OUTPUT_LAYOUT`.

    Parameters
    ----------
    dZ : ndarray, shape (b, n_H, n_W, C)
    A_prev : ndarray, shape (b, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
        All three in the compute dtype.
    geometry : ConvGeometry
    options : JobOptions
        The job's options, for whatever of them shapes a chunk's values.

    Returns
    -------
    dict
        ``dA_prev`` (b, H, W, C_prev) in the compute dtype; float64 ``dW``
        (fh, fw, C_prev, C) and ``db`` (C,); ``nonfinite_dA_prev``, the count of
        NaN and Inf in ``dA_prev``.
    """
    # threads=1: Dask runs the chunks in parallel, and a chunk's bits must not depend on the worker
    grads = backward_kernel(dZ, A_prev, W, geometry, threads=1, float64_sums=True)
    return {
        "dA_prev": grads.dA_prev,
        "dW": grads.dW,
        "db": grads.db.reshape(-1),
        "nonfinite_dA_prev": count_nonfinite(grads.dA_prev),
    }


class Partial(NamedTuple):
    """The reducible part of one or more chunks.

    Attributes
    ----------
    sums : dict
        One value per SUM entry of the layout (float64 ``dW``, ``db``; the
        int64 NaN/Inf count of ``dA_prev``), summed over the chunks.
    stats : dict
        Summed over the chunks: wall time of the ``read``, ``kernel`` and
        ``write`` steps (seconds), and ``simd``, ``{level: chunks}``, the number
        of chunks that ran at each SIMD level.
    """

    sums: dict
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


def _load(source: Any, dtype: np.dtype) -> np.ndarray:
    array = source.read() if isinstance(source, ZarrSlice) else np.asarray(source)
    return array.astype(dtype, copy=False)


def _check_finite(name: str, array: np.ndarray, start: int) -> None:
    bad = count_nonfinite(array)
    if bad:
        raise InputError(
            f"{name}[{start}:{start + array.shape[0]}] holds {bad} non-finite values (check_finite=True)."
        )


class StepTimes:
    """Wall time of named steps: ``with times("read"): ...``, then ``times.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[step] = time.perf_counter() - start


def chunk_task(
    dz_source: Any,
    a_source: Any,
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    index: int,
    start: int,
    options: JobOptions,
) -> Partial:
    """Read one batch chunk, run :func:`chunk_partial` on it, write its values (a chunk task).

    Parameters
    ----------
    dz_source, a_source : ZarrSlice or ndarray
        ``dZ`` (b, n_H, n_W, C) and ``A_prev`` (b, H, W, C_prev) of this chunk.
    W : ndarray, shape (fh, fw, C_prev, C)
        Already in the compute dtype.
    out : OutputStore
        Receives the chunk's blocks at samples ``start:start + b`` and its records at ``index``.
    options : JobOptions
        The job's options. ``options.simd``, the job's ``DCONV_SIMD`` word, is
        made this worker's level first (:func:`dconv.simd.use_level`); None
        keeps this process's level. ``check_finite`` refuses NaN and Inf inputs.
    """
    level = simd.use_level(options.simd) if options.simd is not None else simd.active_level()
    times = StepTimes()
    with times("read"):
        dZ, A_prev = _load(dz_source, W.dtype), _load(a_source, W.dtype)
        if options.check_finite:
            _check_finite("dZ", dZ, start)
            _check_finite("A_prev", A_prev, start)
    with times("kernel"):
        values = chunk_partial(dZ, A_prev, W, geometry, options)
    with times("write"):
        out.write_chunk(index, start, values, level)
    report_chunk_done(out.url, index)
    sums = {entry.name: values[entry.name] for entry in out.layout.of_kind(Kind.SUM)}
    return Partial(sums, {**times.seconds, "simd": {level: 1}})


def finished_chunk(out: OutputStore, index: int) -> Partial:
    """The partial of a chunk that an earlier, interrupted run already finished, with its recorded level."""
    sums, level = out.read_partial(index)
    return Partial(sums, {"simd": {level: 1}})


# --------------------------------------------------------------------------- combine


def _add_stat(total: Any, value: Any) -> Any:
    """Numbers add; mappings (``simd``'s counts) add key by key."""
    if isinstance(value, Mapping):
        return {key: total.get(key, 0) + value.get(key, 0) for key in {**total, **value}}
    return total + value


def combine_partials(partials: Sequence[Partial]) -> Partial:
    """Add partials in the order given (a fixed order makes the sum reproducible)."""
    sums = {name: np.array(value, copy=True) for name, value in partials[0].sums.items()}
    stats = dict(partials[0].stats)
    for partial in partials[1:]:
        for name, value in partial.sums.items():
            sums[name] += value
        for name, value in partial.stats.items():
            stats[name] = _add_stat(stats[name], value) if name in stats else value
    return Partial(sums, stats)


def tree_shape(n_leaves: int, split_every: int) -> list[list[range]]:
    """The combine levels of a tree of fan-in ``split_every`` over ``n_leaves`` leaves.

    ``levels[k][j]`` is the range of nodes of the level below (the leaves, for
    ``k = 0``) that node ``j`` of level ``k`` adds, in order. There are
    ``ceil(log(n_leaves, split_every))`` levels, and at least one: a single
    leaf still passes through one combine.
    """
    levels: list[list[range]] = []
    width = n_leaves
    while width > 1 or not levels:
        levels.append([range(i, min(i + split_every, width)) for i in range(0, width, split_every)])
        width = len(levels[-1])
    return levels


def tree_depth(n_leaves: int, split_every: int) -> int:
    """The number of combine levels, ``len(tree_shape(n_leaves, split_every))``."""
    return len(tree_shape(n_leaves, split_every))


def tree_reduce(leaves: Sequence[Delayed], split_every: int, token: str) -> Delayed:
    """Combine ``leaves`` along :func:`tree_shape`, keeping their order; returns the root."""
    nodes = list(leaves)
    for depth, groups in enumerate(tree_shape(len(leaves), split_every)):
        nodes = [
            dask.delayed(combine_partials, pure=True)(
                [nodes[i] for i in group], dask_key_name=(f"{COMBINE_PREFIX}-{depth}-{token}", j)
            )
            for j, group in enumerate(groups)
        ]
    return nodes[0]


# --------------------------------------------------------------------------- aggregate


def aggregate(total: Partial, layout: OutputLayout) -> dict[str, Any]:
    """The finished values: each SUM entry in its output dtype and shape, then each FIGURE.

    A SUM entry with no output array (a count) comes back as a Python number.
    """
    values: dict[str, Any] = {}
    for entry in layout.of_kind(Kind.SUM):
        value = total.sums[entry.name]
        values[entry.name] = value.astype(entry.dtype).reshape(entry.shape) if entry.stored else value.item()
    return {**values, **figures(values)}


# --------------------------------------------------------------------------- the graph


def batch_bounds(m: int, batch_chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the batch chunks; the last may be shorter."""
    if not isinstance(batch_chunk, (int, np.integer)) or isinstance(batch_chunk, bool) or batch_chunk < 1:
        raise InputError(f"batch_chunk must be an int >= 1; got {batch_chunk!r} instead.")
    return [(start, min(start + batch_chunk, m)) for start in range(0, m, batch_chunk)]


def batch_sources(array: Any, name: str, bounds: Sequence[tuple[int, int]]) -> list[Any]:
    """One source per batch chunk: a :class:`ZarrSlice` of a Zarr array, else a Dask block of the array."""
    if isinstance(array, zarr.Array):
        return [ZarrSlice(array, name, start, stop) for start, stop in bounds]
    import dask.array as da

    chunks = (tuple(stop - start for start, stop in bounds), *[(n,) for n in array.shape[1:]])
    return list(da.asarray(array).rechunk(chunks).to_delayed().reshape(-1))


def backward_graph(
    dz_sources: Sequence[Any],
    a_sources: Sequence[Any],
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    bounds: Sequence[tuple[int, int]],
    options: JobOptions,
    finished: Sequence[bool] | None = None,
) -> Delayed:
    """The whole job as one Dask computation that returns the reduced :class:`Partial`.

    Parameters
    ----------
    dz_sources, a_sources : sequence of ZarrSlice or Delayed
        One per batch chunk (:func:`batch_sources`).
    W : ndarray, shape (fh, fw, C_prev, C)
    out : OutputStore
        The output, with its layout.
    bounds : sequence of (start, stop)
        From :func:`batch_bounds`.
    options : JobOptions
        The job's options: ``split_every`` shapes the tree, and every chunk task
        gets them (see :func:`chunk_task`).
    finished : sequence of bool, optional
        Chunks an earlier run finished; their partials are read back instead.
    """
    token = dask.base.tokenize(out.url, geometry, bounds, options, W)
    W_key = dask.delayed(W, name=f"dconv-W-{token}")
    finished = finished if finished is not None else [False] * len(bounds)
    leaves = []
    for index, ((start, _), dz_source, a_source, done) in enumerate(zip(bounds, dz_sources, a_sources, finished)):
        key = (f"{CHUNK_PREFIX}-{token}", index)
        if done:
            leaves.append(dask.delayed(finished_chunk, pure=True)(out, index, dask_key_name=key))
        else:
            leaves.append(
                dask.delayed(chunk_task, pure=True)(
                    dz_source, a_source, W_key, geometry, out, index, start, options, dask_key_name=key
                )
            )
    return tree_reduce(leaves, options.split_every, token)

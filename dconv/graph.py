"""The Dask layer: chunk -> combine -> aggregate, as dask's own reductions are written.

For a batch of ``m`` samples cut into ``n = ceil(m / batch_chunk)`` chunks::

    chunk      chunk_partial(dZ_i, A_prev_i, W, geometry) -> {name: value}, one per
               BLOCK and REDUCE entry of the output layout (pure: arrays in, values out).
               The chunk task wraps it: set the job's SIMD level, read its slices,
               run it, write every value to the output store (its blocks, then its
               leaf record), announce progress, and return the REDUCE values as a Partial.
    combine    combine_partials([Partial, ...]) -> Partial: adds at most
               ``split_every`` partials, in chunk order, over ceil(log(n, split_every))
               levels (tree_shape). The combine task wraps it: it writes the node's
               record, then drops its children's (:mod:`dconv.store.records`).
    aggregate  aggregate(Partial, layout) -> {name: value}: each REDUCE entry in its output
               dtype and shape, and each FIGURE; run on the client.

The chunk tasks write their blocks themselves, so ``dA_prev`` never passes
through the client, and the inputs are read once: the stores and the reduction
are one computation.

What every task shares (``W``, the geometry, the output store, the options, the
input arrays) is one :class:`JobContext` under one key, as ``da.from_array``
puts its array under one key: a worker fetches it once, and a task's own
arguments are a few integers. Node ``(depth, index)`` of the tree covers
chunks ``index * s**depth`` up to ``(index + 1) * s**depth`` (``s`` =
``split_every``; depth 0 is a chunk). A resumed job starts from the *frontier*
of stored records: a stored node is one task that reads its record back, and
the tree keeps the same shape and order, so the result is bitwise the same.

:meth:`JobGraph.compute` submits the tree in *waves*, one subtree of
:data:`WAVE_CHUNKS` chunks or fewer at a time, at most two in flight. A wave's
root writes its record like any combine; each node above the waves is one task,
submitted once its children's records are all stored, that reads them back and
adds them in the same order. No task depends on a finished wave, so the
scheduler forgets it, and neither the client nor the scheduler ever holds the
whole graph::

    depth 3   combine_stored(records of (2, 0), (2, 1))            above the waves
    depth 2   wave (2, 0): chunks 0-63 + their combines  |  wave (2, 1): chunks 64-127 ...

Tasks are pure functions of their arguments: running one twice writes the same
bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import dask
import numpy as np
import zarr
from dask.delayed import Delayed
from dask.task_spec import DataNode, List, Task, TaskRef

from dconv import simd
from dconv.errors import InputError
from dconv.kernel import backward_kernel
from dconv.statistics import top_samples
from dconv.options import JobOptions
from dconv.params import ConvGeometry
from dconv.progress import CHUNK_PREFIX, report_chunk_done
from dconv.store import Kind, OutputLayout, OutputStore, read_batch
from dconv.store.layout import count_nonfinite, figures
from dconv.store.output import LEVEL_CODES

__all__ = [
    "Partial",
    "JobContext",
    "JobGraph",
    "ZarrBatches",
    "DaskBatches",
    "BatchBounds",
    "chunk_partial",
    "combine_partials",
    "aggregate",
    "level_counts",
    "tree_shape",
    "tree_reduce",
    "batch_bounds",
    "batch_sources",
    "backward_graph",
    "CHUNK_PREFIX",
    "WAVE_CHUNKS",
    "WAVE_BYTES",
]

COMBINE_PREFIX = "dconv-combine"
CONTEXT_PREFIX = "dconv-job"
WAVE_PREFIX = "dconv-wave"

WAVE_CHUNKS = 256
"""At most this many chunks in one wave (a subtree of ``split_every**k`` chunks: 64 with the
default fan-in of 8), on a cluster of up to ``WAVE_CHUNKS / WAVE_TASKS_PER_THREAD`` worker threads.

The scheduler holds the tasks of the waves in flight, several KiB each (its
state, the message logs of their transitions). Measured on 2 workers (AMD EPYC
Zen 3), m = 2^20 samples of 8x8x4 in 1024 tasks: the client and its scheduler
peaked 8.2 MiB above a 32-task job with waves of 512 chunks (two in flight:
the whole job), 5.6 MiB with waves of 64."""

WAVE_TASKS_PER_THREAD = 4
"""On a larger cluster a wave has at least this many chunks per worker thread, so none idles."""

WAVE_BYTES = 2**30
"""At most this many bytes of chunk partials in one wave (``split_every**k`` x one partial)."""

WAVES_IN_FLIGHT = 2
"""Waves submitted and not yet finished: the next one is queued while one runs, so workers never idle."""

Node = tuple[int, int]
"""``(depth, index)``: depth 0 is chunk ``index``; depth d >= 1 is node ``index`` of combine level d - 1."""


# --------------------------------------------------------------------------- chunk


def chunk_partial(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, options: JobOptions, start: int = 0
) -> dict[str, Any]:
    """One chunk's values: one per BLOCK and REDUCE entry of the job's layout (:data:`dconv.store.layout.OUTPUT_LAYOUT`).

    Parameters
    ----------
    dZ : ndarray, shape (b, n_H, n_W, C)
    A_prev : ndarray, shape (b, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
        All three in the compute dtype.
    geometry : ConvGeometry
    options : JobOptions
        The job's options: ``dA_prev`` and ``stats`` say which values there are.
    start : int
        The batch index of the chunk's first sample (the statistics' top samples name samples by it).

    Returns
    -------
    dict
        Float64 ``dW`` (fh, fw, C_prev, C) and ``db`` (C,). With ``options.dA_prev``:
        ``dA_prev`` (b, H, W, C_prev) in the compute dtype and ``nonfinite_dA_prev``,
        its count of NaN and Inf. With ``options.stats``: ``stats/sample_grad_norm2``
        (b,), ``stats/dW_sq`` (fh, fw, C_prev, C) and ``stats/db_sq`` (1, 1, 1, C) in
        float64, and ``stats/top_samples``, the chunk's largest ``|g_i|^2``.
    """
    # threads=1: Dask runs the chunks in parallel, and a chunk's bits must not depend on the worker
    grads = backward_kernel(
        dZ, A_prev, W, geometry, threads=1, float64_sums=True, stats=options.stats, dA_prev=options.dA_prev
    )
    values: dict[str, Any] = {"dW": grads.dW, "db": grads.db.reshape(-1)}
    if options.dA_prev:
        values.update({"dA_prev": grads.dA_prev, "nonfinite_dA_prev": count_nonfinite(grads.dA_prev)})
    if options.stats:
        sample_stats = grads.stats
        values.update(
            {
                "stats/sample_grad_norm2": sample_stats.sample_grad_norm2,
                "stats/dW_sq": sample_stats.dW_sq,
                "stats/db_sq": sample_stats.db_sq,
                "stats/top_samples": top_samples(sample_stats.sample_grad_norm2, start),
            }
        )
    return values


NO_LEVELS = np.zeros(0, dtype=np.uint8)


class Partial(NamedTuple):
    """The reducible part of one or more consecutive chunks.

    Attributes
    ----------
    sums : dict
        One value per REDUCE entry of the layout (float64 ``dW``, ``db``; the
        int64 NaN/Inf count of ``dA_prev``; with the statistics, ``stats/dW_sq``
        and the others), reduced over the chunks.
    seconds : dict
        Summed over the chunks: wall time of the ``read``, ``kernel`` and
        ``write`` steps of the chunks computed in this run.
    levels : ndarray of uint8, shape (chunks,)
        The SIMD level code (:data:`dconv.store.output.LEVEL_CODES`) each chunk ran at, in chunk order.
    """

    sums: dict
    seconds: dict
    levels: np.ndarray = NO_LEVELS


def level_counts(levels: np.ndarray) -> dict[str, int]:
    """``{level: chunks}`` from level codes (a :class:`Partial`'s ``levels``), levels in name order."""
    codes, counts = np.unique(np.asarray(levels, dtype=np.uint8), return_counts=True)
    found = {(LEVEL_CODES[code] if code < len(LEVEL_CODES) else "unknown"): int(n) for code, n in zip(codes, counts)}
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class ZarrBatches:
    """A Zarr array read by batch chunks: each task reads its own samples ``start:stop``.

    Picklable (zarr.Array is opened again on the worker) and shared by every
    task of a job (:class:`JobContext`).
    """

    array: Any  # zarr.Array
    name: str

    def read(self, start: int, stop: int) -> np.ndarray:
        return read_batch(self.array, self.name, start, stop)


@dataclass(frozen=True)
class DaskBatches:
    """A Dask array chunked along m as the batch chunks: block ``i`` is chunk ``i``.

    Each wave's graph carries the part of this array's graph its chunks need.
    """

    array: Any  # dask.array.Array

    def key(self, index: int) -> tuple:
        return (self.array.name, index, *[0] * (self.array.ndim - 1))

    def block(self, index: int) -> np.ndarray:
        return np.asarray(self.array.blocks[index].compute(scheduler="synchronous"))

    def graph(self, indices: Sequence[int]) -> dict:
        """The tasks that make blocks ``indices``, and nothing else."""
        return dict(self.array.__dask_graph__().cull({self.key(i) for i in indices}))


@dataclass(frozen=True)
class JobContext:
    """What every task of a job shares: one key in the graph, fetched once by each worker.

    Attributes
    ----------
    W : ndarray, shape (fh, fw, C_prev, C)
        In the compute dtype.
    geometry : ConvGeometry
    out : OutputStore
        The output, with its layout.
    options : JobOptions
    dZ, A_prev : ZarrBatches, optional
        The inputs, when read from Zarr by the tasks; None when they come as Dask blocks.
    """

    W: np.ndarray
    geometry: ConvGeometry
    out: OutputStore
    options: JobOptions
    dZ: ZarrBatches | None = None
    A_prev: ZarrBatches | None = None


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
    context: JobContext,
    index: int,
    start: int,
    stop: int,
    dZ: np.ndarray | None = None,
    A_prev: np.ndarray | None = None,
) -> Partial:
    """Read batch chunk ``index`` (samples ``start:stop``), run :func:`chunk_partial` on it, write its values.

    Parameters
    ----------
    context : JobContext
        The job. ``options.simd``, the job's ``DCONV_SIMD`` word, is made this
        worker's level first (:func:`dconv.simd.use_level`); None keeps this
        process's level. ``check_finite`` refuses NaN and Inf inputs.
    index, start, stop : int
        The chunk and its samples.
    dZ, A_prev : ndarray, optional
        ``dZ`` (b, n_H, n_W, C) and ``A_prev`` (b, H, W, C_prev) of this chunk
        when they come as Dask blocks; by default read from ``context``'s Zarr arrays.
    """
    options, W = context.options, context.W
    level = simd.use_level(options.simd) if options.simd is not None else simd.active_level()
    times = StepTimes()
    with times("read"):
        dZ = context.dZ.read(start, stop) if dZ is None else np.asarray(dZ)
        A_prev = context.A_prev.read(start, stop) if A_prev is None else np.asarray(A_prev)
        dZ, A_prev = dZ.astype(W.dtype, copy=False), A_prev.astype(W.dtype, copy=False)
        if options.check_finite:
            _check_finite("dZ", dZ, start)
            _check_finite("A_prev", A_prev, start)
    with times("kernel"):
        values = chunk_partial(dZ, A_prev, W, context.geometry, options, start)
    with times("write"):
        context.out.write_chunk(index, start, values, level)
    report_chunk_done(context.out.url, index)
    sums = {entry.name: values[entry.name] for entry in context.out.layout.of_kind(Kind.REDUCE)}
    return Partial(sums, times.seconds, np.array([LEVEL_CODES.index(level)], dtype=np.uint8))


def stored_node(context: JobContext, depth: int, index: int) -> Partial:
    """The partial of node ``(depth, index)``, which an earlier run finished and stored (its record)."""
    sums, levels = context.out.read_node(depth, index)
    return Partial(sums, {}, np.asarray(levels, dtype=np.uint8))


# --------------------------------------------------------------------------- combine


def combine_partials(partials: Sequence[Partial], layout: OutputLayout | None = None) -> Partial:
    """Add partials in the order given (a fixed order makes the sum reproducible); levels are concatenated.

    An entry of ``layout`` with a ``combine`` of its own (the top samples) is reduced by it instead.
    """
    combine = {entry.name: entry.combine for entry in layout.of_kind(Kind.REDUCE) if entry.combine} if layout else {}
    sums = {name: np.array(value, copy=True) for name, value in partials[0].sums.items()}
    seconds = dict(partials[0].seconds)
    for partial in partials[1:]:
        for name, value in partial.sums.items():
            if name in combine:
                sums[name] = combine[name](sums[name], value)
            else:
                sums[name] += value
        for name, value in partial.seconds.items():
            seconds[name] = seconds[name] + value if name in seconds else value
    levels = np.concatenate([np.asarray(partial.levels, dtype=np.uint8) for partial in partials])
    return Partial(sums, seconds, levels)


def combine_task(
    context: JobContext, depth: int, index: int, partials: Sequence[Partial], computed: Sequence[int]
) -> Partial:
    """Combine node ``(depth, index)``: add its children's ``partials``, write its record, drop theirs.

    Parameters
    ----------
    partials : sequence of Partial
        Of its children ``(depth - 1, i)``, in order.
    computed : sequence of int
        The children computed in this run, whose records this node's replaces
        (kept with ``options.keep_partials``). Children read back from their
        records keep them until the job finishes: a lost result is read again.
    """
    total = combine_partials(partials, context.out.layout)
    context.out.write_node(depth, index, total.sums, total.levels)
    if not context.options.keep_partials and computed:
        context.out.drop_nodes([(depth - 1, i) for i in computed])
    return total


def combine_stored(context: JobContext, depth: int, index: int, children: Sequence[int]) -> Partial:
    """Combine node ``(depth, index)`` from its children's records (a node above the waves).

    It depends on no task, only on records, so the scheduler keeps nothing of the
    waves below it. Run again after it dropped its children's records (its
    worker was lost), it returns its own record.
    """
    try:
        return stored_node(context, depth, index)
    except FileNotFoundError:  # the usual case: not combined yet
        pass
    children_partials = [stored_node(context, depth - 1, i) for i in children]
    return combine_task(context, depth, index, children_partials, children)


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
    """The number of combine levels, ``len(tree_shape(n_leaves, split_every))``: the root's depth."""
    depth, width = 0, n_leaves
    while width > 1 or depth == 0:
        width, depth = -(-width // split_every), depth + 1
    return depth


def tree_reduce(leaves: Sequence[Delayed], split_every: int, token: str) -> Delayed:
    """Combine ``leaves`` along :func:`tree_shape` with :func:`combine_partials`, keeping their order; the root."""
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
    """The finished values: each REDUCE entry in its output dtype and shape, then each FIGURE.

    A REDUCE entry with no output array comes back as a Python number if it is a
    count, else as its reduced partial (the top samples). The figures are
    computed from the reduced partials before the cast (float64 ``dW``, ``db``).
    """
    values: dict[str, Any] = {}
    for entry in layout.of_kind(Kind.REDUCE):
        value = total.sums[entry.name]
        if entry.stored:
            values[entry.name] = value.astype(entry.dtype).reshape(entry.shape)
        else:
            values[entry.name] = value.item() if np.ndim(value) == 0 else value
    return {**values, **figures(layout, values, total.sums)}


# --------------------------------------------------------------------------- the batch


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


def batch_sources(array: Any, name: str, bounds: BatchBounds) -> ZarrBatches | DaskBatches:
    """How the tasks get their batch of ``array``: a Zarr array is read by each task
    (:class:`ZarrBatches`), anything else becomes a Dask array chunked along ``bounds``."""
    if isinstance(array, zarr.Array):
        return ZarrBatches(array, name)
    import dask.array as da

    chunks = (tuple(stop - start for start, stop in bounds), *[(n,) for n in array.shape[1:]])
    return DaskBatches(da.asarray(array).rechunk(chunks))


# --------------------------------------------------------------------------- the graph


def partial_bytes(layout: OutputLayout) -> int:
    """Bytes of one chunk's partial: its REDUCE values."""
    return sum(math.prod(e.partial_shape) * np.dtype(e.partial_dtype).itemsize for e in layout.of_kind(Kind.REDUCE))


def wave_depth(
    n_chunks: int, split_every: int, nbytes: int, wave_chunks: int = WAVE_CHUNKS, wave_bytes: int = WAVE_BYTES
) -> int:
    """The depth ``k`` of the wave roots: the largest with ``split_every**k`` chunks at most ``wave_chunks``
    and their partials (``nbytes`` each) at most ``wave_bytes``; at least 1, at most the root's depth (then
    one wave)."""
    height, depth = tree_depth(n_chunks, split_every), 1
    while depth < height:
        chunks = split_every ** (depth + 1)
        if chunks > wave_chunks or chunks * nbytes > wave_bytes:
            break
        depth += 1
    return depth


@dataclass(frozen=True)
class JobGraph:
    """The job's reduction tree, built subtree by subtree: the whole of it never exists at once.

    Attributes
    ----------
    context : JobContext
    bounds : BatchBounds
        The batch chunks, the leaves of the tree.
    split_every : int
    token : str
        Makes the keys of this job's tasks unique.
    stored : frozenset of (depth, index)
        The frontier of an earlier run: nodes read back from their records.
    dZ, A_prev : DaskBatches, optional
        Inputs that come as Dask blocks (None: read from Zarr by the tasks).
    wave_chunks : int
        At most this many chunks per wave (see :func:`wave_depth`).
    """

    context: JobContext
    bounds: BatchBounds
    split_every: int
    token: str
    stored: frozenset = frozenset()
    dZ: DaskBatches | None = None
    A_prev: DaskBatches | None = None
    wave_chunks: int = WAVE_CHUNKS

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    @property
    def root(self) -> Node:
        return tree_depth(self.n_chunks, self.split_every), 0

    @property
    def context_key(self) -> str:
        return f"{CONTEXT_PREFIX}-{self.token}"

    @cached_property
    def wave_depth(self) -> int:
        nbytes = partial_bytes(self.context.out.layout) if self.context.out.layout is not None else 0
        return wave_depth(self.n_chunks, self.split_every, nbytes, self.wave_chunks)

    def key(self, node: Node) -> tuple[str, int]:
        depth, index = node
        if depth == 0:
            return f"{CHUNK_PREFIX}-{self.token}", index
        return f"{COMBINE_PREFIX}-{depth - 1}-{self.token}", index

    def children(self, node: Node) -> list[Node]:
        depth, index = node
        width = -(-self.n_chunks // self.split_every ** (depth - 1))
        first = index * self.split_every
        return [(depth - 1, i) for i in range(first, min(first + self.split_every, width))]

    # ----------------------------------------------------------------------- tasks

    def read_task(self, node: Node) -> Task:
        """The task that reads stored node ``node`` back."""
        return Task(self.key(node), stored_node, TaskRef(self.context_key), *node)

    def chunk_task(self, index: int) -> Task:
        start, stop = self.bounds[index]
        blocks = [TaskRef(source.key(index)) if source is not None else None for source in (self.dZ, self.A_prev)]
        extra = blocks if any(block is not None for block in blocks) else []
        return Task(self.key((0, index)), chunk_task, TaskRef(self.context_key), index, start, stop, *extra)

    def combine_task(self, node: Node, children: Sequence[Node]) -> Task:
        """The task that adds ``children``'s partials (their tasks' keys) into node ``node``."""
        computed = tuple(index for depth, index in children if (depth, index) not in self.stored)
        partials = List(*(TaskRef(self.key(child)) for child in children))
        return Task(self.key(node), combine_task, TaskRef(self.context_key), *node, partials, computed)

    def subtree(self, node: Node) -> dict:
        """The tasks that compute node ``node``: down to stored nodes and chunks, and the Dask
        blocks those chunks read; not the shared :class:`JobContext` (its key is referenced)."""
        tasks: dict = {}
        chunks: list[int] = []
        pending = [node]
        while pending:
            current = pending.pop()
            if current in self.stored:
                tasks[self.key(current)] = self.read_task(current)
            elif current[0] == 0:
                tasks[self.key(current)] = self.chunk_task(current[1])
                chunks.append(current[1])
            else:
                children = self.children(current)
                tasks[self.key(current)] = self.combine_task(current, children)
                pending.extend(children)
        for source in (self.dZ, self.A_prev):
            if source is not None and chunks:
                tasks.update(source.graph(chunks))
        return tasks

    def context_task(self) -> DataNode:
        return DataNode(self.context_key, self.context)

    def to_delayed(self) -> Delayed:
        """The whole tree as one Dask computation (for inspection and small jobs)."""
        tasks = self.subtree(self.root)
        tasks[self.context_key] = self.context_task()
        return Delayed(self.key(self.root), tasks)

    def chunks_to_compute(self) -> int:
        """Chunks not covered by a stored node."""
        done = 0
        for depth, index in self.stored:
            width = self.split_every**depth
            done += len(range(index * width, min((index + 1) * width, self.n_chunks)))
        return self.n_chunks - done

    # ----------------------------------------------------------------------- running

    def above_waves(self) -> tuple[list[Node], dict[Node, list[Node]]]:
        """The wave roots to compute, in chunk order, and each node above them to combine, with its children.

        Stored nodes and what they cover are in neither.
        """
        waves: list[Node] = []
        combines: dict[Node, list[Node]] = {}
        pending = [self.root]
        while pending:
            node = pending.pop()
            if node in self.stored:
                continue
            if node[0] <= self.wave_depth:
                waves.append(node)
                continue
            combines[node] = self.children(node)
            pending.extend(reversed(combines[node]))
        return waves, combines

    def compute(
        self,
        *,
        client: Any = None,
        scheduler: str | None = None,
        in_flight: int = WAVES_IN_FLIGHT,
        workers: Callable[[], Sequence[str] | None] | None = None,
    ) -> Partial:
        """Compute the tree wave by wave, on a distributed ``client`` or the local ``scheduler``.

        Returns the root's :class:`Partial`.

        Each wave is one subtree, submitted as one graph. On a cluster at most
        ``in_flight`` waves are unfinished at a time (the next one is queued
        while one runs). A wave's root writes its record; the nodes above the
        waves are combined from their children's records once those are all
        stored, so no task depends on a finished wave and the scheduler
        forgets a wave once it is done. On a local scheduler the waves run one
        after the other and the nodes above them are added in this process.
        The order of every addition is the tree's, so the bits are those of
        one graph of the whole tree.

        ``workers``, on a cluster, is called before each submission (the
        context, each wave, each node above the waves): the worker addresses
        its tasks must run on (``allow_other_workers=False``), or None for any.
        Asked again for each, it lets a worker that joins mid-job take the
        next waves.
        """
        if self.root in self.stored:
            return stored_node(self.context, *self.root)
        if client is not None:
            threads = sum(client.nthreads().values())
            graph = dataclasses.replace(self, wave_chunks=max(self.wave_chunks, WAVE_TASKS_PER_THREAD * threads))
            return _ClusterWaves(graph, client, in_flight, workers).run()
        return self._compute_locally(dask.base.get_scheduler(scheduler=scheduler or "threads"))

    def _compute_locally(self, get: Any) -> Partial:
        def compute(node: Node) -> Partial:
            if node in self.stored:
                return stored_node(self.context, *node)
            if node[0] <= self.wave_depth:
                return get({**self.subtree(node), self.context_key: self.context_task()}, self.key(node))
            children = self.children(node)
            computed = [index for depth, index in children if (depth, index) not in self.stored]
            return combine_task(self.context, *node, [compute(child) for child in children], computed)

        return compute(self.root)


class _ClusterWaves:
    """A :class:`JobGraph` run on a distributed cluster, wave by wave.

    The job's context is one task whose key every wave refers to; this client
    holds its future, so the scheduler keeps it (and can compute it again if
    its workers are lost). A wave's last task returns only its step times; once
    this client has them, it releases the wave, which the scheduler then forgets.
    """

    def __init__(
        self, graph: JobGraph, client: Any, in_flight: int, workers: Callable[[], Sequence[str] | None] | None = None
    ) -> None:
        self.graph, self.client, self.in_flight = graph, client, max(1, in_flight)
        self.workers = workers or (lambda: None)
        key = graph.context_key
        self.context = self.submit({key: graph.context_task()}, key)

    def submit(self, tasks: dict, key: Any) -> Any:
        """``tasks`` as one graph, restricted to ``self.workers()`` if that names any; the future of ``key``."""
        workers = self.workers()
        restricted = {"workers": list(workers), "allow_other_workers": False} if workers else {}
        # fifo_timeout=0: each submission is a new generation, run after the ones before it
        return self.client.get(tasks, key, sync=False, fifo_timeout=0, **restricted)

    def submit_wave(self, node: Node) -> Any:
        """The wave under ``node``; its future is that of a task returning the wave's step times."""
        graph = self.graph
        if node == graph.root:  # one wave: the whole tree
            return self.submit(graph.subtree(node), graph.key(node))
        key = (f"{WAVE_PREFIX}-{graph.token}", node[1])
        tasks = {**graph.subtree(node), key: Task(key, step_times, TaskRef(graph.key(node)))}
        return self.submit(tasks, key)

    def submit_combine(self, node: Node, children: Sequence[Node]) -> Any:
        key = self.graph.key(node)
        task = Task(key, combine_stored, TaskRef(self.graph.context_key), *node, [index for _, index in children])
        return self.submit({key: task}, key)

    def run(self) -> Partial:
        from distributed import as_completed

        graph = self.graph
        waves, combines = graph.above_waves()
        parent = {child: node for node, children in combines.items() for child in children}
        missing = {node: sum(child not in graph.stored for child in children) for node, children in combines.items()}
        node_of: dict = {}
        running = as_completed()

        def submit(future: Any, node: Node) -> None:
            node_of[future.key] = node
            running.add(future)

        upcoming = iter(waves)
        for node in waves[: self.in_flight]:
            submit(self.submit_wave(next(upcoming)), node)
        for node, count in missing.items():
            if count == 0:
                submit(self.submit_combine(node, combines[node]), node)
        seconds: dict = {}
        for future in running:
            if future.status != "finished":
                future.result()  # raises the task's error
            node = node_of.pop(future.key)
            if node == graph.root:
                total = future.result()
                return Partial(total.sums, _add_seconds(seconds, total.seconds), total.levels)
            is_wave = node[0] <= graph.wave_depth
            if is_wave:  # only a wave's step times come back; a node above the waves is read from its record
                seconds = _add_seconds(seconds, future.result())
            future.release()  # before the next wave is submitted: the scheduler forgets this one first
            following = next(upcoming, None) if is_wave else None
            if following is not None:
                submit(self.submit_wave(following), following)
            missing[parent[node]] -= 1
            if missing[parent[node]] == 0:
                submit(self.submit_combine(parent[node], combines[parent[node]]), parent[node])
        raise RuntimeError("the job's tree has no root")  # unreachable: the root is always submitted last


def step_times(partial: Partial) -> dict:
    """A wave's last task: the summed step times of its chunks (all the client needs of it)."""
    return partial.seconds


def _add_seconds(total: Mapping[str, float], more: Mapping[str, float]) -> dict:
    return {name: total.get(name, 0) + more.get(name, 0) for name in {**total, **more}}


def backward_graph(
    dz_sources: ZarrBatches | DaskBatches | None,
    a_sources: ZarrBatches | DaskBatches | None,
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    bounds: BatchBounds,
    options: JobOptions,
    stored: Sequence[Node] | None = None,
    wave_chunks: int = WAVE_CHUNKS,
) -> JobGraph:
    """The whole job as a :class:`JobGraph`, whose root is the reduced :class:`Partial`.

    Parameters
    ----------
    dz_sources, a_sources : ZarrBatches or DaskBatches
        ``dZ`` and ``A_prev`` by batch chunk (:func:`batch_sources`).
    W : ndarray, shape (fh, fw, C_prev, C)
    out : OutputStore
        The output, with its layout.
    bounds : BatchBounds
        From :func:`batch_bounds`.
    options : JobOptions
        The job's options: ``split_every`` shapes the tree, and every task
        gets them (see :func:`chunk_task`).
    stored : sequence of (depth, index), optional
        The frontier of an earlier run (:func:`dconv.store.records.frontier`):
        nodes read back from their records instead of computed.
    wave_chunks : int
        At most this many chunks in one wave.
    """
    if not isinstance(bounds, BatchBounds):
        raise InputError(f"bounds must be a BatchBounds (batch_bounds); got {type(bounds).__name__} instead.")
    token = dask.base.tokenize(out.url, geometry, bounds, options, W)
    context = JobContext(
        W,
        geometry,
        out,
        options,
        dz_sources if isinstance(dz_sources, ZarrBatches) else None,
        a_sources if isinstance(a_sources, ZarrBatches) else None,
    )
    return JobGraph(
        context,
        bounds,
        options.split_every,
        token,
        frozenset(tuple(node) for node in (stored or ())),
        dz_sources if isinstance(dz_sources, DaskBatches) else None,
        a_sources if isinstance(a_sources, DaskBatches) else None,
        wave_chunks,
    )

"""The Dask layer: chunk -> combine -> aggregate, as dask's own reductions are written, and the graph.

For a batch of ``m`` samples cut into ``n = ceil(m / batch_chunk)`` chunks::

    chunk      chunk_partial(dZ_i, A_prev_i, W, geometry) -> {name: value}, one per
               BLOCK and REDUCE entry of the output layout (pure: arrays in, values out).
               The chunk task (run_chunk_task) wraps it: set the job's SIMD level, get its
               blocks, run it, write every value to the output store (its blocks, then its
               leaf record), announce progress, and return the REDUCE values as a Partial.
    combine    combine_partials([Partial, ...]) -> Partial: adds at most ``split_every``
               partials, in chunk order, over ceil(log(n, split_every)) levels
               (:mod:`dconv.tree`). The combine task (run_combine_task) wraps it: it
               writes the node's record, then drops its children's (:mod:`dconv.store.records`).
    aggregate  aggregate(Partial, layout) -> {name: value}: each REDUCE entry in its output
               dtype and shape, and each FIGURE; run on the client.

The chunk tasks write their blocks themselves, so ``dA_prev`` never passes
through the client, and the inputs are read once: the stores and the reduction
are one computation.

What every task shares (``W``, the geometry, the output store, the options, the
Zarr inputs) is one :class:`JobContext` under one key, as ``da.from_array``
puts its array under one key: a worker fetches it once, and a task's own
arguments are a few integers. :class:`JobGraph` builds the tasks of any
subtree of the reduction tree (:mod:`dconv.tree`), down to the chunks or to
nodes stored by an earlier run: a stored node is one task that reads its
record back, and the tree keeps the same shape and order, so the result is
bitwise the same. :mod:`dconv.waves` runs a JobGraph subtree by subtree.

Tasks are pure functions of their arguments: running one twice writes the same
bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import dask
import numpy as np
from dask.delayed import Delayed
from dask.task_spec import DataNode, List, Task, TaskRef

from dconv import simd
from dconv.errors import InputError, NonFiniteInput
from dconv.kernel import backward_kernel
from dconv.statistics import chunk_values
from dconv.options import JobOptions
from dconv.params import ConvGeometry
from dconv.progress import report_chunk_done
from dconv.sources import BatchBounds, BatchSource, ZarrBatches
from dconv.store import OUTPUT_LAYOUT, Kind, OutputLayout, OutputStore
from dconv.store.layout import SAMPLE_DOT, SKETCH_VALUES, count_nonfinite, figures
from dconv.store.output import level_code
from dconv import tree
from dconv.tree import Node

__all__ = [
    "Partial",
    "JobContext",
    "JobGraph",
    "chunk_partial",
    "combine_partials",
    "aggregate",
    "backward_graph",
    "CHUNK_PREFIX",
    "COMBINE_PREFIX",
]

CHUNK_PREFIX = "dconv-chunk"
"""The key prefix of chunk tasks: ``(f"{CHUNK_PREFIX}-{token}", index)``."""

COMBINE_PREFIX = "dconv-combine"
"""The key prefix of combine tasks: ``(f"{COMBINE_PREFIX}-{depth - 1}-{token}", index)``."""

CONTEXT_PREFIX = "dconv-job"
"""The key prefix of a job's shared :class:`JobContext`."""


# --------------------------------------------------------------------------- chunk


def chunk_partial(
    dZ: np.ndarray,
    A_prev: np.ndarray,
    W: np.ndarray,
    geometry: ConvGeometry,
    options: JobOptions,
    start: int = 0,
    bias: bool = True,
    queries: np.ndarray | None = None,
    projections: Any = None,
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
    bias : bool
        The layer has a bias; without one the statistics leave ``db_i`` out of ``g_i``.
    queries : ndarray, shape (n_q, K + 1, C), optional
        With ``options.dot``: ``dots/sample_dot`` (b, n_q), float64.
    projections : Projections, optional
        With ``options.sketch``: ``sketch/values`` (b, k_in, k_out), in ``options.sketch_dtype``.

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
        dZ, A_prev, W, geometry, threads=1, float64_sums=True, stats=options.stats, dA_prev=options.dA_prev,
        bias=bias, queries=queries, projections=projections,
    )
    values: dict[str, Any] = {"dW": grads.dW, "db": grads.db.reshape(-1)}
    if options.dA_prev:
        values.update({"dA_prev": grads.dA_prev, "nonfinite_dA_prev": count_nonfinite(grads.dA_prev)})
    if options.stats:
        values.update(chunk_values(grads.stats, start))
    if queries is not None:
        values[SAMPLE_DOT] = grads.sample_dot
    if projections is not None:
        values[SKETCH_VALUES] = grads.sketch.astype(options.sketch_dtype or "float32")
    return values


NO_LEVELS = np.zeros(0, dtype=np.uint8)


class Partial(NamedTuple):
    """The reducible part of one or more consecutive chunks.

    Attributes
    ----------
    reduced : dict
        One value per REDUCE entry of the layout, reduced over the chunks: float64
        sums (``dW``, ``db``; with the statistics ``stats/dW_sq`` and ``stats/db_sq``),
        the int64 NaN/Inf count of ``dA_prev``, and the top samples (``stats/top_samples``).
    seconds : dict
        Summed over the chunks: wall time of the ``read``, ``kernel`` and
        ``write`` steps of the chunks computed in this run.
    levels : ndarray of uint8, shape (chunks,)
        The SIMD level code (:data:`dconv.store.output.LEVEL_CODES`) each chunk ran at, in chunk order.
    """

    reduced: dict
    seconds: dict
    levels: np.ndarray = NO_LEVELS


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
        The inputs a task reads itself (a source's ``reader``); None when they come as Dask blocks.
    queries : ndarray, optional
        With ``dot``: the query gradients (n_q, K + 1, C).
    projections : Projections, optional
        With ``sketch``: the sketches' projections.
    """

    W: np.ndarray
    geometry: ConvGeometry
    out: OutputStore
    options: JobOptions
    dZ: ZarrBatches | None = None
    A_prev: ZarrBatches | None = None
    queries: np.ndarray | None = None
    projections: Any = None


def _check_finite(name: str, array: np.ndarray, start: int) -> None:
    bad = count_nonfinite(array)
    if bad:
        raise NonFiniteInput(
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


def run_chunk_task(
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
        values = chunk_partial(
            dZ, A_prev, W, context.geometry, options, start, context.out.layout.bias, context.queries,
            context.projections,
        )
    with times("write"):
        context.out.write_chunk(index, start, values, level)
    report_chunk_done(context.out.url, index)
    reduced = {entry.name: values[entry.name] for entry in context.out.layout.of_kind(Kind.REDUCE)}
    return Partial(reduced, times.seconds, np.array([level_code(level)], dtype=np.uint8))


def read_stored_node(context: JobContext, depth: int, index: int) -> Partial:
    """The partial of node ``(depth, index)``, which an earlier task finished and stored (its record)."""
    reduced, levels = context.out.read_node(depth, index)
    return Partial(reduced, {}, np.asarray(levels, dtype=np.uint8))


# --------------------------------------------------------------------------- combine

OWN_COMBINE = {entry.name: entry.combine for entry in OUTPUT_LAYOUT if entry.kind is Kind.REDUCE and entry.combine}
"""The REDUCE entries reduced by a ``combine`` of their own (the top samples), not added."""


def combine_partials(partials: Sequence[Partial]) -> Partial:
    """Reduce partials in the order given (a fixed order makes the sum reproducible); levels are concatenated.

    Each value is added, but that of an entry with a ``combine`` of its own
    (:data:`OWN_COMBINE`: the top samples), which is reduced by it. The inputs are left unchanged.
    """
    reduced = {name: np.array(value, copy=True) for name, value in partials[0].reduced.items()}
    seconds = dict(partials[0].seconds)
    for partial in partials[1:]:
        for name, value in partial.reduced.items():
            if name in OWN_COMBINE:
                reduced[name] = OWN_COMBINE[name](reduced[name], value)
            else:
                reduced[name] += value
        for name, value in partial.seconds.items():
            seconds[name] = seconds[name] + value if name in seconds else value
    levels = np.concatenate([np.asarray(partial.levels, dtype=np.uint8) for partial in partials])
    return Partial(reduced, seconds, levels)


def run_combine_task(
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
    total = combine_partials(partials)
    context.out.write_node(depth, index, total.reduced, total.levels)
    if not context.options.keep_partials and computed:
        context.out.drop_nodes([(depth - 1, i) for i in computed])
    return total


def run_combine_stored_task(context: JobContext, depth: int, index: int, children: Sequence[int]) -> Partial:
    """Combine node ``(depth, index)`` from its children's records (a node above the waves, :mod:`dconv.waves`).

    It depends on no task, only on records, so the scheduler keeps nothing of the
    subtrees below it. Run again after it dropped its children's records (its
    worker was lost), it returns its own record.
    """
    try:
        return read_stored_node(context, depth, index)
    except FileNotFoundError:  # the usual case: not combined yet
        pass
    children_partials = [read_stored_node(context, depth - 1, i) for i in children]
    return run_combine_task(context, depth, index, children_partials, children)


# --------------------------------------------------------------------------- aggregate


def aggregate(total: Partial, layout: OutputLayout) -> dict[str, Any]:
    """The finished values: each REDUCE entry in its output dtype and shape, then each FIGURE.

    A REDUCE entry with no output array comes back as a Python number if it is a
    count, else as its reduced partial (the top samples). The figures are
    computed from the reduced partials before the cast (float64 ``dW``, ``db``).
    """
    values: dict[str, Any] = {}
    for entry in layout.of_kind(Kind.REDUCE):
        value = total.reduced[entry.name]
        if entry.stored:
            values[entry.name] = value.astype(entry.dtype).reshape(entry.shape)
        else:
            values[entry.name] = value.item() if np.ndim(value) == 0 else value
    return {**values, **figures(layout, values, total.reduced)}


# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class JobGraph:
    """The job's reduction tree as Dask tasks, built subtree by subtree: the whole of it never exists at once.

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
    dZ, A_prev : ZarrBatches or DaskBatches, optional
        Where the chunk tasks get their blocks (:mod:`dconv.sources`); None: from ``context`` alone.
    wave_chunks : int, optional
        At most this many chunks per wave when :mod:`dconv.waves` runs it; None: its default.
    """

    context: JobContext
    bounds: BatchBounds
    split_every: int
    token: str
    stored: frozenset = frozenset()
    dZ: BatchSource | None = None
    A_prev: BatchSource | None = None
    wave_chunks: int | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    @property
    def root(self) -> Node:
        return tree.tree_height(self.n_chunks, self.split_every), 0

    @property
    def context_key(self) -> str:
        return f"{CONTEXT_PREFIX}-{self.token}"

    @property
    def sources(self) -> tuple[BatchSource | None, BatchSource | None]:
        """Where the chunk tasks get ``dZ`` and ``A_prev`` (None: from the context)."""
        return self.dZ, self.A_prev

    def key(self, node: Node) -> tuple[str, int]:
        """The key of the task that computes node ``node``."""
        depth, index = node
        if depth == 0:
            return f"{CHUNK_PREFIX}-{self.token}", index
        return f"{COMBINE_PREFIX}-{depth - 1}-{self.token}", index

    def children(self, node: Node) -> list[Node]:
        """The nodes node ``node`` adds, in chunk order (:func:`dconv.tree.children`)."""
        return tree.children(node, self.n_chunks, self.split_every)

    def chunks_to_compute(self) -> int:
        """Chunks not covered by a stored node."""
        return self.n_chunks - int(tree.covered(self.stored, self.n_chunks, self.split_every).sum())

    # ----------------------------------------------------------------------- tasks

    def make_read_task(self, node: Node) -> Task:
        """The task that reads stored node ``node`` back."""
        return Task(self.key(node), read_stored_node, TaskRef(self.context_key), *node)

    def make_chunk_task(self, index: int) -> Task:
        """The task that runs chunk ``index``; it depends on its Dask blocks, if its sources have any."""
        start, stop = self.bounds[index]
        keys = [source.block_key(index) if source is not None else None for source in self.sources]
        blocks = [TaskRef(key) if key is not None else None for key in keys]
        if all(key is None for key in keys):
            blocks = []  # every block is read by the task itself
        return Task(self.key((0, index)), run_chunk_task, TaskRef(self.context_key), index, start, stop, *blocks)

    def make_combine_task(self, node: Node, children: Sequence[Node]) -> Task:
        """The task that adds ``children``'s partials (their tasks' keys) into node ``node``."""
        computed = tuple(index for depth, index in children if (depth, index) not in self.stored)
        partials = List(*(TaskRef(self.key(child)) for child in children))
        return Task(self.key(node), run_combine_task, TaskRef(self.context_key), *node, partials, computed)

    def make_context_task(self) -> DataNode:
        """The task that holds the shared :class:`JobContext`."""
        return DataNode(self.context_key, self.context)

    def subtree(self, node: Node) -> dict:
        """The tasks that compute node ``node``: down to stored nodes and chunks, and the Dask
        blocks those chunks read; not the shared :class:`JobContext` (its key is referenced)."""
        tasks: dict = {}
        chunks: list[int] = []
        pending = [node]
        while pending:
            current = pending.pop()
            if current in self.stored:
                tasks[self.key(current)] = self.make_read_task(current)
            elif current[0] == 0:
                tasks[self.key(current)] = self.make_chunk_task(current[1])
                chunks.append(current[1])
            else:
                children = self.children(current)
                tasks[self.key(current)] = self.make_combine_task(current, children)
                pending.extend(children)
        for source in self.sources:
            if source is not None and chunks:
                tasks.update(source.block_tasks(chunks))
        return tasks

    def to_delayed(self) -> Delayed:
        """The whole tree as one Dask computation (for inspection and small jobs)."""
        tasks = self.subtree(self.root)
        tasks[self.context_key] = self.make_context_task()
        return Delayed(self.key(self.root), tasks)

    def run_chunk(self, index: int) -> Partial:
        """Run chunk ``index``'s task in this process, as a worker would: read, compute, write."""
        start, stop = self.bounds[index]
        blocks = [source.block(index) if source is not None else None for source in self.sources]
        return run_chunk_task(self.context, index, start, stop, *blocks)


def backward_graph(
    dz_sources: BatchSource | None,
    a_sources: BatchSource | None,
    W: np.ndarray,
    geometry: ConvGeometry,
    out: OutputStore,
    bounds: BatchBounds,
    options: JobOptions,
    stored: Sequence[Node] | None = None,
    wave_chunks: int | None = None,
    queries: np.ndarray | None = None,
    projections: Any = None,
) -> JobGraph:
    """The whole job as a :class:`JobGraph`, whose root is the reduced :class:`Partial`.

    Parameters
    ----------
    dz_sources, a_sources : ZarrBatches or DaskBatches
        ``dZ`` and ``A_prev`` by batch chunk (:func:`dconv.sources.batch_sources`).
    W : ndarray, shape (fh, fw, C_prev, C)
    out : OutputStore
        The output, with its layout.
    bounds : BatchBounds
        From :func:`dconv.sources.batch_bounds`.
    options : JobOptions
        The job's options: ``split_every`` shapes the tree, and every task
        gets them (see :func:`run_chunk_task`).
    stored : sequence of (depth, index), optional
        The frontier of an earlier run (:func:`dconv.tree.frontier`):
        nodes read back from their records instead of computed.
    wave_chunks : int, optional
        At most this many chunks in one wave (default :data:`dconv.waves.WAVE_CHUNKS`).
    queries, projections : optional
        The per-sample products' query gradients and projections (:class:`JobContext`).
    """
    if not isinstance(bounds, BatchBounds):
        raise InputError(f"bounds must be a BatchBounds (batch_bounds); got {type(bounds).__name__} instead.")
    token = dask.base.tokenize(out.url, geometry, bounds, options, W, queries, projections)
    readers = (source.reader if source is not None else None for source in (dz_sources, a_sources))
    context = JobContext(W, geometry, out, options, *readers, queries, projections)
    stored_nodes = frozenset(tuple(node) for node in (stored or ()))
    return JobGraph(context, bounds, options.split_every, token, stored_nodes, dz_sources, a_sources, wave_chunks)

"""Running a :class:`~dconv.graph.JobGraph`: subtree by subtree (*waves*), on a cluster or here.

:func:`compute_in_waves` submits the tree in waves, one subtree of
:data:`WAVE_CHUNKS` chunks or fewer at a time (:func:`dconv.tree.split_at_depth`
cuts the tree), at most two in flight. A wave's root writes its record like any
combine; each node above the waves is one task, submitted once its children's
records are all stored, that reads them back and adds them in the same order
(:func:`dconv.graph.run_combine_stored_task`). No task depends on a finished
wave, so the scheduler forgets it, and neither the client nor the scheduler
ever holds the whole graph::

    depth 3   combine from the records of (2, 0), (2, 1)            above the waves
    depth 2   wave (2, 0): chunks 0-63 + their combines  |  wave (2, 1): chunks 64-127 ...

On a local scheduler the waves run one after the other. The order of every
addition is the tree's, so the bits are those of one graph of the whole tree.
:func:`compute_with_progress` runs a graph while it shows the progress.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence, TextIO

import dask
import numpy as np
from dask.callbacks import Callback
from dask.task_spec import Task, TaskRef

from dconv.graph import CHUNK_PREFIX, JobGraph, Partial, read_stored_node, run_combine_stored_task, run_combine_task
from dconv.progress import PLAIN_INTERVAL, progress_display, progress_topic
from dconv.store import Kind, OutputLayout
from dconv.tree import Node, split_at_depth, tree_height

__all__ = [
    "Waves",
    "compute_in_waves",
    "compute_with_progress",
    "choose_wave_depth",
    "partial_bytes",
    "WAVE_CHUNKS",
    "WAVE_BYTES",
    "WAVE_TASKS_PER_THREAD",
    "WAVES_IN_FLIGHT",
]

WAVE_PREFIX = "dconv-wave"

WAVE_CHUNKS = 256
"""At most this many chunks in one wave (a subtree of ``split_every**k`` chunks: 64 with the
default fan-in of 8), on a cluster of up to ``WAVE_CHUNKS / WAVE_TASKS_PER_THREAD`` worker threads.

The scheduler holds the tasks of the waves in flight, several KiB each (its
state, the message logs of their transitions): the fewer chunks a wave has, the
less it holds (figures in benchmarks/README.md)."""

WAVE_TASKS_PER_THREAD = 4
"""On a larger cluster a wave has at least this many chunks per worker thread, so none idles."""

WAVE_BYTES = 2**30
"""At most this many bytes of chunk partials in one wave (``split_every**k`` x one partial)."""

WAVES_IN_FLIGHT = 2
"""Waves submitted and not yet finished: the next one is queued while one runs, so workers never idle."""


def partial_bytes(layout: OutputLayout) -> int:
    """Bytes of one chunk's partial: its REDUCE values."""
    return sum(math.prod(e.partial_shape) * np.dtype(e.partial_dtype).itemsize for e in layout.of_kind(Kind.REDUCE))


def choose_wave_depth(
    n_chunks: int, split_every: int, nbytes: int, wave_chunks: int = WAVE_CHUNKS, wave_bytes: int = WAVE_BYTES
) -> int:
    """The depth ``k`` of the wave roots: the largest with ``split_every**k`` chunks at most ``wave_chunks``
    and their partials (``nbytes`` each) at most ``wave_bytes``; at least 1, at most the root's depth (then
    one wave)."""
    height, depth = tree_height(n_chunks, split_every), 1
    while depth < height:
        chunks = split_every ** (depth + 1)
        if chunks > wave_chunks or chunks * nbytes > wave_bytes:
            break
        depth += 1
    return depth


@dataclass(frozen=True)
class Waves:
    """A :class:`~dconv.graph.JobGraph` cut into waves: the subtrees at :attr:`depth`, and the nodes above them.

    Attributes
    ----------
    graph : JobGraph
        Its ``wave_chunks`` (None: :data:`WAVE_CHUNKS`) bounds the chunks of a wave.
    """

    graph: JobGraph

    @property
    def wave_chunks(self) -> int:
        """At most this many chunks in one wave."""
        return WAVE_CHUNKS if self.graph.wave_chunks is None else self.graph.wave_chunks

    @cached_property
    def depth(self) -> int:
        """The depth of the wave roots (:func:`choose_wave_depth`)."""
        graph = self.graph
        layout = graph.context.out.layout
        nbytes = partial_bytes(layout) if layout is not None else 0
        return choose_wave_depth(graph.n_chunks, graph.split_every, nbytes, self.wave_chunks)

    def split(self) -> tuple[list[Node], dict[Node, list[Node]]]:
        """The wave roots to compute, in chunk order, and each node above them to combine, with its children.

        Stored nodes and what they cover are in neither (:func:`dconv.tree.split_at_depth`).
        """
        graph = self.graph
        return split_at_depth(self.depth, graph.n_chunks, graph.split_every, graph.stored)

    def on_threads(self, threads: int) -> Waves:
        """These waves, with at least :data:`WAVE_TASKS_PER_THREAD` chunks per thread of ``threads``."""
        wave_chunks = max(self.wave_chunks, WAVE_TASKS_PER_THREAD * threads)
        return Waves(dataclasses.replace(self.graph, wave_chunks=wave_chunks))


def compute_in_waves(
    graph: JobGraph,
    *,
    client: Any = None,
    scheduler: str | None = None,
    in_flight: int = WAVES_IN_FLIGHT,
    workers: Callable[[], Sequence[str] | None] | None = None,
) -> Partial:
    """Compute ``graph``'s tree wave by wave, on a distributed ``client`` or the local ``scheduler``.

    Returns the root's :class:`~dconv.graph.Partial`.

    Each wave is one subtree, submitted as one graph. On a cluster at most
    ``in_flight`` waves are unfinished at a time (the next one is queued
    while one runs), and a wave has at least :data:`WAVE_TASKS_PER_THREAD`
    chunks per worker thread. On a local scheduler the waves run one after
    the other and the nodes above them are added in this process.

    ``workers``, on a cluster, is called before each submission (the
    waves and the nodes above them): the worker addresses its tasks must run
    on (``allow_other_workers=False``: a loose restriction would let Dask's
    work stealing hand them to any worker), or None for any.
    Asked again for each, it lets a worker that joins mid-job take the
    next waves.
    """
    if graph.root in graph.stored:
        return read_stored_node(graph.context, *graph.root)
    if client is not None:
        waves = Waves(graph).on_threads(sum(client.nthreads().values()))
        return _ClusterWaves(waves, client, in_flight, workers).run()
    return _compute_locally(Waves(graph), dask.base.get_scheduler(scheduler=scheduler or "threads"))


def _compute_locally(waves: Waves, get: Any) -> Partial:
    """The tree on the local Dask scheduler ``get``: each wave as one graph, the nodes above them here."""
    graph = waves.graph

    def compute(node: Node) -> Partial:
        if node in graph.stored:
            return read_stored_node(graph.context, *node)
        if node[0] <= waves.depth:
            return get({**graph.subtree(node), graph.context_key: graph.make_context_task()}, graph.key(node))
        children = graph.children(node)
        computed = [index for depth, index in children if (depth, index) not in graph.stored]
        return run_combine_task(graph.context, *node, [compute(child) for child in children], computed)

    return compute(graph.root)


class _ClusterWaves:
    """:class:`Waves` run on a distributed cluster, wave by wave.

    The job's context is one task whose key every wave refers to; this client
    holds its future, so the scheduler keeps it (and can compute it again if
    its workers are lost). A wave's last task returns only its step times; once
    this client has them, it releases the wave, which the scheduler then forgets.
    """

    def __init__(
        self, waves: Waves, client: Any, in_flight: int, workers: Callable[[], Sequence[str] | None] | None = None
    ) -> None:
        self.waves, self.graph, self.client, self.in_flight = waves, waves.graph, client, max(1, in_flight)
        self.workers = workers or (lambda: None)
        key = self.graph.context_key  # on any worker: every wave needs it, wherever the wave may go
        self.context = self.client.get({key: self.graph.make_context_task()}, key, sync=False, fifo_timeout=0)

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
        indices = [index for _, index in children]
        task = Task(key, run_combine_stored_task, TaskRef(self.graph.context_key), *node, indices)
        return self.submit({key: task}, key)

    def run(self) -> Partial:
        from distributed import as_completed

        graph = self.graph
        waves, combines = self.waves.split()
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
                return Partial(total.reduced, _add_seconds(seconds, total.seconds), total.levels)
            is_wave = node[0] <= self.waves.depth
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


class _LocalChunkProgress(Callback):
    """Ticks the progress as chunk tasks finish on a local Dask scheduler."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith(CHUNK_PREFIX):
            self.bar.update(1)


def compute_with_progress(
    graph: Any,
    url: str,
    total: int,
    *,
    client: Any = None,
    scheduler: str | None = None,
    show: bool = False,
    file: TextIO | None = None,
    interval: float = PLAIN_INTERVAL,
    workers: Any = None,
) -> Any:
    """Compute ``graph`` on ``client`` (or the local ``scheduler``), showing the progress of ``total`` chunks.

    Parameters
    ----------
    graph : dask collection or JobGraph
        A :class:`dconv.graph.JobGraph` is computed in waves
        (:func:`compute_in_waves`); its chunk tasks are counted
        across all of them.
    url : str
        The job's output, whose chunk tasks announce themselves (:func:`dconv.progress.report_chunk_done`).
    show : bool
        Show the progress; False computes the same way, silently.
    file : text stream, optional
        Where the progress goes; default ``sys.stderr``. A terminal gets a tqdm
        bar, anything else a plain line every ``interval`` seconds and one at
        the end (:class:`dconv.progress.PlainProgress`).
    workers : callable, optional
        On a cluster, for a JobGraph: the workers each submission goes to
        (see :func:`compute_in_waves`).
    """
    file = sys.stderr if file is None else file
    collection = dask.is_dask_collection(graph)
    with progress_display(total, file, show, interval) as bar:
        if scheduler is not None:
            with _LocalChunkProgress(bar):
                if collection:
                    return dask.compute(graph, scheduler=scheduler)[0]
                return compute_in_waves(graph, scheduler=scheduler)
        topic = progress_topic(url)
        client.subscribe_topic(topic, lambda event: bar.update(1))
        try:
            if collection:
                return client.compute(graph).result()
            return compute_in_waves(graph, client=client, workers=workers)
        finally:
            client.unsubscribe_topic(topic)

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
import itertools
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
from dconv import tree
from dconv.tree import Node, split_at_depth, tree_height

__all__ = [
    "Waves",
    "compute_in_waves",
    "compute_graphs_in_waves",
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

    Returns the root's :class:`~dconv.graph.Partial`: :func:`compute_graphs_in_waves` of one graph.
    """
    return compute_graphs_in_waves([graph], client=client, scheduler=scheduler, in_flight=in_flight, workers=workers)[0]


def compute_graphs_in_waves(
    graphs: Sequence[JobGraph],
    *,
    client: Any = None,
    scheduler: str | None = None,
    in_flight: int = WAVES_IN_FLIGHT,
    workers: Callable[[], Sequence[str] | None] | Sequence[Callable[[], Sequence[str] | None] | None] | None = None,
    finished: Callable[[int, Partial], None] | None = None,
) -> list[Partial]:
    """Compute the trees of ``graphs`` (the layers of a model job) together, wave by wave; their roots' partials.

    Each wave is one subtree of one graph, submitted as one graph. On a cluster
    the waves of all the graphs are submitted in one order that takes a wave of
    each graph in turn, and waves are submitted while fewer than ``in_flight``
    of the largest waves' chunks are unfinished (the next one is queued while
    one runs): a small layer does not leave a worker idle while another layer has
    chunks. A wave has at least :data:`WAVE_TASKS_PER_THREAD` chunks per worker
    thread. On a local scheduler the graphs run one after the other, and the
    waves of each too, and the nodes above the waves are added in this process.

    ``workers``, on a cluster, is called before each submission (the
    waves and the nodes above them): the worker addresses its tasks must run
    on (``allow_other_workers=False``: a loose restriction would let Dask's
    work stealing hand them to any worker), or None for any. One callable for
    every graph, or one per graph. Asked again for each, it lets a worker that
    joins mid-job take the next waves.

    Each graph's tree is that of its own job, added in the same order, so each
    result is bitwise that of the graph computed alone.

    ``finished(i, partial)``, if given, is called as soon as graph ``i``'s root
    is computed (a model job finishes that layer's output then, before the others).
    """
    graphs = list(graphs)
    finished = finished or (lambda i, partial: None)
    if client is None:
        get = dask.base.get_scheduler(scheduler=scheduler or "threads")
        results = []
        for i, graph in enumerate(graphs):
            results.append(_compute_locally(Waves(graph), get))
            finished(i, results[-1])
        return results
    threads = sum(client.nthreads().values())
    choosers = list(workers) if isinstance(workers, Sequence) else [workers] * len(graphs)
    waves = [Waves(graph).on_threads(threads) for graph in graphs]
    return _ClusterWaves(waves, client, in_flight, choosers, finished).run()


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


class _GraphWaves:
    """One graph's state while :class:`_ClusterWaves` runs it: its waves, the nodes above them, what is missing."""

    def __init__(self, waves: Waves, client: Any, workers: Callable[[], Sequence[str] | None] | None) -> None:
        self.waves, self.graph, self.client = waves, waves.graph, client
        self.workers = workers or (lambda: None)
        graph = self.graph
        self.done = graph.root in graph.stored
        self.roots, self.combines = ([], {}) if self.done else waves.split()
        self.parent = {child: node for node, children in self.combines.items() for child in children}
        self.missing = {
            node: sum(child not in graph.stored for child in children) for node, children in self.combines.items()
        }
        self.seconds: dict = {}
        self.result: Partial | None = read_stored_node(graph.context, *graph.root) if self.done else None
        self.context = None
        if not self.done:  # on any worker: every wave needs it, wherever the wave may go
            key = graph.context_key
            self.context = client.get({key: graph.make_context_task()}, key, sync=False, fifo_timeout=0)

    def wave_chunks(self, node: Node) -> int:
        """Chunks of the wave under ``node`` (its last one may have fewer than the others)."""
        return len(tree.node_chunks(*node, self.graph.split_every, self.graph.n_chunks))

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

    def submit_combine(self, node: Node) -> Any:
        key = self.graph.key(node)
        indices = [index for _, index in self.combines[node]]
        task = Task(key, run_combine_stored_task, TaskRef(self.graph.context_key), *node, indices)
        return self.submit({key: task}, key)

    def ready_combines(self) -> list[Node]:
        """The nodes above the waves whose children were all stored by an earlier run."""
        return [node for node, count in self.missing.items() if count == 0]


class _ClusterWaves:
    """The :class:`Waves` of one or more graphs run on a distributed cluster, wave by wave.

    Each job's context is one task whose key every wave of its graph refers to;
    this client holds its future, so the scheduler keeps it (and can compute it
    again if its workers are lost). A wave's last task returns only its step
    times; once this client has them, it releases the wave, which the scheduler
    then forgets.
    """

    def __init__(
        self,
        waves: Sequence[Waves],
        client: Any,
        in_flight: int,
        workers: Sequence[Callable[[], Sequence[str] | None] | None],
        finished: Callable[[int, Partial], None],
    ) -> None:
        self.graphs = [_GraphWaves(w, client, chooser) for w, chooser in zip(waves, workers)]
        self.finished = finished
        largest = max((g.wave_chunks(node) for g in self.graphs for node in g.roots), default=1)
        self.budget = max(1, in_flight) * largest  # chunks unfinished at most, but always one wave
        if len(self.graphs) > 1:  # small layers' whole trees are small waves: keep a full wave's chunks queued
            self.budget = max(self.budget, waves[0].wave_chunks)

    def order(self) -> list[tuple[int, Node]]:
        """Every wave to compute, as (graph, wave root): a wave of each graph in turn, each graph's in chunk order."""
        queues = [[(g, node) for node in graph.roots] for g, graph in enumerate(self.graphs)]
        return [item for turn in itertools.zip_longest(*queues) for item in turn if item is not None]

    def run(self) -> list[Partial]:
        from distributed import as_completed

        running = as_completed()
        node_of: dict = {}
        upcoming = iter(self.order())
        unfinished = 0  # chunks of the waves submitted and not finished

        def submit(g: int, node: Node, future: Any, chunks: int = 0) -> None:
            node_of[future.key] = (g, node, chunks)
            running.add(future)

        def submit_waves() -> None:
            nonlocal unfinished
            while unfinished == 0 or unfinished < self.budget:
                following = next(upcoming, None)
                if following is None:
                    return
                g, node = following
                chunks = self.graphs[g].wave_chunks(node)
                submit(g, node, self.graphs[g].submit_wave(node), chunks)
                unfinished += chunks

        submit_waves()
        for g, graph in enumerate(self.graphs):
            if graph.done:  # stored whole by an earlier run
                self.finished(g, graph.result)
            for node in graph.ready_combines():
                submit(g, node, graph.submit_combine(node))
        for future in running:
            if future.status != "finished":
                future.result()  # raises the task's error
            g, node, chunks = node_of.pop(future.key)
            graph = self.graphs[g]
            if node == graph.graph.root:
                total = future.result()
                graph.result = Partial(total.reduced, _add_seconds(graph.seconds, total.seconds), total.levels)
                graph.done = True
            elif node[0] <= graph.waves.depth:  # only a wave's step times come back
                graph.seconds = _add_seconds(graph.seconds, future.result())
            future.release()  # before the next wave is submitted: the scheduler forgets this one first
            unfinished -= chunks
            submit_waves()
            if graph.done:  # after the next waves are submitted: the workers go on while this one is written
                self.finished(g, graph.result)
            if node != graph.graph.root:
                parent = graph.parent[node]
                graph.missing[parent] -= 1
                if graph.missing[parent] == 0:
                    submit(g, parent, graph.submit_combine(parent))
            if all(graph.done for graph in self.graphs):
                return [graph.result for graph in self.graphs]
        if all(graph.done for graph in self.graphs):  # every graph was stored whole
            return [graph.result for graph in self.graphs]
        raise RuntimeError("a job's tree has no root")  # unreachable: each root is submitted last


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
    url: str | Sequence[str],
    total: int,
    *,
    client: Any = None,
    scheduler: str | None = None,
    show: bool = False,
    file: TextIO | None = None,
    interval: float = PLAIN_INTERVAL,
    workers: Any = None,
    finished: Callable[[int, Partial], None] | None = None,
) -> Any:
    """Compute ``graph`` on ``client`` (or the local ``scheduler``), showing the progress of ``total`` chunks.

    Parameters
    ----------
    graph : dask collection, JobGraph or list of JobGraph
        A :class:`dconv.graph.JobGraph` is computed in waves
        (:func:`compute_in_waves`), a list of them together (the layers of a
        model job, :func:`compute_graphs_in_waves`: a list of results comes
        back); their chunk tasks are counted across all of them.
    url : str or list of str
        The output of the job (of each job of the list), whose chunk tasks announce
        themselves (:func:`dconv.progress.report_chunk_done`).
    show : bool
        Show the progress; False computes the same way, silently.
    file : text stream, optional
        Where the progress goes; default ``sys.stderr``. A terminal gets a tqdm
        bar, anything else a plain line every ``interval`` seconds and one at
        the end (:class:`dconv.progress.PlainProgress`).
    workers : callable or list of callables, optional
        On a cluster, for JobGraphs: the workers each submission goes to
        (see :func:`compute_graphs_in_waves`).
    finished : callable, optional
        For JobGraphs: called with ``(i, partial)`` as soon as graph ``i`` is computed.
    """
    file = sys.stderr if file is None else file
    collection = dask.is_dask_collection(graph)
    several = isinstance(graph, (list, tuple))
    graphs = list(graph) if several else [graph]
    urls = [url] if isinstance(url, str) else list(url)
    with progress_display(total, file, show, interval) as bar:
        if scheduler is not None:
            with _LocalChunkProgress(bar):
                if collection:
                    return dask.compute(graph, scheduler=scheduler)[0]
                results = compute_graphs_in_waves(graphs, scheduler=scheduler, finished=finished)
                return results if several else results[0]
        topics = [progress_topic(one) for one in urls]
        for topic in topics:
            client.subscribe_topic(topic, lambda event: bar.update(1))
        try:
            if collection:
                return client.compute(graph).result()
            results = compute_graphs_in_waves(graphs, client=client, workers=workers, finished=finished)
            return results if several else results[0]
        finally:
            for topic in topics:
                client.unsubscribe_topic(topic)

"""The memory and sizing model of a job: what one task holds, what a worker needs, how many samples a task takes.

:func:`task_memory` bounds a chunk task's peak: its input blocks plus the larger
of the kernel's working set (:func:`dconv.kernel.backward_working_set`) and what
reading the inputs holds (:func:`dconv.store.read_memory`, the store's figure).
:func:`worker_memory` turns that bound into a worker's memory limit;
:func:`choose_batch_chunk` picks the samples per task from the options, the
input's Zarr chunks and ``max_memory``; :func:`small_task` says when tasks are
so small that their fixed cost dominates. :func:`disk_bytes` gives what a job
reads and writes. Measurements behind the constants are in
``benchmarks/README.md`` ("The sizing model's constants").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from dask.utils import format_bytes

from dconv.errors import InputError
from dconv.kernel import backward_working_set
from dconv.options import JobOptions
from dconv.params import ConvGeometry
from dconv.statistics import top_samples_bytes
from dconv.store import PROGRESS, Kind, OutputLayout, read_memory
from dconv.tree import tree_height, tree_nodes

__all__ = [
    "DEFAULT_BATCH_CHUNK",
    "SMALL_TASK_FLOPS",
    "SMALL_TASK_PIXELS",
    "TASK_SECONDS",
    "WORKER_BASELINE",
    "WORKER_HEADROOM",
    "SmallTask",
    "WorkerMemory",
    "aligned",
    "choose_batch_chunk",
    "disk_bytes",
    "mib_flag",
    "pause_fraction",
    "small_task",
    "straddles",
    "task_memory",
    "task_work",
    "worker_memory",
]

DEFAULT_BATCH_CHUNK = 256
"""Samples per task when neither ``batch_chunk`` nor ``max_memory`` is given (aligned to the input chunks)."""


def task_memory(
    batch: int,
    shapes: Mapping[str, Sequence[int]],
    geometry: ConvGeometry,
    dtype: Any,
    input_chunks: Mapping[str, int] | None = None,
    dtypes: Mapping[str, Any] | None = None,
    stats: bool = False,
    input_reads: Mapping[str, str | None] | None = None,
) -> int:
    """Bytes one chunk task of ``batch`` samples holds at its peak (an upper bound).

    Its ``A_prev`` and ``dZ`` blocks, ``itemsize * b * (H*W*C_prev + n_H*n_W*C)``,
    plus the larger of two phases that follow each other:

    - computing: the kernel's working set, :func:`dconv.kernel.backward_working_set`;
    - reading: what the read of one input array holds besides the blocks,
      :func:`dconv.store.read_memory` (Zarr inputs only: the input chunks a read that cuts
      them holds whole, and the array as stored while it is cast to ``dtype``).

    Parameters
    ----------
    batch : int
        Samples per task.
    shapes : mapping
        ``A_prev`` (m, H, W, C_prev) and ``dZ`` (m, n_H, n_W, C).
    geometry : ConvGeometry
    dtype : dtype
        The compute dtype.
    input_chunks : mapping, optional
        The Zarr chunk along m of each input array read from Zarr (``A_prev``,
        ``dZ``); arrays not named are in memory.
    dtypes : mapping, optional
        The stored dtype of each input array; default ``dtype``.
    stats : bool
        The task computes the per-sample statistics too: the kernel's bound
        counts them, and the chunk's top list sorts its norms (:func:`dconv.statistics.top_samples_bytes`).
    input_reads : mapping, optional
        How each array of ``input_chunks`` is read (:func:`dconv.store.read_path`);
        an array not named is taken to be read by the fast reader from local files.
    """
    m, height, width, c_prev = shapes["A_prev"]
    _, n_h, n_w, c_out = shapes["dZ"]
    itemsize = np.dtype(dtype).itemsize
    blocks = itemsize * batch * (height * width * c_prev + n_h * n_w * c_out)
    working = backward_working_set(batch, geometry, c_prev, c_out, itemsize, stats=stats)
    if stats:
        working += top_samples_bytes(batch)
    reading = 0
    for name, chunk in (input_chunks or {}).items():
        stored = np.dtype((dtypes or {}).get(name, dtype)).itemsize
        sample_bytes = stored * math.prod(shapes[name][1:])
        cast = batch * sample_bytes if stored != itemsize else 0  # the block as stored, until astype is done
        path = (input_reads or {}).get(name, "/mapped")
        fast = None if path is not None else False  # None: unless DCONV_FAST_READ=0
        held = read_memory(batch, m, chunk, sample_bytes, fast, fetched=path is not None and path.endswith("/fetched"))
        reading = max(reading, held + cast)
    return blocks + max(working, reading)


WORKER_BASELINE = 96 * 2**20
"""Bytes a dconv worker process holds before its first task: its Python, Dask, NumPy, Zarr and dconv
(measured: ``benchmarks/README.md``)."""

WORKER_HEADROOM = (64 * 2**20, 0.25)
"""``(fixed bytes, fraction of the task bound)`` a worker keeps beyond its baseline and one task.

For what the bound leaves out: Dask's state and messages, the results a worker
holds until the tree reduction takes them, and heap the allocator keeps after a
task (measured: ``benchmarks/README.md``).
"""


@dataclass(frozen=True)
class WorkerMemory:
    """The memory limit a worker running one task at a time needs (:func:`worker_memory`).

    Attributes
    ----------
    task, baseline, headroom : int
        Bytes: the task bound, the process baseline and the headroom.
    pause : float
        Dask's pause fraction (``distributed.worker.memory.pause``): a worker
        stops starting tasks when its process memory passes ``pause * limit``.
    """

    task: int
    baseline: int
    headroom: int
    pause: float

    @property
    def limit(self) -> int:
        """Bytes: ``ceil((task + baseline + headroom) / pause)``, the limit of a worker of one thread."""
        return self.limit_for(1)

    def limit_for(self, threads: int) -> int:
        """Bytes: the memory limit of a worker of ``threads`` threads, which runs that many tasks at once.

        ``ceil((baseline + threads x (task + headroom)) / pause)``: one process
        baseline, and a task and its headroom per thread. ``limit_for(1)`` is
        :attr:`limit`.
        """
        return math.ceil((self.baseline + max(1, threads) * (self.task + self.headroom)) / self.pause)

    @property
    def flag(self) -> str:
        """The limit as ``dask worker --memory-limit`` takes it, whole MiB rounded up: ``413MiB``."""
        return mib_flag(self.limit)

    def formula(self) -> str:
        """``task bound 136.6 MiB + baseline 96.00 MiB + headroom 98.15 MiB, / 0.8 pause``."""
        return (
            f"task bound {format_bytes(self.task)} + baseline {format_bytes(self.baseline)} + headroom "
            f"{format_bytes(self.headroom)}, / {self.pause:g} pause"
        )

    def describe(self) -> str:
        """``412.3 MiB (task bound 136.6 MiB + baseline 96.00 MiB + headroom 98.15 MiB, / 0.8 pause)``."""
        return f"{format_bytes(self.limit)} ({self.formula()})"


def mib_flag(nbytes: int) -> str:
    """``nbytes`` as ``dask worker --memory-limit`` takes it, whole MiB rounded up: ``413MiB``."""
    return f"{-(-nbytes // 2**20)}MiB"


def worker_memory(task_bytes: int, pause: float | None = None) -> WorkerMemory:
    """The memory limit of a worker that runs tasks of ``task_bytes`` one at a time.

    ``limit = (task + baseline + headroom) / pause``, with ``baseline``
    :data:`WORKER_BASELINE`, ``headroom = 64 MiB + task / 4``
    (:data:`WORKER_HEADROOM`) and ``pause`` Dask's pause fraction, so that a
    worker's peak stays below the point where it pauses (0.8 of the limit by
    default; it is restarted at ``distributed.worker.memory.terminate``, 0.95).

    Parameters
    ----------
    task_bytes : int
        The task bound (:meth:`dconv.plan.JobPlan.task_memory`).
    pause : float, optional
        Default: ``distributed.worker.memory.pause`` from dask.config; where that
        is off, ``terminate``; where both are off, 1.
    """
    fixed, fraction = WORKER_HEADROOM
    pause = pause_fraction() if pause is None else pause
    return WorkerMemory(task_bytes, WORKER_BASELINE, fixed + math.ceil(fraction * task_bytes), pause)


def pause_fraction() -> float:
    """Dask's ``distributed.worker.memory.pause``; where it is off, ``terminate``; where both are off, 1."""
    import dask.config
    import distributed.config  # noqa: F401  (distributed's defaults join dask.config when it is imported)

    for key in ("pause", "terminate"):
        fraction = dask.config.get(f"distributed.worker.memory.{key}", None)
        if fraction:
            return float(fraction)
    return 1.0


SMALL_TASK_FLOPS = 2e9
"""A task with fewer FLOPs than this and fewer pixels than :data:`SMALL_TASK_PIXELS` is too small.

Every task has a fixed cost (:data:`TASK_SECONDS`), most of it the output's
per-chunk writes, however small its block. A task's own work outweighs that
cost twice over (time per sample within 1.5x of what it tends to) from about
this many FLOPs, or :data:`SMALL_TASK_PIXELS` pixels where channels are few
and the vector lanes go unfilled. The measurements that set both are in
``benchmarks/README.md``.
"""

TASK_SECONDS = 0.07
"""The fixed cost of a task, in seconds of wall time (see :data:`SMALL_TASK_FLOPS`)."""

SMALL_TASK_PIXELS = 2**17
"""See :data:`SMALL_TASK_FLOPS`: pixels of ``A_prev`` per task, ``b * H * W``."""


def task_work(batch: int, shapes: Mapping[str, Sequence[int]], geometry: ConvGeometry) -> tuple[int, int]:
    """``(FLOPs, pixels)`` of one task of ``batch`` samples.

    FLOPs: the multiply-adds of ``dW`` and ``dA_prev``, ``4 * b * n_H * n_W *
    fh * fw * C_prev * C``. Pixels: those of its ``A_prev`` block, ``b * H * W``.
    """
    _, height, width, c_prev = shapes["A_prev"]
    _, n_h, n_w, c_out = shapes["dZ"]
    fh, fw = geometry.kernel_hw
    return 4 * batch * n_h * n_w * fh * fw * c_prev * c_out, batch * height * width


@dataclass(frozen=True)
class SmallTask:
    """Tasks too small for their fixed cost (:func:`small_task`).

    Attributes
    ----------
    flops, pixels : int
        The work of one task (:func:`task_work`).
    enough : int
        The fewest samples per task that are not too small.
    """

    flops: int
    pixels: int
    enough: int


def small_task(batch: int, shapes: Mapping[str, Sequence[int]], geometry: ConvGeometry) -> SmallTask | None:
    """What makes tasks of ``batch`` samples too small, or None if they are not.

    Too small: fewer than :data:`SMALL_TASK_FLOPS` FLOPs and fewer than
    :data:`SMALL_TASK_PIXELS` pixels (:func:`task_work`); the fixed cost of a
    task then makes up more than a third of its time.
    """
    flops, pixels = task_work(batch, shapes, geometry)
    if flops >= SMALL_TASK_FLOPS or pixels >= SMALL_TASK_PIXELS:
        return None
    one_flops, one_pixels = task_work(1, shapes, geometry)
    enough = math.ceil(SMALL_TASK_PIXELS / one_pixels)
    if one_flops:
        enough = min(enough, math.ceil(SMALL_TASK_FLOPS / one_flops))
    return SmallTask(flops, pixels, enough)


def aligned(batch_chunk: int, input_chunk: int | None) -> int:
    """``batch_chunk`` rounded down to a multiple of the input's Zarr chunk along m, when one fits.

    A task whose slice covers whole input chunks decodes each of them once; a
    misaligned one decodes the chunks it straddles twice or more.
    """
    if input_chunk is None or batch_chunk < input_chunk:
        return batch_chunk
    return batch_chunk - batch_chunk % input_chunk


def straddles(batch_chunk: int, m: int, input_chunk: int | None) -> bool:
    """Whether tasks of ``batch_chunk`` samples cut input chunks of ``input_chunk`` samples (and decode them again)."""
    return input_chunk is not None and batch_chunk < m and batch_chunk % input_chunk != 0


def _candidates(most: int, m: int, chunk: int | None) -> Iterator[int]:
    """Batch chunks of at most ``most`` samples worth trying, best first.

    All of ``m`` in one task; else multiples of ``chunk`` (whole input chunks),
    largest first; else divisors of ``chunk`` (each task within one input
    chunk). Without a Zarr chunk, ``most`` itself.
    """
    if most >= m:
        yield m
    elif chunk is None:
        yield most
    else:
        yield from range(most - most % chunk, 0, -chunk)
        yield from (d for d in range(min(most, chunk - 1), 0, -1) if chunk % d == 0)


def choose_batch_chunk(
    options: JobOptions,
    shapes: Mapping[str, Sequence[int]],
    geometry: ConvGeometry,
    dtype: Any,
    input_chunks: Mapping[str, int] | None = None,
    dtypes: Mapping[str, Any] | None = None,
    input_reads: Mapping[str, str | None] | None = None,
) -> int:
    """The samples per task: ``options.batch_chunk`` if given, else the default or what ``max_memory`` allows.

    The default is 256, aligned to the input's Zarr chunk along m (see
    :func:`aligned`). With ``max_memory``, the largest chunk whose task fits
    (:func:`task_memory`, input chunks counted): all of m, else a multiple of
    the input chunk, else a divisor of it. A given ``batch_chunk`` is used as it
    is, once checked against ``max_memory``.

    Parameters
    ----------
    input_chunks, dtypes, input_reads : mapping, optional
        As for :func:`task_memory`.

    Raises
    ------
    InputError
        ``batch_chunk`` needs more than ``max_memory`` per task, or not even one sample fits.
    """
    batch_chunk, budget = options.batch_chunk, options.max_memory
    chunk = max(input_chunks.values()) if input_chunks else None
    if budget is None:
        return aligned(DEFAULT_BATCH_CHUNK, chunk) if batch_chunk is None else batch_chunk

    def need(batch: int) -> int:
        return task_memory(
            batch, shapes, geometry, dtype, input_chunks, dtypes, stats=options.stats, input_reads=input_reads
        )

    if batch_chunk is not None and need(batch_chunk) <= budget:
        return batch_chunk
    m = shapes["A_prev"][0]
    low, high = 0, m  # the largest b in [1, m] whose task fits without counting input chunks, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        fits = task_memory(middle, shapes, geometry, dtype, stats=options.stats) <= budget
        low, high = (middle, high) if fits else (low, middle - 1)
    fits = next((b for b in _candidates(low, m, chunk) if need(b) <= budget), None) if low else None
    held = (
        f" (a task that cuts the input's Zarr chunks of {chunk} samples holds them whole while it reads)"
        if chunk is not None and need(1) > task_memory(1, shapes, geometry, dtype, stats=options.stats)
        else ""
    )
    if batch_chunk is not None:
        asked = (
            f"batch_chunk {batch_chunk} needs about {format_bytes(need(batch_chunk))} per task, "
            f"more than max_memory {format_bytes(budget)}"
        )
        if fits is None:
            raise InputError(f"{asked}; not even 1 sample fits: it needs about {format_bytes(need(1))}{held}.")
        advice = f"batch_chunk <= {fits}" if chunk is None else f"batch_chunk {fits} (it fits)"
        raise InputError(f"{asked}; use {advice}, or leave it out to have it chosen.")
    if fits is None:
        raise InputError(
            f"one sample needs about {format_bytes(need(1))} per task{held}, "
            f"more than max_memory {format_bytes(budget)}."
        )
    return fits




def disk_bytes(
    shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, Any], layout: OutputLayout, keep_partials: bool
) -> dict[str, int]:
    """Bytes a job reads and writes, uncompressed.

    Parameters
    ----------
    shapes, dtypes : mapping
        Of the input arrays ``A_prev``, ``dZ``, ``W``.
    layout : OutputLayout
        The job's output.
    keep_partials : bool
        Every node's record stays in ``_progress`` (else a combine's replaces its children's).

    Returns
    -------
    dict
        ``input`` (``A_prev``, ``dZ`` and ``W``; Zarr inputs are stored
        compressed, random data shrinks little), then the output: ``dA_prev``
        (stored uncompressed: its size on disk) and every other output array
        by name, and ``_progress``: the records of the reduction tree's nodes
        at their most while the job runs (about split_every x tree depth of
        them; every node's with ``keep_partials``), and one byte per chunk
        for the SIMD levels a complete output keeps.
    """
    def nbytes(shape: Sequence[int], dtype: Any) -> int:
        return math.prod(shape) * np.dtype(dtype).itemsize

    found = {"input": sum(nbytes(shape, dtypes[name]) for name, shape in shapes.items())}
    found.update({entry.name: nbytes(entry.shape, entry.dtype) for entry in layout.arrays})
    record = sum(nbytes(entry.partial_shape, entry.partial_dtype) for entry in layout.of_kind(Kind.REDUCE))
    nodes = tree_nodes(layout.n_chunks, layout.split_every)
    if not keep_partials:  # a combine's record replaces its children's
        nodes = min(nodes, layout.split_every * tree_height(layout.n_chunks, layout.split_every))
    found[PROGRESS] = nodes * record + layout.n_chunks
    return found

"""Planning a job: validate everything on metadata, choose the batch chunk, write nothing.

:func:`plan_job` opens the inputs (metadata and ``W`` only), resolves the
convolution, checks every shape, dtype and option, picks the samples per task
(from :class:`~dconv.options.JobOptions`, or the memory model), lays out the
output and checks that it may be written. Anything wrong raises
:class:`~dconv.errors.InputError` here, before a byte of output exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr
from dask.utils import format_bytes

from dconv.errors import InputError
from dconv.graph import JobGraph, Partial, backward_graph
from dconv.kernel import backward_working_set
from dconv.kernel.stats import top_samples_bytes
from dconv.options import InputRecipe, JobOptions
from dconv.params import ConvGeometry, ConvParams, backward_geometry, output_shape, result_dtype
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word
from dconv.sources import DaskBatches, ZarrBatches, batch_bounds, batch_sources
from dconv.store import InputGroup, OutputStore, absolute_location, fingerprint, place_layout
from dconv.store.fastread import FAST_READ_ENV, read_path
from dconv.store.inputs import compressor, job_inputs, read_whole
from dconv.store.layout import DIMENSIONS, PROGRESS, Kind
from dconv.store.lease import check_unheld
from dconv.store.locations import public_location
from dconv.tree import tree_height, tree_nodes
from dconv.waves import WAVE_CHUNKS

__all__ = [
    "JobPlan",
    "plan_job",
    "plan_recipe",
    "task_memory",
    "read_memory",
    "worker_memory",
    "WorkerMemory",
    "choose_batch_chunk",
    "DEFAULT_BATCH_CHUNK",
    "SMALL_TASK_FLOPS",
    "SMALL_TASK_PIXELS",
    "TASK_SECONDS",
]

DEFAULT_BATCH_CHUNK = 256


@dataclass(frozen=True)
class JobPlan:
    """A validated job: everything :func:`dconv.job.run_job` needs, nothing written yet.

    Attributes
    ----------
    options : JobOptions
        As given, with ``simd`` set to the job's ``DCONV_SIMD`` word (checked, not
        resolved: each worker resolves it); the fields below are what the rest resolved to.
    params : ConvParams
        Stride, padding and dilation: the options, else the input's ``hparameters``.
    geometry : ConvGeometry
    shapes, dtypes : dict
        Of the input arrays ``A_prev``, ``dZ``, ``W``.
    compute_dtype : numpy.dtype
    batch_chunk : int
        Samples per task.
    bounds : list of (start, stop)
        The batch chunks.
    dz_sources, a_sources : ZarrBatches or DaskBatches
        ``dZ`` and ``A_prev`` by batch chunk: a Zarr array each task reads its
        samples of, or a Dask array chunked along ``bounds``.
    W : ndarray, shape (fh, fw, C_prev, C)
        In the compute dtype.
    out : OutputStore
        The output, with its layout.
    input_location : str
        Where the input came from, without credentials.
    input_chunk : int or None
        The inputs' Zarr chunk along m, the larger of ``A_prev``'s and ``dZ``'s
        (None for in-memory arrays).
    input_chunks : dict
        The Zarr chunk along m of each of ``A_prev`` and ``dZ`` read from Zarr.
    input_reads : dict
        How each of those is read (:func:`dconv.store.fastread.read_path`):
        ``"<codecs>/mapped"``, ``"<codecs>/memory"``, ``"<codecs>/fetched"``, or
        None for zarr's public read.
    input_recipe : InputRecipe or None
        Set by :func:`plan_recipe`: the input does not exist yet and this recipe
        would make it; such a plan describes the job but cannot run it.
    """

    options: JobOptions
    params: ConvParams
    geometry: ConvGeometry
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    compute_dtype: np.dtype
    batch_chunk: int
    bounds: Sequence[tuple[int, int]]
    dz_sources: ZarrBatches | DaskBatches
    a_sources: ZarrBatches | DaskBatches
    W: np.ndarray
    out: OutputStore
    input_location: str
    input_chunk: int | None
    input_chunks: dict[str, int] = field(default_factory=dict)
    input_reads: dict[str, str | None] = field(default_factory=dict)
    input_recipe: InputRecipe | None = None

    @property
    def m(self) -> int:
        return self.shapes["A_prev"][0]

    @property
    def simd(self) -> str:
        """The job's ``DCONV_SIMD`` word."""
        return self.options.simd

    def identity(self) -> dict[str, Any]:
        """What must match for ``resume`` to continue this job's output (JSON-friendly).

        The input, its shapes and dtypes, and every option recorded as part of
        the identity (:meth:`JobOptions.identity`), as resolved.
        """
        resolved = dataclasses.replace(
            self.options,
            stride=self.params.stride,
            padding=self.params.padding,
            dilation=self.params.dilation,
            batch_chunk=self.batch_chunk,
        )
        return {
            "input": self.input_location,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "dtypes": {**self.dtypes, "compute": str(self.compute_dtype)},
            **resolved.identity(),
        }

    @property
    def fingerprint(self) -> str:
        """A short hash of :meth:`identity`, stored in the output's provenance."""
        return fingerprint(self.identity())

    def resume_differences(self, stored: Mapping[str, Any]) -> list[str]:
        """How this job differs from the one that wrote the provenance ``stored``: ``"key: here, in out"`` each."""
        recorded = {key: stored.get(key) for key in ("input", "shapes", "dtypes")}
        there = {**recorded, **JobOptions.from_dict(stored).identity()}
        here = self.identity()
        return [
            f"{key}: {here.get(key)!r} here, {there.get(key)!r} in out"
            for key in dict.fromkeys([*here, *there])
            if here.get(key) != there.get(key)
        ]

    def check_resumable(self, stored: Mapping[str, Any]) -> None:
        """Refuse to resume the output whose provenance is ``stored`` if another job made it.

        Raises
        ------
        InputError
            Naming what differs; the options were taken from the output
            (:meth:`JobOptions.resuming`), so what differs is the input.
        """
        differences = self.resume_differences(stored)
        if differences:
            raise InputError(
                f"cannot resume {self.out.location!r}: it was made by another job ({'; '.join(differences)}); "
                "give the input it was made from, or write to another out."
            )

    def provenance(self) -> dict[str, Any]:
        """The ``dconv`` attribute of a new output, less identity, status and times."""
        return {
            "pads": [list(p) for p in self.geometry.pads],
            "n_chunks": len(self.bounds),
            "versions": _versions(),
            "simd": {"requested": self.simd},
        }

    def task_memory(self) -> int:
        """Bytes one chunk task holds at its peak (an upper bound; see :func:`task_memory`).

        Input chunks that a task cuts count whole (:func:`read_memory`).
        """
        size = min(self.batch_chunk, self.m)
        return task_memory(
            size, self.shapes, self.geometry, self.compute_dtype, self.input_chunks, self.dtypes,
            stats=self.options.stats, input_reads=self.input_reads,
        )

    def worker_memory(self) -> WorkerMemory:
        """The memory limit a worker of one thread needs for this job's tasks (:func:`worker_memory`)."""
        return worker_memory(self.task_memory())

    def disk_bytes(self) -> dict[str, int]:
        """Bytes the job reads and writes, uncompressed.

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
        layout = self.out.layout
        def nbytes(shape: Sequence[int], dtype: Any) -> int:
            return math.prod(shape) * np.dtype(dtype).itemsize

        found = {"input": sum(nbytes(shape, self.dtypes[name]) for name, shape in self.shapes.items())}
        found.update({entry.name: nbytes(entry.shape, entry.dtype) for entry in layout.arrays})
        record = sum(nbytes(entry.partial_shape, entry.partial_dtype) for entry in layout.of_kind(Kind.REDUCE))
        nodes = tree_nodes(layout.n_chunks, layout.split_every)
        if not self.options.keep_partials:  # a combine's record replaces its children's
            nodes = min(nodes, layout.split_every * tree_height(layout.n_chunks, layout.split_every))
        found[PROGRESS] = nodes * record + layout.n_chunks
        return found

    def describe(self) -> str:
        """A few lines for ``--dry-run``: what would run, its per-task memory, and what it reads and writes."""
        n_tasks = len(self.bounds)
        disk = self.disk_bytes()
        blocks = [entry.name for entry in self.out.layout.of_kind(Kind.BLOCK)]
        sums = [name for name in disk if name not in ("input", PROGRESS, *blocks)]
        if self.input_recipe is None:
            source = f"input   {self.input_location}"
        else:
            source = (
                f"input   {self.input_location} does not exist yet; the run would first make it: "
                f"{self.input_recipe.describe()}"
            )
        lines = [
            source,
            f"output  {self.out.location}" + (" (resume)" if self.options.resume else ""),
            "shapes  " + ", ".join(f"{k} {v}" for k, v in self.shapes.items()) + f" ({self.compute_dtype})",
            f"conv    {self.params.describe()}, pads {self.geometry.pads}",
            "writes  " + ", ".join(entry.name for entry in self.out.layout.arrays)
            + ("; the gradient noise scale and top samples in the provenance" if self.options.stats else ""),
            f"chunks  {n_tasks} of up to {_count(self.batch_chunk, 'sample')} (m = {self.m}), "
            f"tree fan-in {self.options.split_every}",
            f"memory  at most about {format_bytes(self.task_memory())} per running task"
            + (f" (max_memory {format_bytes(self.options.max_memory)})" if self.options.max_memory else ""),
            f"disk    input {format_bytes(disk['input'])} (uncompressed); output "
            f"{format_bytes(sum(disk.values()) - disk['input'])}: "
            + ", ".join(f"{name} {format_bytes(disk[name])} (uncompressed)" for name in blocks)
            + f", {', '.join(sums)} {format_bytes(sum(disk[name] for name in sums))}"
            + f", {PROGRESS} {format_bytes(disk[PROGRESS])}",
            f"simd    {SIMD_ENV_VAR}={self.simd}, resolved on each worker",
        ]
        return "\n".join(lines)

    def announce(self, n_workers: int, threads_per_worker: int = 1) -> str:
        """The plan in one line, printed before a job starts.

        ``dconv: 16 tasks of 256 samples (m = 4096), at most 136.6 MiB each; 2 workers x 1 thread``

        Parameters
        ----------
        n_workers, threads_per_worker : int
            Where the tasks run: tasks run ``n_workers * threads_per_worker`` at a time.
        """
        n_tasks, size = len(self.bounds), min(self.batch_chunk, self.m)
        samples = _count(size, "sample") if n_tasks == 1 or self.m % size == 0 else f"up to {_count(size, 'sample')}"
        budget = f" (max_memory {format_bytes(self.options.max_memory)})" if self.options.max_memory else ""
        return (
            f"dconv: {_count(n_tasks, 'task')} of {samples} (m = {self.m}), at most "
            f"{format_bytes(self.task_memory())} each{budget}; "
            f"{_count(n_workers, 'worker')} x {_count(threads_per_worker, 'thread')}"
        )

    def warnings(self, n_workers: int, threads_per_worker: int = 1, cores: int | None = None) -> list[str]:
        """What in this plan wastes time or memory: one line each, each starting ``dconv: warning: ``.

        - tasks cut the input's Zarr chunks along m (:meth:`straddle_warning`);
        - tasks so small that their fixed cost dominates (:func:`small_task`),
          when it adds up to 2 s or more over the job;
        - fewer tasks than ``n_workers * threads_per_worker``: some sit idle (not
          said of a job whose whole batch is one small task);
        - more ``n_workers * threads_per_worker`` than ``cores`` (None: not
          known, e.g. a remote cluster): tasks compete for cores.

        ``n_workers`` may be 0 (an existing cluster whose workers are still to
        come): the warnings are then those of one worker.
        """
        found = []
        straddle = self.straddle_warning()
        if straddle:
            found.append(straddle)
        size = min(self.batch_chunk, self.m)
        slots, n_tasks = max(1, n_workers * threads_per_worker), len(self.bounds)
        small = small_task(size, self.shapes, self.geometry)
        overhead = n_tasks * TASK_SECONDS / slots
        if small is not None and overhead >= 2:  # a tiny job's few tasks cost too little to mention
            flops, pixels, enough = small
            found.append(
                f"dconv: warning: tasks of {_count(size, 'sample')} are small ({flops / 1e6:.3g} MFLOP, "
                f"{_count(pixels, 'pixel')} each): their fixed cost, about {TASK_SECONDS * 1e3:.0f} ms a task "
                f"({overhead:.0f} s in all), dominates below {SMALL_TASK_FLOPS / 1e9:g} GFLOP or "
                f"{SMALL_TASK_PIXELS} pixels a task; use batch_chunk >= {min(enough, -(-self.m // slots))}"
            )
        whole_job_small = small_task(self.m, self.shapes, self.geometry) is not None
        if n_tasks < slots and not whole_job_small:  # a job that is one small task in all: nothing to share
            idle = slots - n_tasks
            advice = f"use batch_chunk <= {-(-self.m // slots)}" if self.m >= slots else "use fewer workers"
            found.append(
                f"dconv: warning: {_count(n_tasks, 'task')} for {_count(n_workers, 'worker')} x "
                f"{_count(threads_per_worker, 'thread')}: {idle} of {slots} will sit idle; {advice}"
            )
        if cores is not None and slots > cores:
            found.append(
                f"dconv: warning: {_count(n_workers, 'worker')} x {_count(threads_per_worker, 'thread')} run {slots} "
                f"tasks at once on {_count(cores, 'core')}: they compete for the cores (workers x threads x BLAS "
                f"threads should be the cores); use {_count(cores, 'worker')} x 1 thread"
            )
        return found

    def straddle_warning(self) -> str | None:
        """The warning that tasks cut the input's Zarr chunks along m, or None if they read whole chunks."""
        cut = [chunk for chunk in self.input_chunks.values() if straddles(self.batch_chunk, self.m, chunk)]
        if not cut:
            return None
        chunk, size = max(cut), min(self.batch_chunk, self.m)
        starts = np.asarray([start for start, _ in self.bounds], dtype=np.int64)
        stops = np.asarray([stop for _, stop in self.bounds], dtype=np.int64)
        decodes = int(((stops - 1) // chunk - starts // chunk + 1).sum()) / -(-self.m // chunk)
        extra = self.task_memory() - task_memory(
            size, self.shapes, self.geometry, self.compute_dtype, stats=self.options.stats
        )
        held = f" (+{format_bytes(extra)} per task, in its bound)" if extra > 0 else ""
        if self.options.batch_chunk is not None:
            tasks, advice = f"batch_chunk {self.batch_chunk} is", f"use a multiple of {chunk}"
        else:  # chosen: the most max_memory allows is less than one input chunk
            tasks = f"tasks of {_count(self.batch_chunk, 'sample')} (the most max_memory allows) are"
            advice = f"a larger max_memory allows tasks of {chunk}"
        return (
            f"dconv: warning: {tasks} not a multiple of the input's Zarr chunk {chunk} "
            f"along m: tasks decode each input chunk {f'{decodes:.1f}'.removesuffix('.0')} times and hold the "
            f"chunks they cut whole{held}; {advice}"
            + ("" if small_task(size, self.shapes, self.geometry) else f", or input chunks of {size} (or a divisor)")
        )

    def open_output(self, cluster: Mapping[str, Any] | None = None) -> np.ndarray:
        """Create the output, or reopen it to resume (:meth:`OutputStore.open`); the mask of finished chunks.

        Parameters
        ----------
        cluster : mapping, optional
            Where the job runs (:meth:`ClusterOptions.to_dict`), recorded for the resume command.

        Raises
        ------
        InputError
            The plan comes from :func:`plan_recipe`: its input does not exist
            yet; or the output to resume was made by another job.
        """
        if self.input_recipe is not None:
            raise InputError(
                f"the input {self.input_location} does not exist yet (the plan comes from its recipe); "
                "make it first (dconv.make_inputs), then plan the job with plan_job."
            )
        stored = self.out.provenance() if self.options.resume else None
        if stored is not None:
            self.check_resumable(stored)
        carried = {**self.options.to_dict("carried"), "cluster": dict(cluster or {})}
        return self.out.open(
            self.identity(),
            {**self.provenance(), **carried},
            resume=stored is not None,
            resumed={**carried, "simd": {"requested": self.simd}},
        )

    def graph(self, stored: Sequence[tuple[int, int]] | None = None, wave_chunks: int | None = None) -> JobGraph:
        """The job's reduction tree (:func:`dconv.graph.backward_graph`), reading the ``stored`` nodes back.

        Parameters
        ----------
        stored : sequence of (depth, index), optional
            The frontier an earlier run left (:meth:`OutputStore.frontier`).
        wave_chunks : int, optional
            At most this many chunks per wave; default :data:`dconv.waves.WAVE_CHUNKS`.
        """
        wave_chunks = WAVE_CHUNKS if wave_chunks is None else wave_chunks
        return backward_graph(
            self.dz_sources,
            self.a_sources,
            self.W,
            self.geometry,
            self.out,
            self.bounds,
            self.options,
            stored=stored,
            wave_chunks=wave_chunks,
        )

    def run_chunk(self, index: int) -> Partial:
        """Run chunk ``index``'s task here, as a worker would: read, compute, write (the output must be open)."""
        return self.graph().run_chunk(index)


def _count(n: int, noun: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _versions() -> dict[str, str]:
    import dask
    import zarr

    import dconv

    return {"dconv": dconv.__version__, "numpy": np.__version__, "dask": dask.__version__, "zarr": zarr.__version__}


# --------------------------------------------------------------------------- memory and the batch chunk


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
      :func:`read_memory` (Zarr inputs only: the input chunks a read that cuts
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
        counts them, and the chunk's top list sorts its norms (:func:`top_samples_bytes`).
    input_reads : mapping, optional
        How each array of ``input_chunks`` is read (:func:`dconv.store.fastread.read_path`);
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


def read_memory(
    batch: int, m: int, chunk: int, sample_bytes: int, fast_reader: bool | None = None, *, fetched: bool = False
) -> int:
    """Bytes a task of ``batch`` samples holds, besides its block, while it reads one Zarr input array.

    Tasks read samples ``[i*batch, (i+1)*batch)``; ``chunk`` is the array's
    chunk along m (a sharded array's inner chunk).

    zarr's public read (``DCONV_FAST_READ=0``, or a layout dconv's fast reader
    does not decode) holds, for every chunk the read touches (up to zarr's
    ``async.concurrency`` at once, 10 by default), the chunk's encoded bytes
    and the decoded chunk before it copies the rows it needs: up to
    ``2 * chunk * sample_bytes`` per chunk (Blosc never grows data by more than
    16 bytes, zstd by 0.4 %, and random floats shrink only 6 %). The worst task
    touches ``ceil((chunk - g + batch) / chunk)`` chunks, ``g = gcd(batch, chunk)``:
    one when ``batch`` divides ``chunk``, else up to ``ceil(batch / chunk) + 1``.

    The fast reader decodes each chunk the read covers whole straight into the
    block, and a chunk it cuts (the task's bounds, or the array's end inside the
    last chunk, ``m % chunk``) into one scratch chunk, reused:
    ``chunk * sample_bytes``. It holds no encoded bytes of local files (mapped:
    the page cache, which the RSS counts while a mapping is read, not the heap)
    or of zarr's MemoryStore (the store's own buffers); from other stores
    (``fetched``) it holds up to ``async.concurrency`` encoded chunks at once.
    A read that cuts a chunk counts zarr's term, which is larger. Not counted:
    gzip's pieces (256 KiB) and a shard's index (16 bytes per inner chunk); a
    zstd chunk in several frames, or whose frame does not state its size (not
    what numcodecs, hence zarr-python, writes), holds one more decoded chunk.

    Measured (AMD EPYC Zen 3; m = 2048 of 32x32x16 -> 32, float32, 256
    samples per task; tracemalloc's peak of a task run in process): input
    chunks of 256, 102.2 MiB against a bound of 136.6 MiB; chunks of 1024,
    279.8 MiB against 304.0 MiB (the bound without this term, 136.6 MiB, was
    2.05x too low): reading dZ alone held its 32 MiB block, 120 MiB of encoded
    bytes and a 128 MiB decoded chunk. The process's RSS rose by 278.8 MiB in
    the first task's dZ read, and by up to 344 MiB in later ones: glibc keeps
    freed heap between tasks (293 MiB with ``MALLOC_MMAP_THRESHOLD_=1048576``).

    Parameters
    ----------
    batch : int
        Samples per task.
    m : int
        Samples in the array.
    chunk : int
        The array's Zarr chunk along m.
    sample_bytes : int
        Bytes of one sample as stored.
    fast_reader : bool, optional
        Whether the fast reader reads the array; default: unless
        ``DCONV_FAST_READ=0`` (then every read goes through zarr).
    fetched : bool
        The fast reader fetches the chunks from a store other than local files
        or zarr's MemoryStore.
    """
    if fast_reader is None:
        fast_reader = os.environ.get(FAST_READ_ENV, "").strip() != "0"
    whole = batch % chunk == 0 or batch >= m
    touched = -(-min(batch, m) // chunk) if whole else -(-(chunk - math.gcd(batch, chunk) + batch) // chunk)
    in_flight = min(touched, -(-m // chunk), int(zarr.config.get("async.concurrency") or touched))
    if whole and fast_reader:
        scratch = chunk * sample_bytes if m % chunk else 0
        return scratch + (in_flight * chunk * sample_bytes if fetched else 0)
    return in_flight * 2 * chunk * sample_bytes


WORKER_BASELINE = 96 * 2**20
"""Bytes a dconv worker process holds before its first task: its Python, Dask, NumPy, Zarr and dconv.

Measured: the RSS of each worker of the embedded cluster (a ``distributed``
nanny's worker process, 1 thread) after ``client.run(importlib.import_module,
"dconv.graph")`` was 88.5-88.7 MiB in 6 workers of 3 clusters, and 91.5-91.9
MiB after a job; AMD EPYC Zen 3, 2 cores, Linux, Python 3.11, distributed
2026.8.0, zarr 3.1.6, numpy 2.4.
"""

WORKER_HEADROOM = (64 * 2**20, 0.25)
"""``(fixed bytes, fraction of the task bound)`` a worker keeps beyond its baseline and one task.

For what the bound leaves out: Dask's state and messages, the results a worker
holds until the tree reduction takes them, and heap the allocator keeps after a
task. Measured (same machine as :data:`WORKER_BASELINE`, 2 workers, m = 2048 of
32x32x16 -> 32, float32, input chunks of 256): peak RSS 194 MiB for tasks of 256
samples (bound 136.6 MiB) and 295 MiB for 512 (bound 272.9 MiB), baseline
included; a read that cuts input chunks rose to 1.13x its bound
(:func:`read_memory`).
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
        The task bound (:meth:`JobPlan.task_memory`).
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

Every task has a fixed cost: measured at 60-80 ms of wall time per task, most of
it the output's per-chunk writes (40-65 ms per task however small its block).
A task's own work runs at about 15 GFLOP/s where channels are many, and about
1 µs per input pixel where they are few (the vector lanes go unfilled), so it
outweighs the fixed cost twice over (time per sample within 1.5x of what it
tends to) from about 2 GFLOP or 131,072 pixels per task.

Measured with ``dconv backward`` on 2 local workers (AMD EPYC Zen 3, 2 cores,
shared: load 3-6; input chunks equal to the batch chunk; fastest of 2-5
interleaved runs, seconds after the cluster is up):

============================  ======================================================
layer, m                      batch chunk: seconds
============================  ======================================================
32x32x16 -> 32, 4,096         1: 127, 2: 100, 4: 57.5, 8: 30.3, 16: 19.0, 32: 12.0,
                              64: 4.67, 128: 3.27, 256: 2.88, 512: 5.01
8x8x4 -> 4, 65,536            64: 42.8, 256: 11.6, 1,024: 6.42, 4,096: 2.83, 16,384: 2.15
16x16x64 -> 64, 4,096         16: 20.9, 32: 13.8, 64: 10.2, 128: 6.54, 256: 6.40, 512: 3.56
============================  ======================================================

The rule warns below 106, 2,048 and 53 samples per task for these layers; time
per sample crosses 1.5x the best near 80, 2,100 and 64 (the third layer's 512
gains on kernel speed, not overhead).
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


def small_task(batch: int, shapes: Mapping[str, Sequence[int]], geometry: ConvGeometry) -> tuple[int, int, int] | None:
    """``(FLOPs, pixels, enough)`` if tasks of ``batch`` samples are too small, else None.

    Too small: fewer than :data:`SMALL_TASK_FLOPS` FLOPs and fewer than
    :data:`SMALL_TASK_PIXELS` pixels (:func:`task_work`); the fixed cost of a
    task then makes up more than a third of its time. ``enough`` is the fewest
    samples per task that are not too small.
    """
    flops, pixels = task_work(batch, shapes, geometry)
    if flops >= SMALL_TASK_FLOPS or pixels >= SMALL_TASK_PIXELS:
        return None
    one_flops, one_pixels = task_work(1, shapes, geometry)
    enough = math.ceil(SMALL_TASK_PIXELS / one_pixels)
    if one_flops:
        enough = min(enough, math.ceil(SMALL_TASK_FLOPS / one_flops))
    return flops, pixels, enough


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


# --------------------------------------------------------------------------- planning


def resolve_params(options: JobOptions, hparameters: Mapping[str, Any] | None) -> ConvParams:
    """Options win; the ones not given come from the input's ``hparameters`` attribute, else 1, 0, 1.

    ``hparameters`` is the classic ``{"stride": s, "pad": p}`` dict, optionally
    with ``"dilation"``; ``pad`` may take any padding form.
    """
    stored = dict(hparameters or {})
    unknown = set(stored) - {"stride", "pad", "dilation"}
    if unknown:
        raise InputError(
            f"the input's hparameters attribute takes keys stride, pad, dilation; got {sorted(unknown)} instead."
        )
    return ConvParams.parse(
        stride=options.stride if options.stride is not None else stored.get("stride", 1),
        padding=options.padding if options.padding is not None else stored.get("pad", 0),
        dilation=options.dilation if options.dilation is not None else stored.get("dilation", 1),
    )


def _no_conv_options(options: JobOptions) -> bool:
    return options.stride is None and options.padding is None and options.dilation is None


def _geometry(shapes: Mapping[str, tuple[int, ...]], params: ConvParams, assumed: bool) -> ConvGeometry:
    """:func:`backward_geometry`; a shape error says so when the conv parameters were assumed, not given."""
    try:
        return backward_geometry(shapes["dZ"], shapes["A_prev"], shapes["W"], params)
    except InputError as e:
        if not assumed:
            raise
        raise InputError(
            f"{e} The input has no hparameters attribute and no stride, padding or dilation was given, "
            "so stride 1, padding 0 and dilation 1 were assumed; give the layer's."
        ) from e


def plan_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> JobPlan:
    """Validate a job without writing anything.

    Parameters
    ----------
    inputs, out, storage_options
        As for :func:`dconv.backward_job`.
    options : JobOptions, optional
        How the job computes; ``values`` (any :class:`JobOptions` field) replace its fields.

    Raises
    ------
    InputError
        Anything wrong that the metadata shows; or another job holds a fresh lease on ``out``
        (:mod:`dconv.store.lease`), named with the age of its last heartbeat.
    """
    options = JobOptions.build(options, **values)
    storage_options = dict(storage_options or {})
    stored = OutputStore(absolute_location(out), storage_options).provenance() if options.resume else None
    if stored is not None:  # the output's own options, where none are given
        options = options.resuming(JobOptions.from_dict(stored), public_location(str(out)))
    options = JobOptions.build(options, simd=parse_word(options.simd or os.environ.get(SIMD_ENV_VAR)))
    inputs = job_inputs(inputs, storage_options)
    params = resolve_params(options, inputs.hparameters)
    shapes = {name: tuple(int(n) for n in array.shape) for name, array in inputs.arrays.items()}
    geometry = _geometry(shapes, params, assumed=inputs.hparameters is None and _no_conv_options(options))
    compute_dtype = result_dtype(*(np.dtype(array.dtype) for array in inputs.arrays.values()))
    dtypes = {name: str(np.dtype(array.dtype)) for name, array in inputs.arrays.items()}
    streamed = {name: inputs.arrays[name] for name in ("A_prev", "dZ")}
    input_chunks = {name: int(array.chunks[0]) for name, array in streamed.items() if isinstance(array, zarr.Array)}
    input_reads = {name: read_path(streamed[name]) for name in input_chunks}
    batch_chunk = choose_batch_chunk(options, shapes, geometry, compute_dtype, input_chunks, dtypes, input_reads)
    bounds = batch_bounds(shapes["A_prev"][0], batch_chunk)

    layout = place_layout(
        shapes, compute_dtype, batch_chunk, options.split_every, dA_prev=options.dA_prev, stats=options.stats
    )
    out_store = OutputStore(absolute_location(out), storage_options, layout)
    check_unheld(out_store.url, storage_options, options.lease_timeout)  # another job writing it: nothing else matters
    out_store.check_target(inputs.zarr_location, overwrite=options.overwrite, resume=options.resume)
    plan = JobPlan(
        options=options,
        params=params,
        geometry=geometry,
        shapes=shapes,
        dtypes=dtypes,
        compute_dtype=compute_dtype,
        batch_chunk=int(batch_chunk),
        bounds=bounds,
        dz_sources=batch_sources(inputs.arrays["dZ"], "dZ", bounds),
        a_sources=batch_sources(inputs.arrays["A_prev"], "A_prev", bounds),
        W=read_whole("W", inputs.arrays["W"]).astype(compute_dtype, copy=False),
        out=out_store,
        input_location=inputs.location,
        input_chunk=inputs.chunk_along_m,
        input_chunks=input_chunks,
        input_reads=input_reads,
    )
    if stored is not None:
        plan.check_resumable(stored)
    return plan


def plan_recipe(
    recipe: InputRecipe,
    inputs: str | PathLike,
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> JobPlan:
    """Plan a job whose input does not exist yet: the group ``recipe`` would write at ``inputs``.

    The plan is :func:`plan_job`'s for an input of the recipe's shapes, dtype,
    Zarr chunks and ``hparameters``, so its memory bound, disk figures and
    warnings are those of the real run. Nothing is written and nothing is
    generated: the arrays are Zarr metadata in memory. Such a plan describes
    the job (:meth:`JobPlan.describe` names ``inputs`` and the recipe) but cannot
    run it: make the input (:func:`dconv.make_inputs`), then :func:`plan_job`.

    Parameters
    ----------
    recipe : InputRecipe
        What :func:`dconv.make_inputs` would write.
    inputs : str or path
        Where it would write it.
    out, options, storage_options, values
        As for :func:`plan_job`.

    Raises
    ------
    InputError
        The recipe's layer has no valid output shape, or :func:`plan_job` refuses the job.
    """
    recipe = InputRecipe.build(recipe)
    params = ConvParams.parse(recipe.stride, recipe.padding, recipe.dilation)
    a_shape = (recipe.m, recipe.height, recipe.width, recipe.in_channels)
    w_shape = (*recipe.kernel, recipe.in_channels, recipe.out_channels)
    shapes = {"A_prev": a_shape, "dZ": output_shape(a_shape, w_shape, params), "W": w_shape}
    store = zarr.storage.MemoryStore()
    arrays = {
        name: zarr.create_array(
            store,
            name=name,
            shape=shape,
            chunks=shape if name == "W" else (min(recipe.chunk, recipe.m), *shape[1:]),
            dtype=recipe.dtype,
            compressors=compressor(np.dtype(recipe.dtype)),
            dimension_names=DIMENSIONS[name],
        )
        for name, shape in shapes.items()
    }
    group = InputGroup(**arrays, b=None, hparameters=params.to_hparameters(), location=public_location(str(inputs)))
    plan = plan_job(group, out, options, storage_options=storage_options, **values)
    return dataclasses.replace(plan, input_recipe=recipe)

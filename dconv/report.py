"""The user-facing text of a plan: what ``--dry-run`` describes, the line said before a job starts, the warnings.

Every function takes a :class:`~dconv.plan.JobPlan` and returns text; the
figures come from the plan and the sizing model (:mod:`dconv.sizing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from dask.utils import format_bytes

from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.sizing import SMALL_TASK_FLOPS, SMALL_TASK_PIXELS, TASK_SECONDS, small_task, straddles, task_memory
from dconv.store import PROGRESS, Kind

if TYPE_CHECKING:
    from dconv.plan import JobPlan

__all__ = ["announce", "describe", "straddle_warning", "warnings"]


def count(n: int, noun: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe(plan: JobPlan) -> str:
    """A few lines for ``--dry-run``: what would run, its per-task memory, and what it reads and writes."""
    n_tasks = len(plan.bounds)
    disk = plan.disk_bytes()
    blocks = [entry.name for entry in plan.out.layout.of_kind(Kind.BLOCK)]
    sums = [name for name in disk if name not in ("input", PROGRESS, *blocks)]
    if plan.input_recipe is None:
        source = f"input   {plan.input_location}"
    else:
        source = (
            f"input   {plan.input_location} does not exist yet; the run would first make it: "
            f"{plan.input_recipe.describe()}"
        )
    lines = [
        source,
        f"output  {plan.out.location}" + (" (resume)" if plan.options.resume else ""),
        "shapes  " + ", ".join(f"{k} {v}" for k, v in plan.shapes.items()) + f" ({plan.compute_dtype})",
        f"conv    {plan.params.describe()}, pads {plan.geometry.pads}",
        "writes  " + ", ".join(entry.name for entry in plan.out.layout.arrays)
        + ("; the gradient noise scale and top samples in the provenance" if plan.options.stats else ""),
        f"chunks  {n_tasks} of up to {count(plan.batch_chunk, 'sample')} (m = {plan.m}), "
        f"tree fan-in {plan.options.split_every}",
        f"memory  at most about {format_bytes(plan.task_memory())} per running task"
        + (f" (max_memory {format_bytes(plan.options.max_memory)})" if plan.options.max_memory else ""),
        f"disk    input {format_bytes(disk['input'])} (uncompressed); output "
        f"{format_bytes(sum(disk.values()) - disk['input'])}: "
        + ", ".join(f"{name} {format_bytes(disk[name])} (uncompressed)" for name in blocks)
        + f", {', '.join(sums)} {format_bytes(sum(disk[name] for name in sums))}"
        + f", {PROGRESS} {format_bytes(disk[PROGRESS])}",
        f"simd    {SIMD_ENV_VAR}={plan.simd}, resolved on each worker",
    ]
    return "\n".join(lines)


def announce(plan: JobPlan, n_workers: int, threads_per_worker: int = 1) -> str:
    """The plan in one line, printed before a job starts.

    ``dconv: 16 tasks of 256 samples (m = 4096), at most 136.6 MiB each; 2 workers x 1 thread``

    Parameters
    ----------
    n_workers, threads_per_worker : int
        Where the tasks run: tasks run ``n_workers * threads_per_worker`` at a time.
    """
    n_tasks, size = len(plan.bounds), min(plan.batch_chunk, plan.m)
    samples = count(size, "sample") if n_tasks == 1 or plan.m % size == 0 else f"up to {count(size, 'sample')}"
    budget = f" (max_memory {format_bytes(plan.options.max_memory)})" if plan.options.max_memory else ""
    return (
        f"dconv: {count(n_tasks, 'task')} of {samples} (m = {plan.m}), at most "
        f"{format_bytes(plan.task_memory())} each{budget}; "
        f"{count(n_workers, 'worker')} x {count(threads_per_worker, 'thread')}"
    )


def warnings(plan: JobPlan, n_workers: int, threads_per_worker: int = 1, cores: int | None = None) -> list[str]:
    """What in this plan wastes time or memory: one line each, each starting ``dconv: warning: ``.

    - tasks cut the input's Zarr chunks along m (:func:`straddle_warning`);
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
    straddle = straddle_warning(plan)
    if straddle:
        found.append(straddle)
    size = min(plan.batch_chunk, plan.m)
    slots, n_tasks = max(1, n_workers * threads_per_worker), len(plan.bounds)
    small = small_task(size, plan.shapes, plan.geometry)
    overhead = n_tasks * TASK_SECONDS / slots
    if small is not None and overhead >= 2:  # a tiny job's few tasks cost too little to mention
        found.append(
            f"dconv: warning: tasks of {count(size, 'sample')} are small ({small.flops / 1e6:.3g} MFLOP, "
            f"{count(small.pixels, 'pixel')} each): their fixed cost, about {TASK_SECONDS * 1e3:.0f} ms a task "
            f"({overhead:.0f} s in all), dominates below {SMALL_TASK_FLOPS / 1e9:g} GFLOP or "
            f"{SMALL_TASK_PIXELS} pixels a task; use batch_chunk >= {min(small.enough, -(-plan.m // slots))}"
        )
    whole_job_small = small_task(plan.m, plan.shapes, plan.geometry) is not None
    if n_tasks < slots and not whole_job_small:  # a job that is one small task in all: nothing to share
        idle = slots - n_tasks
        advice = f"use batch_chunk <= {-(-plan.m // slots)}" if plan.m >= slots else "use fewer workers"
        found.append(
            f"dconv: warning: {count(n_tasks, 'task')} for {count(n_workers, 'worker')} x "
            f"{count(threads_per_worker, 'thread')}: {idle} of {slots} will sit idle; {advice}"
        )
    if cores is not None and slots > cores:
        found.append(
            f"dconv: warning: {count(n_workers, 'worker')} x {count(threads_per_worker, 'thread')} run {slots} "
            f"tasks at once on {count(cores, 'core')}: they compete for the cores (workers x threads x BLAS "
            f"threads should be the cores); use {count(cores, 'worker')} x 1 thread"
        )
    return found


def straddle_warning(plan: JobPlan) -> str | None:
    """The warning that tasks cut the input's Zarr chunks along m, or None if they read whole chunks."""
    cut = [chunk for chunk in plan.input_chunks.values() if straddles(plan.batch_chunk, plan.m, chunk)]
    if not cut:
        return None
    chunk, size = max(cut), min(plan.batch_chunk, plan.m)
    starts = np.asarray([start for start, _ in plan.bounds], dtype=np.int64)
    stops = np.asarray([stop for _, stop in plan.bounds], dtype=np.int64)
    decodes = int(((stops - 1) // chunk - starts // chunk + 1).sum()) / -(-plan.m // chunk)
    extra = plan.task_memory() - task_memory(
        size, plan.shapes, plan.geometry, plan.compute_dtype, stats=plan.options.stats
    )
    held = f" (+{format_bytes(extra)} per task, in its bound)" if extra > 0 else ""
    if plan.options.batch_chunk is not None:
        tasks, advice = f"batch_chunk {plan.batch_chunk} is", f"use a multiple of {chunk}"
    else:  # chosen: the most max_memory allows is less than one input chunk
        tasks = f"tasks of {count(plan.batch_chunk, 'sample')} (the most max_memory allows) are"
        advice = f"a larger max_memory allows tasks of {chunk}"
    return (
        f"dconv: warning: {tasks} not a multiple of the input's Zarr chunk {chunk} "
        f"along m: tasks decode each input chunk {f'{decodes:.1f}'.removesuffix('.0')} times and hold the "
        f"chunks they cut whole{held}; {advice}"
        + ("" if small_task(size, plan.shapes, plan.geometry) is not None
           else f", or input chunks of {size} (or a divisor)")
    )

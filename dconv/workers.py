"""An existing cluster's workers: waiting for them, and checking them against a job's memory.

A job on a cluster someone else started (``--scheduler``, ``--scheduler-file``)
waits for ``wait_workers`` of them (:func:`wait_for_workers`), checks their
memory limits and threads against its plan before a task runs
(:func:`check_workers`), and sends its tasks only to those that hold one
(:class:`FittingWorkers`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dask.utils import format_bytes

from dconv.errors import InputError

if TYPE_CHECKING:
    from dconv.sizing import WorkerMemory

__all__ = ["cluster_workers", "wait_for_workers", "WorkerFit", "FittingWorkers", "check_workers", "WAIT_POLL", "WAIT_SAY"]

WAIT_POLL = 0.25
"""Seconds between two looks at an existing cluster's workers while a job waits for them."""

WAIT_SAY = 1.0
"""While a job waits for workers, at most one ``waiting`` line in this many seconds."""


def wait_for_workers(client: Any, n: int, timeout: float, say: Callable[[str], None]) -> None:
    """Wait until ``n`` workers have joined ``client``'s scheduler; say so while waiting.

    A scheduler is often up before its workers (on SLURM, the workers' jobs
    may still be queued). While fewer than ``n`` have joined, ``say`` gets
    ``dconv: waiting for workers (K of N)``: once at the start, then when K
    changes, at most once in :data:`WAIT_SAY` seconds. Nothing is said when
    they are there already.

    Raises
    ------
    InputError
        Fewer than ``n`` joined within ``timeout`` seconds: one line naming the
        scheduler, the timeout and how many came.
    """
    deadline = time.monotonic() + timeout
    said, said_at = None, 0.0
    while True:
        count = len(cluster_workers(client))
        if count >= n:
            return
        now = time.monotonic()
        if now >= deadline:
            who = "no worker" if count == 0 else "too few workers"
            raise InputError(
                f"{who} joined the scheduler at {client.scheduler.address} within {timeout:g} s (wait_timeout); "
                f"{count} of {n} (wait_workers) arrived."
            )
        if said is None or (count != said and now - said_at >= WAIT_SAY):
            say(f"dconv: waiting for workers ({count} of {n})")
            said, said_at = count, now
        time.sleep(WAIT_POLL)


@dataclass(frozen=True)
class WorkerFit:
    """Which workers of a cluster can run a job's tasks (:func:`check_workers`).

    Attributes
    ----------
    fitting : tuple of str
        The addresses of the workers whose memory limit holds a task at one
        thread (``WorkerMemory.limit``); a worker with no limit fits.
    too_small : tuple of str
        The others.
    threads : int
        The most threads a fitting worker has.
    warnings : tuple of str
        One line each, starting ``dconv: warning: ``: the workers left out,
        and fitting workers whose threads together need more than their limit.
    """

    fitting: tuple[str, ...]
    too_small: tuple[str, ...]
    threads: int
    warnings: tuple[str, ...]


def _limit(info: Mapping[str, Any]) -> int:
    """A worker's memory limit in bytes, 0 for none (``memory_limit`` 0 or None)."""
    return int(info.get("memory_limit") or 0)


def _holds(info: Mapping[str, Any], need: int) -> bool:
    return _limit(info) == 0 or _limit(info) >= need


def cluster_workers(client: Any) -> dict[str, Mapping[str, Any]]:
    """Every worker of ``client``'s cluster, by address: its ``memory_limit``, ``nthreads``, ...

    ``scheduler_info()`` lists only 5 workers by default in some releases of
    distributed (2025.4 to 2026.7); ``n_workers=-1`` asks for all of them,
    where the argument exists.
    """
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # a distributed from before the argument: it lists them all
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


class FittingWorkers:
    """Called before each submission: the workers its tasks must go to, as of now.

    Returns None when every worker holds a task (:func:`check_workers`), so
    any may run them; else the addresses of those that do, so a fitting
    worker that joins mid-job gets the next submissions' tasks. When none that
    fits is there (they left), the last ones seen: the tasks wait for them (a
    loose restriction would let Dask's work stealing give them to the workers
    too small for them). The job's shared context is not restricted.

    Parameters
    ----------
    client : distributed.Client
    memory : dconv.sizing.WorkerMemory
    fitting : sequence of str
        The fitting workers :func:`check_workers` found.
    """

    def __init__(self, client: Any, memory: WorkerMemory, fitting: tuple[str, ...] | list[str]) -> None:
        self.client, self.memory, self.last = client, memory, list(fitting)

    def __call__(self) -> list[str] | None:
        workers = cluster_workers(self.client)
        fitting = [address for address, info in workers.items() if _holds(info, self.memory.limit)]
        if fitting and len(fitting) == len(workers):
            return None
        self.last = fitting or self.last
        return self.last


def check_workers(workers: Mapping[str, Mapping[str, Any]], memory: WorkerMemory) -> WorkerFit:
    """Check a cluster's workers against a job's memory, before any task is submitted.

    A worker holds a task when its ``memory_limit`` is at least
    ``memory.limit``, the limit of a worker of one thread
    (:meth:`dconv.sizing.WorkerMemory.limit_for`), or when it has no limit. A
    worker of T threads runs T tasks at once and needs ``memory.limit_for(T)``;
    one that holds a task but not T of them is warned about, not left out.

    Parameters
    ----------
    workers : mapping
        ``cluster_workers(client)``: address -> ``memory_limit`` (bytes) and ``nthreads``.
    memory : dconv.sizing.WorkerMemory
        The job's (:meth:`dconv.plan.JobPlan.worker_memory`).

    Raises
    ------
    InputError
        No worker holds a task: one line with the ``--memory-limit`` they need and the largest they have.
    """
    if not workers:
        raise InputError("no worker is left in the cluster (they all left after joining); start workers again.")
    fitting = [address for address, info in workers.items() if _holds(info, memory.limit)]
    too_small = [address for address in workers if address not in fitting]
    advice = f"start workers with --nthreads 1 --memory-limit {memory.flag}"
    if not fitting:
        largest = max(too_small, key=lambda address: _limit(workers[address]))
        raise InputError(
            f"no worker can hold a task: each needs --memory-limit {memory.flag} (at 1 thread), the "
            f"largest has {format_bytes(_limit(workers[largest]))} ({largest}); {advice}, or use a smaller "
            f"batch_chunk or max_memory."
        )
    found = []
    if too_small:
        largest = max(_limit(workers[address]) for address in too_small)
        found.append(
            f"dconv: warning: {len(too_small)} of {len(workers)} workers cannot hold a task ({_some(too_small)}: "
            f"memory limit {format_bytes(largest)} or less, a task needs --memory-limit {memory.flag} at 1 thread); "
            f"the job runs on the other {len(fitting)}; {advice}"
        )
    found.extend(_thread_warnings({address: workers[address] for address in fitting}, memory, advice))
    threads = max(int(workers[address].get("nthreads") or 1) for address in fitting)
    return WorkerFit(tuple(fitting), tuple(too_small), threads, tuple(found))


def _thread_warnings(workers: Mapping[str, Mapping[str, Any]], memory: WorkerMemory, advice: str) -> list[str]:
    """One warning per (threads, limit) of the workers whose threads need more than their limit together."""
    from dconv.sizing import mib_flag

    short: dict[tuple[int, int], list[str]] = {}
    for address, info in workers.items():
        threads, limit = int(info.get("nthreads") or 1), _limit(info)
        if threads > 1 and limit and limit < memory.limit_for(threads):
            short.setdefault((threads, limit), []).append(address)
    return [
        f"dconv: warning: {_some(addresses)} {'has' if len(addresses) == 1 else 'have'} {threads} threads and "
        f"memory limit {format_bytes(limit)}: {format_bytes(limit // threads)} per thread, below the "
        f"{format_bytes(memory.limit_for(threads) // threads)} per thread that {threads} tasks at once need "
        f"(--memory-limit {mib_flag(memory.limit_for(threads))}); {advice}"
        for (threads, limit), addresses in short.items()
    ]


def _some(addresses: list[str], shown: int = 2) -> str:
    """``worker tcp://a``, ``workers tcp://a, tcp://b`` or ``workers tcp://a, tcp://b and 3 more``."""
    more = f" and {len(addresses) - shown} more" if len(addresses) > shown else ""
    return f"worker{'s' if len(addresses) > 1 else ''} {', '.join(addresses[:shown])}{more}"


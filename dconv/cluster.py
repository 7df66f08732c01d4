"""Where a job runs: the embedded local cluster, or an existing Dask cluster.

The embedded default is a ``distributed.LocalCluster`` bound to 127.0.0.1 with
one single-threaded worker process per core, BLAS threads set so that
workers x threads x BLAS threads = cores, glibc's malloc settings of
:data:`WORKER_MALLOC_ENV`, and no dashboard per worker (the scheduler's serves the link
dconv prints). Each worker's memory limit comes from
the job's plan (:func:`dconv.plan.worker_memory`), and a plan whose workers would
need more memory than the machine has is refused before the cluster starts
(:func:`check_machine_memory`).

``--scheduler ADDRESS`` connects to a cluster someone else started (``dask
scheduler`` / ``dask worker``, dask-jobqueue, dask-kubernetes, ...), and
``--scheduler-file PATH`` to one that wrote its address to a file, Dask's HPC
convention (``dask scheduler --scheduler-file``, dask-mpi, dask-jobqueue); its
workers keep their own settings. A job there waits for ``wait_workers`` of them
and checks them against its plan (:mod:`dconv.workers`; :func:`wait_for_workers`,
:func:`check_workers` and :class:`FittingWorkers` are importable from here too).
``--scheduler threads`` (or ``synchronous``) is no cluster: the job runs in this process.

The embedded cluster's worker processes never receive SIGINT or SIGTERM (they
start with both blocked: :func:`withheld_from_new_processes`). They share the
terminal's process group, so Ctrl-C reaches them as well as the client, and a
batch scheduler's SIGTERM reaches every process of the job; the client alone
handles them (:mod:`dconv.job`: the output is marked "interrupted") and then
stops the workers. A worker whose client is gone exits by itself (distributed
watches the parent process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from dask.utils import format_bytes

from dconv.errors import InputError
from dconv.option_fields import (
    Options,
    any_string,
    option,
    optional,
    positive_float,
    positive_int,
    positive_number,
    whole_number,
)
from dconv.workers import FittingWorkers, WorkerFit, check_workers, wait_for_workers

if TYPE_CHECKING:
    from dconv.sizing import WorkerMemory

__all__ = [
    "ClusterOptions",
    "connect",
    "wait_for_workers",
    "WorkerFit",
    "FittingWorkers",
    "check_workers",
    "LOCAL_SCHEDULERS",
    "check_machine_memory",
    "machine_memory",
    "BLAS_THREAD_VARIABLES",
    "WORKER_BLOCKED_SIGNALS",
    "WORKER_MALLOC_ENV",
]

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

PROFILE_VARIABLE = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
"""Set it (to True) to keep the embedded cluster's statistical profiler on, for the dashboard's
Profile page. dconv turns it off otherwise: a worker keeps up to an hour of its samples, so
its memory grew with the job's length (measured, AMD EPYC Zen 3, 2 workers: the job's summed peak
RSS grew 1.054x over 32x m with it, 1.045x without)."""

WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}
"""glibc's malloc settings each embedded worker process starts with, in place of distributed's
``MALLOC_TRIM_THRESHOLD_=65536``.

distributed's setting fixes the mmap threshold at 128 KiB and hands freed memory back at once, so
each of the kernel's temporaries (up to tens of MiB a chunk) is a fresh mapping whose pages fault in
again. These keep temporaries up to 32 MiB (glibc's largest mmap threshold) on the heap, and the
freed heap (up to 256 MiB, no more than a task's peak) for the next chunk. glibc reads them when the
process starts, so they go in ``distributed.nanny.pre-spawn-environ``, not in the workers' ``env``
(set once their Python runs): :func:`worker_malloc_environment`. benchmarks/bench_worker.py measures
them."""

WORKER_BLOCKED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals the embedded cluster's worker processes never receive: the client handles them."""

PLACEMENTS = ("workers", "scheduler", "scheduler_file")
"""The fields that say where a job runs; at most one is given."""

LOCAL_SCHEDULERS = ("threads", "synchronous")
"""The ``scheduler`` values that run a job in this process, on a local Dask scheduler, with no cluster."""


def parse_scheduler(value: Any) -> str:
    """A local scheduler's name (:data:`LOCAL_SCHEDULERS`), or a Dask scheduler address with its port.

    Raises
    ------
    InputError
        Not a string, or an address distributed cannot parse (``bogus``,
        ``tcp://host`` without its port).
    """
    value = any_string("scheduler")(value)
    if value in LOCAL_SCHEDULERS:
        return value
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(value)
        if scheme in ("tcp", "tls") and not 0 < parse_host_port(location)[1] < 2**16:
            raise ValueError("the port is out of range")
    except ValueError as e:
        raise InputError(
            f"scheduler must be a Dask scheduler address such as tcp://host:8786, or one of "
            f"{', '.join(LOCAL_SCHEDULERS)}; got {value!r} instead."
        ) from e
    return value


def available_cores() -> int:
    """Cores this process may run on: ``dask.system.cpu_count()``, the least of the machine's
    cores, the affinity mask and a cgroup's CPU quota (a container gets its share, not the host's)."""
    from dask.system import cpu_count

    return cpu_count()


@dataclass(frozen=True)
class ClusterOptions(Options):
    """How to reach workers.

    Attributes
    ----------
    workers : int or None
        Worker processes of the embedded local cluster; default one per core.
        Each gets the memory limit of the job's plan (:meth:`dconv.plan.JobPlan.worker_memory`).
    scheduler : str or None
        Address of an existing scheduler (``tcp://host:8786``, ``tls://...``);
        or ``"threads"`` or ``"synchronous"``: no cluster, the job runs in this
        process on that local Dask scheduler (as ``run_job(scheduler=...)``).
    scheduler_file : str or None
        The JSON file an existing scheduler wrote its address to
        (``dask scheduler --scheduler-file PATH``); a relative path is relative
        to the directory dconv runs in, as every path of a spec.
    tls_ca_file, tls_cert, tls_key : str or None
        TLS material for a ``tls://`` scheduler.
    connect_timeout : float
        Seconds to wait for an existing scheduler (and for its scheduler file
        to appear) before giving up.
    wait_workers : int
        On an existing cluster: the workers that must have joined before the
        job starts (default 1). Until then the job waits, and says so on stderr.
    wait_timeout : float
        Seconds to wait for them (default 300); then the job is refused.

    With neither ``scheduler`` nor ``scheduler_file``, the job starts the
    embedded local cluster. Giving one of ``workers``, ``scheduler`` and
    ``scheduler_file`` to :meth:`build` clears the others (a spec's
    ``workers = 2`` under ``--scheduler-file PATH``).
    """

    workers: int | None = option(
        None,
        help="worker processes of the local cluster (default: one per core); a backward job's --dry-run "
        "prints the memory limit each gets",
        parse=optional(whole_number("workers", 1)),
        table="cluster",
        toml=(int,),
        cli=positive_int,
        metavar="N",
        excludes="scheduler",
        record="carried",
    )
    scheduler: str | None = option(
        None,
        help="an existing Dask scheduler, e.g. tcp://host:8786; or threads or synchronous: no cluster, "
        "run in this process on that local Dask scheduler",
        parse=optional(parse_scheduler),
        table="cluster",
        toml=(str,),
        cli=str,
        metavar="ADDRESS",
        excludes="workers",
        record="carried",
    )
    scheduler_file: str | None = option(
        None,
        help="the scheduler file of an existing Dask cluster (dask scheduler --scheduler-file PATH, dask-mpi, "
        "dask-jobqueue)",
        parse=optional(any_string("scheduler_file")),
        table="cluster",
        toml=(str,),
        cli=str,
        metavar="PATH",
        record="carried",
    )
    tls_ca_file: str | None = option(
        None, help="CA certificate for a tls:// scheduler", parse=optional(any_string("tls_ca_file")),
        table="cluster", toml=(str,), cli=str, metavar="PATH", record="carried",
    )
    tls_cert: str | None = option(
        None, help="client certificate for a tls:// scheduler", parse=optional(any_string("tls_cert")),
        table="cluster", toml=(str,), cli=str, metavar="PATH", record="carried",
    )
    tls_key: str | None = option(
        None, help="client private key for a tls:// scheduler", parse=optional(any_string("tls_key")),
        table="cluster", toml=(str,), cli=str, metavar="PATH", record="carried",
    )
    connect_timeout: float = option(
        10.0,
        help="seconds to wait for an existing scheduler to answer (and for its scheduler file to appear)",
        parse=positive_number("connect_timeout"),
        table="cluster",
        toml=(int, float),
        cli=positive_float,
        metavar="SECONDS",
    )
    wait_workers: int = option(
        1,
        help="on an existing cluster, start once this many workers have joined its scheduler",
        parse=whole_number("wait_workers", 1),
        table="cluster",
        toml=(int,),
        cli=positive_int,
        metavar="N",
    )
    wait_timeout: float = option(
        300.0,
        help="seconds to wait for those workers; then the job is refused",
        parse=positive_number("wait_timeout"),
        table="cluster",
        toml=(int, float),
        cli=positive_float,
        metavar="SECONDS",
    )

    def check(self) -> None:
        given = [name for name in PLACEMENTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise InputError(
                "give either workers (a local cluster) or scheduler or scheduler_file (an existing one), "
                f"only one; got {' and '.join(given)}."
            )

    @classmethod
    def build(cls, base: Options | None = None, **values: Any) -> ClusterOptions:
        """:meth:`Options.build`; giving one of ``workers``, ``scheduler`` and ``scheduler_file``
        clears the others that are not given."""
        if any(values.get(name) is not None for name in PLACEMENTS):
            values = {**dict.fromkeys(PLACEMENTS), **values}
        return super().build(base, **values)

    def recorded_place(self) -> dict[str, Any]:
        """Where a job on this cluster runs, as its output records it for the resume command (:meth:`to_dict`),
        with file paths made absolute: a resume may run in another directory."""
        paths = ("scheduler_file", "tls_ca_file", "tls_cert", "tls_key")
        absolute = {name: os.path.abspath(getattr(self, name)) for name in paths if getattr(self, name) is not None}
        return dataclasses.replace(self, **absolute).to_dict()

    @property
    def embedded(self) -> bool:
        """The job starts the embedded local cluster (neither ``scheduler`` nor ``scheduler_file`` is given)."""
        return self.scheduler is None and self.scheduler_file is None

    @property
    def local(self) -> str | None:
        """The local Dask scheduler ``scheduler`` names (``"threads"``, ``"synchronous"``), or None."""
        return self.scheduler if self.scheduler in LOCAL_SCHEDULERS else None

    def check_simd(self, word: str | None) -> str:
        """Refuse a ``DCONV_SIMD`` word before any worker starts, as far as that can be known here.

        An unknown word always; a level this CPU lacks when the tasks run here
        (the embedded local cluster, a local scheduler). An existing cluster's workers are asked
        when the job starts (:func:`dconv.job.check_simd`). ``word`` None is this
        process's ``DCONV_SIMD``.

        Returns
        -------
        str
            The word, normalised.

        Raises
        ------
        SimdLevelError
        """
        from dconv import simd

        word = simd.parse_word(word if word is not None else os.environ.get(simd.ENV_VAR))
        if self.embedded or self.local is not None:
            simd.resolve_level(word)
        return word

    def security(self):
        """A ``distributed.Security`` for TLS, or None."""
        if not (self.tls_ca_file or self.tls_cert or self.tls_key):
            return None
        from distributed.security import Security

        options = {name: getattr(self, name) for name in ("tls_ca_file", "tls_cert", "tls_key")}
        missing = [name for name, path in options.items() if path is None]
        if missing:
            raise InputError(f"TLS needs tls_ca_file, tls_cert and tls_key together; missing {', '.join(missing)}.")
        for name, path in options.items():
            if not os.path.isfile(path):
                raise InputError(f"{name} must name a readable file; got {path!r} instead.")
        return Security(
            tls_ca_file=self.tls_ca_file,
            tls_client_cert=self.tls_cert,
            tls_client_key=self.tls_key,
            require_encryption=True,
        )


@contextlib.contextmanager
def withheld_from_new_processes(signals: tuple[int, ...] = WORKER_BLOCKED_SIGNALS) -> Iterator[None]:
    """Keep ``signals`` from the threads and processes started in the body, for good; from this one, until its end.

    The body runs with ``signals`` blocked in this thread. A thread inherits
    the mask of the thread that starts it, and a process the mask of the thread
    that forks it, across ``exec``; neither Python nor distributed unblocks
    them. So a LocalCluster made here (its IO loop thread, which starts the
    worker processes, and restarts them later) gets workers that never receive
    these signals. This process does not lose one: a signal that arrives
    meanwhile is noted, not acted on, and raised again at the end, where this
    thread's own handler runs (KeyboardInterrupt, for SIGINT). Ctrl-C while
    the workers start therefore stops the job once they are up. Only the main
    thread can set handlers; from any other thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing's resource tracker unblocks SIGINT and SIGTERM in the thread that starts it (it blocks them
    # around its own start, then unblocks them): start it now, before they are blocked, or the IO loop would.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    received: list[int] = []
    handlers = {number: signal.signal(number, lambda signum, frame: received.append(signum)) for number in signals}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that waited, blocked, is noted here
        for number, handler in handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def worker_malloc_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Worker processes started in the body start with ``env`` (glibc's ``MALLOC_*``) in their environment.

    A nanny takes ``distributed.nanny.pre-spawn-environ`` when it is made, but a variable of this
    process's environment wins over the config, and every nanny copies its own into this process's
    environment (so one cluster's would win over the next's): ``env`` is put there for the body, and the
    variables are restored at its end.
    """
    import dask

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in env.items()}):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def main_module_withheld() -> Iterator[None]:
    """While the block starts worker processes, they do not import the script that started them.

    Python's ``spawn`` runs the parent's main module again in each child (its imports
    and top level, but the ``if __name__ == "__main__":`` block): a script that imports
    PyTorch would give every worker of the embedded cluster a few hundred MiB more than
    the plan's memory limit allows, and the nannies would kill them at start, again and
    again. The embedded cluster's workers run only dconv's tasks, which need nothing of
    the script, so while the block runs the main module shows no file and no module
    name, and ``spawn`` leaves it alone. A worker a nanny restarts later imports it again.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        if main is not None:
            if "__file__" in saved:
                del main.__file__
            main.__spec__ = None
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
        if main is not None and "__spec__" not in saved and hasattr(main, "__spec__"):
            del main.__spec__


def local_cluster_layout(workers: int | None) -> tuple[int, int]:
    """``(n_workers, blas_threads)`` so that workers x 1 thread x BLAS threads = cores."""
    cores = available_cores()
    n_workers = workers or cores
    return n_workers, max(1, cores // n_workers)


def machine_memory() -> int:
    """Bytes of memory this machine gives its processes: the total, or a lower cgroup or RSS limit.

    ``distributed.system.memory_limit()``: the least of ``psutil``'s total, the
    cgroup limits (v1 ``memory.limit_in_bytes``, v2 ``memory.max``, ...) and
    ``RLIMIT_RSS``.
    """
    from distributed.system import memory_limit

    return memory_limit()


def check_machine_memory(n_workers: int, memory: WorkerMemory) -> None:
    """Refuse ``n_workers`` workers whose memory limits add up to more than :func:`machine_memory`.

    Parameters
    ----------
    n_workers : int
    memory : dconv.plan.WorkerMemory
        Each worker's limit (``memory.limit``, bytes) and how it was reached (``memory.describe()``).

    Raises
    ------
    InputError
        One line: the workers, the limit and its parts, their sum and the machine's memory.
    """
    available = machine_memory()
    if n_workers * memory.limit <= available:
        return
    fits = available // memory.limit
    advice = f"{fits} worker{'s' if fits != 1 else ''} fit: use fewer workers, or " if fits >= 1 else "use "
    raise InputError(
        f"{n_workers} worker{'s' if n_workers != 1 else ''} x memory limit {memory.describe()} = "
        f"{format_bytes(n_workers * memory.limit)}, "
        f"more than this machine's {format_bytes(available)}; {advice}a smaller batch_chunk or max_memory."
    )


@contextlib.contextmanager
def connect(
    options: ClusterOptions, *, memory_limit: int | None = None, quiet: bool = False, debug: bool = False
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` on the cluster ``options`` name, closed on exit.

    Parameters
    ----------
    options : ClusterOptions
    memory_limit : int, optional
        Bytes: each embedded worker's ``memory_limit`` (:meth:`dconv.plan.JobPlan.worker_memory`,
        ``limit = (task bound + baseline + headroom) / pause fraction``). Default: Dask's
        ("auto", the machine's memory shared among the workers). An existing
        cluster's workers keep their own.
    quiet : bool
        Do not print the cluster line and the dashboard link.
    debug : bool
        Show the embedded cluster's logs.

    The embedded cluster's own logs are silenced (a failed task reaches the
    caller as its exception) unless ``debug``; its workers never receive
    SIGINT or SIGTERM (:func:`withheld_from_new_processes`).

    Raises
    ------
    InputError
        No scheduler answers at ``options.scheduler``, or at the address in
        ``options.scheduler_file``, within ``connect_timeout``; the scheduler
        file does not appear within that time, or cannot be read.
    """
    if options.embedded:
        with _local_client(options, memory_limit, quiet, debug) as client:
            yield client
    else:
        with _existing_client(options, quiet) as client:
            yield client


@contextlib.contextmanager
def _local_client(
    options: ClusterOptions, memory_limit: int | None, quiet: bool, debug: bool
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on a new embedded cluster: one single-threaded worker process per core (or ``options.workers``)."""
    import dask
    import distributed

    n_workers, blas_threads = local_cluster_layout(options.workers)
    env = {name: str(blas_threads) for name in BLAS_THREAD_VARIABLES}
    profiler = {} if PROFILE_VARIABLE in os.environ else {"distributed.worker.profile.enabled": False}
    with contextlib.ExitStack() as stack:
        # A Ctrl-C meanwhile is raised here, and the cluster closed. The nannies hand this
        # process's Dask config (the profiler's setting) to the workers they start.
        with withheld_from_new_processes(), dask.config.set(profiler), worker_malloc_environment(WORKER_MALLOC_ENV), \
                main_module_withheld():
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    worker_dashboard_address=None,  # no worker dashboard: its bokeh import costs each worker start
                    silence_logs=logging.DEBUG if debug else logging.CRITICAL,
                    env=env,
                    memory_limit="auto" if memory_limit is None else memory_limit,
                )
            )
        client = stack.enter_context(distributed.Client(cluster))
        client.run(importlib.import_module, "dconv.graph")  # workers import dconv and zarr now, in parallel
        if not quiet:
            limit = "" if memory_limit is None else f", memory limit {format_bytes(memory_limit)} each"
            print(
                f"dconv: local cluster, {n_workers} worker{'s' if n_workers != 1 else ''} x 1 thread x "
                f"{blas_threads} BLAS thread{'s' if blas_threads != 1 else ''}{limit}; "
                f"dashboard {client.dashboard_link}",
                file=sys.stderr,
            )
        yield client


@contextlib.contextmanager
def _existing_client(options: ClusterOptions, quiet: bool) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on the cluster at ``options.scheduler``, or at the address in ``options.scheduler_file``."""
    import distributed

    security = options.security()
    if options.scheduler is not None:
        address, where, reach = options.scheduler, f"at {options.scheduler!r}", {"address": options.scheduler}
    else:
        address = read_scheduler_file(options.scheduler_file, options.connect_timeout)
        where = f"at {address!r} (from scheduler_file {options.scheduler_file!r})"
        reach = {"scheduler_file": options.scheduler_file}
    if address.startswith("tls://") and security is None:
        raise InputError(f"scheduler {address!r} uses TLS; give tls_ca_file, tls_cert and tls_key.")
    try:
        client = distributed.Client(**reach, timeout=options.connect_timeout, security=security)
    except TimeoutError as e:
        raise InputError(
            f"no Dask scheduler answered {where} within {options.connect_timeout:g} s (connect_timeout)."
        ) from e
    except (OSError, ValueError) as e:  # ValueError: an address distributed cannot parse
        raise InputError(f"could not connect to a Dask scheduler {where}: {e}") from e
    with client:
        if not quiet:
            source = "" if options.scheduler is not None else f" (from {options.scheduler_file})"
            print(f"dconv: scheduler {address}{source}, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client


SCHEDULER_FILE = 'a Dask scheduler file (JSON with an "address", as dask scheduler --scheduler-file writes)'


def read_scheduler_file(path: str, timeout: float) -> str:
    """The scheduler address in a Dask scheduler file, waiting up to ``timeout`` seconds for it to be written.

    A scheduler writes its file as it starts, so a job started right after it
    may look first (distributed itself would wait for the file without limit).
    A relative ``path`` is relative to the directory dconv runs in.

    Raises
    ------
    InputError
        The file does not appear, or hold an address, within ``timeout``; or it cannot be read.
    """
    deadline = time.monotonic() + timeout
    while True:
        address = _address_in(path)
        if address is not None:
            return address
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    shown = repr(path) if os.path.isabs(path) else f"{path!r} (in {os.getcwd()})"
    if not os.path.exists(path):
        raise InputError(f"scheduler_file must name {SCHEDULER_FILE}; {shown} did not appear within {timeout:g} s.")
    raise InputError(f"scheduler_file must name {SCHEDULER_FILE}; {shown} holds no address.")


def _address_in(path: str) -> str | None:
    """The ``address`` in scheduler file ``path``; None if it does not exist yet or is not (yet) complete JSON with one."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"scheduler_file must name {SCHEDULER_FILE}; cannot read {path!r}: {e}") from e
    address = document.get("address") if isinstance(document, dict) else None
    return address if isinstance(address, str) and address else None

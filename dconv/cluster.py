"""Where a job runs: the embedded local cluster, or an existing Dask cluster.

The embedded default is a ``distributed.LocalCluster`` bound to 127.0.0.1 with
one single-threaded worker process per core, and BLAS threads set so that
workers x threads x BLAS threads = cores. ``--scheduler ADDRESS`` connects to
a cluster someone else started (``dask scheduler`` / ``dask worker``,
dask-jobqueue, dask-kubernetes, ...); its workers keep their own settings.

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
import importlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

from dconv.errors import InputError
from dconv.options import Options, any_string, option, optional, positive_int, whole_number

__all__ = ["ClusterOptions", "connect", "BLAS_THREAD_VARIABLES", "WORKER_BLOCKED_SIGNALS"]

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

WORKER_BLOCKED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals the embedded cluster's worker processes never receive: the client handles them."""


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterOptions(Options):
    """How to reach workers.

    Attributes
    ----------
    workers : int or None
        Worker processes of the embedded local cluster; default one per core.
    scheduler : str or None
        Address of an existing scheduler (``tcp://host:8786``, ``tls://...``);
        None starts the embedded local cluster.
    tls_ca_file, tls_cert, tls_key : str or None
        TLS material for a ``tls://`` scheduler.
    connect_timeout : float
        Seconds to wait for an existing scheduler before giving up.
    """

    workers: int | None = option(
        None,
        help="worker processes of the local cluster (default: one per core)",
        parse=optional(whole_number("workers", 1)),
        table="cluster",
        toml=(int,),
        cli=positive_int,
        metavar="N",
        excludes="scheduler",
    )
    scheduler: str | None = option(
        None,
        help="an existing Dask scheduler, e.g. tcp://host:8786",
        parse=optional(any_string("scheduler")),
        table="cluster",
        toml=(str,),
        cli=str,
        metavar="ADDRESS",
        excludes="workers",
    )
    tls_ca_file: str | None = option(
        None, help="CA certificate for a tls:// scheduler", parse=optional(any_string("tls_ca_file")),
        table="cluster", toml=(str,), cli=str, metavar="PATH",
    )
    tls_cert: str | None = option(
        None, help="client certificate for a tls:// scheduler", parse=optional(any_string("tls_cert")),
        table="cluster", toml=(str,), cli=str, metavar="PATH",
    )
    tls_key: str | None = option(
        None, help="client private key for a tls:// scheduler", parse=optional(any_string("tls_key")),
        table="cluster", toml=(str,), cli=str, metavar="PATH",
    )
    connect_timeout: float = 10.0

    def check(self) -> None:
        if self.scheduler is not None and self.workers is not None:
            raise InputError("give either workers (a local cluster) or scheduler (an existing one), not both.")

    def check_simd(self, word: str | None) -> str:
        """Refuse a ``DCONV_SIMD`` word before any worker starts, as far as that can be known here.

        An unknown word always; a level this CPU lacks when the workers run here
        (the embedded local cluster). An existing cluster's workers are asked
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
        if self.scheduler is None:
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


def local_cluster_layout(workers: int | None) -> tuple[int, int]:
    """``(n_workers, blas_threads)`` so that workers x 1 thread x BLAS threads = cores."""
    cores = available_cores()
    n_workers = workers or cores
    return n_workers, max(1, cores // n_workers)


@contextlib.contextmanager
def connect(
    options: ClusterOptions, *, quiet: bool = False, debug: bool = False
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` on the cluster ``options`` name, closed on exit.

    The embedded cluster's own logs are silenced (a failed task reaches the
    caller as its exception) unless ``debug``; its workers never receive
    SIGINT or SIGTERM (:func:`withheld_from_new_processes`).

    Raises
    ------
    InputError
        No scheduler answers at ``options.scheduler`` within ``connect_timeout``.
    """
    import distributed

    if options.scheduler is None:
        n_workers, blas_threads = local_cluster_layout(options.workers)
        env = {name: str(blas_threads) for name in BLAS_THREAD_VARIABLES}
        with contextlib.ExitStack() as stack:
            with withheld_from_new_processes():  # a Ctrl-C meanwhile is raised here, and the cluster closed
                cluster = stack.enter_context(
                    distributed.LocalCluster(
                        n_workers=n_workers,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address="127.0.0.1:0",
                        worker_dashboard_address="127.0.0.1:0",
                        silence_logs=logging.DEBUG if debug else logging.CRITICAL,
                        env=env,
                    )
                )
            client = stack.enter_context(distributed.Client(cluster))
            client.run(importlib.import_module, "dconv.graph")  # workers import dconv and zarr now, in parallel
            if not quiet:
                print(
                    f"dconv: local cluster, {n_workers} worker{'s' if n_workers != 1 else ''} x 1 thread x "
                    f"{blas_threads} BLAS thread{'s' if blas_threads != 1 else ''}; "
                    f"dashboard {client.dashboard_link}",
                    file=sys.stderr,
                )
            yield client
        return

    security = options.security()
    if options.scheduler.startswith("tls://") and security is None:
        raise InputError(
            f"scheduler {options.scheduler!r} uses TLS; give tls_ca_file, tls_cert and tls_key."
        )
    try:
        client = distributed.Client(options.scheduler, timeout=options.connect_timeout, security=security)
    except TimeoutError as e:
        raise InputError(
            f"no Dask scheduler answered at {options.scheduler!r} within {options.connect_timeout:g} s."
        ) from e
    except OSError as e:
        raise InputError(f"could not connect to a Dask scheduler at {options.scheduler!r}: {e}") from e
    with client:
        if not quiet:
            print(f"dconv: scheduler {options.scheduler}, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client

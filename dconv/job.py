"""``backward_job``: plan, then run the graph on a cluster and record the result.

A job has two phases. :func:`dconv.plan.plan_job` reads only metadata (and
``W``) and raises :class:`~dconv.errors.InputError` for anything wrong, before a
byte of output is written. :func:`run_job` checks that every worker runs the
job's SIMD level (:func:`check_simd`), creates or resumes the output, computes
the graph in one pass, and marks the output "complete" last.

While it runs, a job holds the lease on its output (:mod:`dconv.store.lease`),
taken before the output is created, opened or overwritten and removed at the end,
whatever the end: a second job on the same output is refused. A job whose lease
another job took over stops with :class:`~dconv.errors.LeaseLost` and writes
nothing more.

A job stopped by Ctrl-C (SIGINT) or SIGTERM marks its output "interrupted", with
the signal and the time, and raises :class:`~dconv.errors.JobInterrupted`;
any other error marks it "failed", with the reason. Resuming an output that is
already complete returns its stored result at once, without a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from dconv.cluster import (
    LOCAL_SCHEDULERS,
    ClusterOptions,
    FittingWorkers,
    available_cores,
    check_machine_memory,
    check_workers,
    connect,
    local_cluster_layout,
    wait_for_workers,
)
from dconv.errors import InputError, JobInterrupted, NonFiniteInput, SimdLevelError
from dconv.workers import cluster_workers
from dconv.graph import aggregate
from dconv.model import ModelPlan, ModelResult, is_model_group, plan_model
from dconv.options import JobOptions
from dconv.plan import JobPlan, plan_job
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import level_report, resolve_level
from dconv.store import InputGroup, format_levels, now
from dconv.store.lease import Lease, hold
from dconv.store.model_output import model_figures
from dconv.store.output import level_counts
from dconv.store.summary import nonfinite_advice, resume_command
from dconv.waves import compute_with_progress

__all__ = ["backward_job", "plan_backward", "run_job", "describe_job", "check_simd", "JobResult", "LOCAL_SCHEDULERS"]


@dataclass(frozen=True)
class JobResult:
    """What a finished job returns.

    Every finished value of the output layout is an attribute: ``result.dW``
    (fh, fw, C_prev, C) and ``result.db`` (1, 1, 1, C) in the job's dtype, and
    ``result.nonfinite``, the count of NaN and Inf values in each of
    ``dA_prev``, ``dW`` and ``db``. ``dA_prev`` is in the output group. With
    ``stats=True``, ``result.stats`` holds the gradient figures (the noise
    scale, the top samples: :func:`dconv.statistics.noise_figures`), and
    ``result.values["stats/dW_sq"]`` and ``["stats/db_sq"]`` the float64 sums;
    each sample's ``|g_i|^2`` is in the output group, ``stats/sample_grad_norm2``.

    Attributes
    ----------
    values : dict
        The finished values by name (:func:`dconv.graph.aggregate`).
    out : str
        The output group (without credentials).
    n_chunks, computed_chunks : int
        Batch chunks in the job, and how many this run computed (fewer on resume).
    seconds : dict
        Wall time of the run (``total``, ``compute``) and the summed task time
        of the chunks' ``read``, ``kernel`` and ``write`` steps.
    simd : dict
        ``{level: chunks}``: how many of the job's chunks ran at each SIMD
        level (chunks an earlier run finished count at the level they ran at).
    already_complete : bool
        The job was resumed on an output that was already complete: the values
        were read back from it, and nothing ran.
    """

    values: dict
    out: str
    n_chunks: int
    computed_chunks: int
    seconds: dict = field(default_factory=dict)
    simd: dict = field(default_factory=dict)
    already_complete: bool = False

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def describe(self) -> str:
        """One line: what was written, how long it took, the norms of the summed arrays, the SIMD levels."""
        norms = ", ".join(
            f"|{name}| = {float(np.sqrt((np.asarray(value, dtype=np.float64) ** 2).sum())):.6g}"
            for name, value in self.values.items()
            if name in ("dW", "db")
        )
        if isinstance(self.values.get("stats"), Mapping):
            noise = self.values["stats"].get("noise_scale")
            norms += f", noise scale {'undefined' if noise is None else f'{noise:.6g}'}"
        if self.already_complete:
            return (
                f"dconv: {self.out} is already complete, nothing to do ({self.computed_chunks} of {self.n_chunks} "
                f"chunks computed); {norms}; SIMD {format_levels(self.simd)}"
            )
        return (
            f"dconv: wrote {self.out}: {self.computed_chunks} of {self.n_chunks} chunks computed in "
            f"{self.seconds['total']:.2f} s (kernel {self.seconds.get('kernel', 0.0):.2f} s summed over tasks); "
            f"{norms}; SIMD {format_levels(self.simd)}"
        )


def check_simd(word: str, client: Any = None) -> dict[str, str]:
    """Refuse a ``DCONV_SIMD`` word that a process which would run the job's chunks cannot run.

    With a distributed ``client``, every worker answers
    :func:`dconv.simd.level_report` (``client.run``); without one, this process
    resolves the word.

    Returns
    -------
    dict
        Worker address (``"local"`` for this process) -> the level it will run at.

    Raises
    ------
    SimdLevelError
        One line naming each worker that cannot run ``word``, and what it runs.
    """
    if client is None:
        return {"local": resolve_level(word)}
    reports = client.run(level_report, word)
    refused = [
        f"worker {address} cannot run it (it runs {', '.join(report['runs'])})"
        for address, report in sorted(reports.items())
        if report["level"] is None
    ]
    if refused:
        raise SimdLevelError(f"{SIMD_ENV_VAR}={word}: " + "; ".join(refused) + "; no task was started.")
    return {address: report["level"] for address, report in reports.items()}


def _run(
    plan: JobPlan | ModelPlan,
    *,
    client: Any,
    scheduler: str | None,
    progress: bool,
    where: Mapping[str, Any],
    lease: Lease,
    workers: Callable[[], Any] | None = None,
) -> JobResult | ModelResult:
    """Open the output, compute the graph, finish the output, while ``lease`` is held.

    A model job (:class:`~dconv.model.ModelPlan`) opens its root, then each layer's
    output; the layers already complete are read back, the others' graphs are
    computed together (:func:`dconv.waves.compute_graphs_in_waves`) and each is
    finished as its own job would be; then the model's results are written.

    ``workers`` is called before each submission to a cluster: the workers
    its tasks must go to, or None for any (:class:`dconv.cluster.FittingWorkers`).

    The status is "interrupted" if Ctrl-C or SIGTERM stops it (then
    :class:`JobInterrupted` is raised), "failed" if anything else raises;
    untouched if the lease was lost (then :class:`LeaseLost` is raised): the
    output is another job's. A task's :class:`InputError` (``check_finite``)
    names the command that resumes the job once the input is mended.

    ``where`` is the cluster the job runs on, as the output records it for its
    resume command (:meth:`ClusterOptions.to_dict`).
    """
    t0 = time.perf_counter()
    model = isinstance(plan, ModelPlan)
    layers = plan.plans if model else (plan,)
    results: dict[int, JobResult] = {}
    running, finished = _open_outputs(plan, layers, where, results)
    try:
        pending = {i: int((~finished[i]).sum()) for i in running}
        graphs = [
            layers[i].graph(stored=layers[i].out.frontier() if pending[i] < finished[i].size else None)
            for i in running
        ]
        t1 = time.perf_counter()

        def finish(g: int, total: Any) -> None:  # as soon as a layer's tree is done: it never runs again
            i = running[g]
            lease.check()
            results[i] = _finish(layers[i], total, pending[i], time.perf_counter() - t1, t0)

        compute_with_progress(
            graphs, [layers[i].out.url for i in running], sum(pending.values()), client=client, scheduler=scheduler,
            show=progress and sum(pending.values()) > 0, workers=workers, finished=finish,
        )
        t2 = time.perf_counter()
        if model:
            return _finish_model(plan, [results[i] for i in range(len(layers))], t2 - t1, t0, lease)
        return results[0]
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (JobInterrupted, raised by _signals_interrupt), a lost lease
        lease.check()
        raise _interrupted(plan, getattr(e, "signal", "SIGINT"), where) from e
    except NonFiniteInput as e:  # a task refused its input (check_finite): mend it, then resume
        if lease.lost is None:
            with contextlib.suppress(Exception):
                plan.mark_failed(e)
        command = resume_command(plan.out.location, {"input": plan.input_location, "cluster": where})
        raise type(e)(f"{e}; once the input is mended, resume with: {command}" if command else str(e)) from e
    except BaseException as e:
        if lease.lost is None:
            with contextlib.suppress(Exception):
                plan.mark_failed(e)
        raise


def _open_outputs(
    plan: JobPlan | ModelPlan, layers: Sequence[JobPlan], where: Mapping[str, Any], results: dict[int, JobResult]
) -> tuple[list[int], dict[int, np.ndarray]]:
    """Open the outputs (a model's root first): the layers to run and the masks of their finished chunks.

    The layers of a model already complete are read back into ``results``. An output that
    may not be opened (another job's) is left as it is; a model's root is then marked failed.
    """
    if not isinstance(plan, ModelPlan):
        return [0], {0: plan.open_output(cluster=where)}
    plan.open_output(cluster=where)
    try:
        for i, layer in enumerate(layers):
            stored = _already_complete(layer)
            if stored is not None:
                results[i] = stored
        running = [i for i in range(len(layers)) if i not in results]
        return running, {i: layers[i].open_output(cluster=where) for i in running}
    except BaseException as e:
        with contextlib.suppress(Exception):
            plan.out.mark_failed(e)
        raise


def _finish(plan: JobPlan, total: Any, computed: int, compute_seconds: float, t0: float) -> JobResult:
    """Finish one job's output from its root's partial ``total``; the :class:`JobResult`."""
    values = aggregate(total, plan.out.layout)
    levels = level_counts(total.levels)
    seconds = {"compute": compute_seconds, **total.seconds}
    plan.out.finish(
        values,
        keep_partials=plan.options.keep_partials,
        finished=now(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        simd={"requested": plan.simd, "chunks": levels},
    )
    return JobResult(
        values=values,
        out=plan.out.location,
        n_chunks=len(plan.bounds),
        computed_chunks=computed,
        seconds={**seconds, "total": time.perf_counter() - t0},
        simd=levels,
    )


def _finish_model(
    plan: ModelPlan, results: Sequence[JobResult], compute_seconds: float, t0: float, lease: Lease
) -> ModelResult:
    """Write the model's results from its layers' (``stats``: the per-sample norms and figures); mark it complete."""
    layers = dict(zip(plan.names, results))
    stats = None
    if plan.options.dot is not None:
        plan.out.write_sample_dots([layer.out.url for layer in plan.plans], plan.m)
    if plan.options.stats:
        top = plan.out.write_sample_norms([layer.out.url for layer in plan.plans], plan.m)
        stats = model_figures({name: result.values["stats"] for name, result in layers.items()}, plan.m, top)
    seconds = {"compute": compute_seconds}
    for result in results:
        for step in ("read", "kernel", "write"):
            if step in result.seconds and not result.already_complete:
                seconds[step] = seconds.get(step, 0.0) + result.seconds[step]
    lease.check()
    result = ModelResult(layers=layers, out=plan.out.location, stats=stats, seconds=seconds)
    plan.out.finish(
        stats=stats,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        simd={"requested": plan.simd, "chunks": result.simd},
    )
    return dataclasses.replace(result, seconds={**seconds, "total": time.perf_counter() - t0})


def _interrupted(plan: JobPlan | ModelPlan, signal_name: str, where: Mapping[str, Any]) -> JobInterrupted:
    """Mark the output "interrupted" by ``signal_name``; the :class:`JobInterrupted` that says how to resume it.

    How far it got is counted once the cluster is closed (:func:`_count_done`),
    so that no task still running adds a chunk after the count.
    """
    with contextlib.suppress(Exception):  # the job stops either way; the store may be what failed
        plan.mark_interrupted(signal_name)
    command = resume_command(plan.out.location, {"input": plan.input_location, "cluster": where})
    return JobInterrupted(signal_name, out=plan.out.location, total=plan.n_chunks, resume_command=command)


@contextlib.contextmanager
def _count_done(plan: JobPlan | ModelPlan) -> Iterator[None]:
    """On a :class:`JobInterrupted` out of the body, count the finished chunks into it, once the body is
    left: after the embedded cluster (or an in-process scheduler) has stopped, the count is the one
    ``inspect`` gives; on a cluster that goes on, tasks that were running may still add a chunk or two."""
    try:
        yield
    except JobInterrupted as e:
        if e.out is not None and e.done is None:
            with contextlib.suppress(Exception):
                e.done = plan.done_chunks()
        raise


@contextlib.contextmanager
def _held(plan: JobPlan | ModelPlan, say: Callable[[str], None]) -> Iterator[Lease]:
    """Hold the lease on the plan's output (:func:`dconv.store.lease.hold`) while the block runs.

    Raises
    ------
    InputError
        Another job holds a fresh lease on it.
    LeaseLost
        Another job took the lease over while the block ran (the renewal interrupted it).
    """
    with hold(plan.out.url, plan.out.storage_options, plan.options.lease_timeout, say) as lease:
        try:
            yield lease
        except KeyboardInterrupt:
            lease.check()
            raise


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While a job runs, SIGTERM stops it as Ctrl-C does: it raises :class:`JobInterrupted` in the main thread.

    Only where SIGTERM still has its default action (which ends the process
    without a word, leaving the output "running"), and only in the main thread,
    the only one that can set a handler; the default comes back afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise JobInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _already_complete(plan: JobPlan | ModelPlan) -> JobResult | ModelResult | None:
    """With ``resume``, an output of this very job that is already complete: its stored result; else None."""
    if not plan.options.resume:
        return None
    if isinstance(plan, ModelPlan):
        return _model_already_complete(plan)
    t0 = time.perf_counter()
    stored = plan.out.provenance()
    if not stored or stored.get("status") != "complete" or plan.resume_differences(stored):
        return None  # nothing there, unfinished, or another job's (opening it says what differs)
    return JobResult(
        values=plan.out.read_values(),
        out=plan.out.location,
        n_chunks=len(plan.bounds),
        computed_chunks=0,
        seconds={"total": time.perf_counter() - t0},
        simd=dict((stored.get("simd") or {}).get("chunks") or {}),
        already_complete=True,
    )


def _model_already_complete(plan: ModelPlan) -> ModelResult | None:
    """A complete model output of this very job: its stored results, each layer's read back; else None."""
    t0 = time.perf_counter()
    stored = plan.out.provenance()
    if not stored or stored.get("status") != "complete" or plan.resume_differences(stored):
        return None
    layers = {name: _already_complete(layer) for name, layer in zip(plan.names, plan.plans)}
    if any(result is None for result in layers.values()):
        return None  # a layer was changed since: running the job says what
    return ModelResult(
        layers=layers,
        out=plan.out.location,
        stats=stored.get("stats"),
        seconds={"total": time.perf_counter() - t0},
        already_complete=True,
    )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_job(
    plan: JobPlan | ModelPlan,
    *,
    client: Any = None,
    scheduler: str | None = None,
    cluster: ClusterOptions | None = None,
    progress: bool = False,
    quiet: bool = True,
    debug: bool = False,
    say: Callable[[str], None] = _to_stderr,
) -> JobResult | ModelResult:
    """Run a planned job (:func:`dconv.plan_job`, or a model's: :func:`dconv.plan_model`).

    On an existing cluster (``client``, or ``cluster`` with a ``scheduler`` or
    ``scheduler_file``), the job first waits until ``cluster.wait_workers``
    workers (default 1) have joined, up to ``cluster.wait_timeout`` seconds
    (default 300), saying ``dconv: waiting for workers (K of N)`` while it
    waits. Then it checks every worker's memory limit against the plan's
    (:func:`dconv.cluster.check_workers`) before a task is submitted: it
    refuses a cluster where no worker holds a task, and otherwise sends the
    tasks only to the workers that do, including those that join later.

    Parameters
    ----------
    plan : JobPlan
    client : distributed.Client, optional
        Run on this client's cluster. With it, ``cluster`` gives only the
        waiting (``ClusterOptions(wait_workers=4, wait_timeout=60)``).
    scheduler : {"threads", "synchronous"}, optional
        Run in this process on a local Dask scheduler instead of a cluster
        (as ``cluster=ClusterOptions(scheduler="threads")`` does).
    cluster : ClusterOptions, optional
        With neither ``client`` nor ``scheduler``: which cluster to start or
        reach. Default: the embedded local cluster, whose workers each get the
        plan's memory limit (:meth:`JobPlan.worker_memory`).
    progress : bool
        Show a progress bar on stderr.
    quiet : bool
        Do not print the cluster's dashboard link.
    debug : bool
        Show the embedded cluster's logs.
    say : callable
        Where the plan line, the warnings and the waiting lines go, one line
        each (default: stderr); the warnings and the waiting lines are said
        even when ``quiet`` (a silent wait would look like a hang).

    Returns
    -------
    JobResult
        With ``plan.options.resume`` and an output of this job that is already
        complete: its stored values, read back at once (no cluster starts;
        ``already_complete`` is True, ``computed_chunks`` 0).

    Raises
    ------
    InputError
        ``scheduler`` is not a local scheduler, or is given with ``client``
        or with a cluster; ``client`` is given with a cluster to reach; the
        embedded cluster's workers would need more memory together than the
        machine has (:func:`dconv.cluster.check_machine_memory`), refused before
        it starts; an existing cluster's workers did not join within
        ``wait_timeout``, or none of them holds a task.
    SimdLevelError
        A worker (or this process, for a local scheduler or cluster) cannot run
        the job's SIMD level; nothing is written.
    InputError
        Another job holds the lease on the output (:mod:`dconv.store.lease`).
    JobInterrupted
        Ctrl-C (SIGINT) or, run from the main thread, SIGTERM stopped the job;
        its output, if opened, is marked "interrupted".
    LeaseLost
        Another job took over the lease on the output while this one ran; this
        one stopped and left the output to it.
    """
    cluster = cluster or ClusterOptions()
    scheduler = _local_scheduler(scheduler, client, cluster)
    stored = _already_complete(plan)
    if stored is not None:
        for line in nonfinite_warnings(plan, stored):
            say(line)
        return stored
    with _signals_interrupt(), _held(plan, say) as lease, _count_done(plan):
        result = _run_on(plan, client, scheduler, cluster, progress, quiet, debug, say, lease)
    for line in nonfinite_warnings(plan, result):
        say(line)
    return result


def _run_on(
    plan: JobPlan | ModelPlan,
    client: Any,
    scheduler: str | None,
    cluster: ClusterOptions,
    progress: bool,
    quiet: bool,
    debug: bool,
    say: Callable[[str], None],
    lease: Lease,
) -> JobResult:
    """:func:`run_job` on its local scheduler, its client's cluster, or the cluster ``cluster`` names."""
    if scheduler is not None:
        check_simd(plan.simd)
        _announce(plan, 1, _local_threads(scheduler), available_cores(), quiet, say)
        where = {"scheduler": scheduler}
        return _run(plan, client=None, scheduler=scheduler, progress=progress, where=where, lease=lease)
    if client is not None:
        workers = _existing_workers(plan, client, cluster, quiet, say)
        where = _client_place(client)
        return _run(plan, client=client, scheduler=None, progress=progress, where=where, lease=lease, workers=workers)
    cluster.check_simd(plan.simd)
    memory_limit = None
    if cluster.embedded:  # its layout and memory are known before it starts
        n_workers, memory = local_cluster_layout(cluster.workers)[0], plan.worker_memory()
        check_machine_memory(n_workers, memory)
        memory_limit = memory.limit
        _announce(plan, n_workers, 1, available_cores(), quiet, say)
    with connect(cluster, memory_limit=memory_limit, quiet=quiet, debug=debug) as new_client:
        workers = None if cluster.embedded else _existing_workers(plan, new_client, cluster, quiet, say)
        where = cluster.recorded_place()
        return _run(
            plan, client=new_client, scheduler=None, progress=progress, where=where, lease=lease, workers=workers
        )


def _client_place(client: Any) -> dict[str, str]:
    """Where a job on a caller's client runs, for its resume command: the scheduler's address if it is
    one another process can reach (``tcp://``, ``tls://``), else nothing (the command then starts the
    embedded cluster)."""
    address = str(getattr(client.scheduler, "address", "") or "")
    return {"scheduler": address} if address.startswith(("tcp://", "tls://")) else {}


def nonfinite_warnings(plan: JobPlan | ModelPlan, result: JobResult | ModelResult) -> list[str]:
    """One line if the job's dW or db holds NaN or Inf and ``check_finite`` did not look (its inputs hold some);
    for a model job, one per layer, naming it."""
    if isinstance(plan, ModelPlan):
        return [
            line.replace("dconv: warning: ", f"dconv: warning: layer {name}: ", 1)
            for name, layer in zip(plan.names, plan.plans)
            for line in nonfinite_warnings(layer, result.layers[name])
        ]
    counts = {name: n for name, n in (result.values.get("nonfinite") or {}).items() if name in ("dW", "db") and n}
    if not counts or plan.options.check_finite:
        return []
    held = " and ".join(f"{name} {n}" for name, n in counts.items())
    return [
        f"dconv: warning: the result is not finite (NaN or Inf values: {held}), so the inputs hold some; "
        + nonfinite_advice()
    ]


def _local_scheduler(scheduler: str | None, client: Any, cluster: ClusterOptions) -> str | None:
    """The local Dask scheduler the job runs on (``scheduler``, or the one ``cluster`` names), or None.

    Raises
    ------
    InputError
        ``scheduler`` is not a local scheduler; or two places to run are given.
    """
    if scheduler is not None and scheduler not in LOCAL_SCHEDULERS:
        raise InputError(f"scheduler must be one of {LOCAL_SCHEDULERS}; got {scheduler!r} instead.")
    if scheduler is not None and client is not None:
        raise InputError("give either client or scheduler, not both.")
    placed = [name for name in ("workers", "scheduler", "scheduler_file") if getattr(cluster, name) is not None]
    if placed and (client is not None or scheduler is not None):
        given = "client" if client is not None else "scheduler"
        raise InputError(f"give either {given} or a cluster with {' and '.join(placed)}, not both.")
    local = scheduler or cluster.local
    waits = [spec.name for spec in dataclasses.fields(cluster)
             if spec.name in ("wait_workers", "wait_timeout") and getattr(cluster, spec.name) != spec.default]
    if waits and client is None and (local is not None or cluster.embedded):
        raise InputError(
            f"{' and '.join(waits)} wait for the workers of an existing cluster (scheduler, scheduler_file or "
            "client); the embedded cluster and the local schedulers start their own."
        )
    return local


def _local_threads(scheduler: str) -> int:
    """Threads a local Dask scheduler runs tasks on."""
    return 1 if scheduler == "synchronous" else available_cores()


def _existing_workers(
    plan: JobPlan | ModelPlan, client: Any, cluster: ClusterOptions, quiet: bool, say: Callable[[str], None]
) -> FittingWorkers:
    """Wait for an existing cluster's workers, check them, say the plan and the warnings.

    Returns the :class:`~dconv.cluster.FittingWorkers` that restricts each submission
    to the workers that hold a task.
    """
    wait_for_workers(client, cluster.wait_workers, cluster.wait_timeout, say)
    check_simd(plan.simd, client)  # refused before the plan is said
    memory = plan.worker_memory()
    fit = check_workers(cluster_workers(client), memory)
    _announce(plan, len(fit.fitting), fit.threads, None, quiet, say)
    for line in fit.warnings:
        say(line)
    return FittingWorkers(client, memory, fit.fitting)


def _announce(
    plan: JobPlan | ModelPlan, n_workers: int, threads: int, cores: int | None, quiet: bool, say: Callable[[str], None]
) -> None:
    """The plan in one line (unless ``quiet``), then its warnings, one line each (always)."""
    if not quiet:
        say(plan.announce(n_workers, threads))
    for line in plan.warnings(n_workers, threads, cores):
        say(line)


def describe_job(plan: JobPlan | ModelPlan, cluster: ClusterOptions | None = None) -> str:
    """What ``--dry-run`` prints: :meth:`JobPlan.describe`, the workers' memory limit
    (:meth:`JobPlan.worker_memory`) and what to give a remote cluster's workers, then the plan
    line and the warnings for the embedded local cluster ``cluster`` describes (for an
    existing cluster, whose workers are not known before it is reached, the warnings about
    the plan alone).

    Raises
    ------
    InputError
        For the embedded cluster: its workers' memory limits add up to more than the
        machine's memory (:func:`dconv.cluster.check_machine_memory`), as :func:`run_job`
        would refuse them.
    """
    cluster = cluster or ClusterOptions()
    memory = plan.worker_memory()
    advice = f"give each worker --nthreads 1 --memory-limit {memory.flag}"
    if cluster.local is not None:
        threads = _local_threads(cluster.local)
        lines = [plan.announce(1, threads), *plan.warnings(1, threads, available_cores())]
    elif cluster.embedded:
        n_workers, threads, cores = local_cluster_layout(cluster.workers)[0], 1, available_cores()
        check_machine_memory(n_workers, memory)
        workers = f"workers {n_workers} x memory limit {memory.describe()}; on another cluster, {advice}"
        lines = [workers, plan.announce(n_workers, threads), *plan.warnings(n_workers, threads, cores)]
    else:
        lines = [f"workers {advice} ({memory.formula()})", *plan.warnings(1, 1, None)]
    return "\n".join([plan.describe(), *lines])


def plan_backward(
    inputs: Any, out: str | PathLike, options: JobOptions | None = None, *,
    storage_options: Mapping[str, Any] | None = None, **values: Any,
) -> JobPlan | ModelPlan:
    """:func:`dconv.model.plan_model` for a model input group, else :func:`dconv.plan.plan_job`."""
    if isinstance(inputs, (str, PathLike)) and is_model_group(str(inputs), storage_options):
        return plan_model(inputs, out, options, storage_options=storage_options, **values)
    return plan_job(inputs, out, options, storage_options=storage_options, **values)


def backward_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    client: Any = None,
    scheduler: str | None = None,
    cluster: ClusterOptions | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    quiet: bool = True,
    **values: Any,
) -> JobResult | ModelResult:
    """Compute dA_prev, dW and db for a whole batch, chunk by chunk, on Dask; of every layer of a model.

    ``backward_job(inputs, out, **values)`` is ``run_job(plan_backward(inputs, out,
    **values), ...)``.

    Parameters
    ----------
    inputs : str, path, InputGroup or mapping
        A Zarr v3 input group (local path or fsspec URL) with ``A_prev``
        (m, H, W, C_prev), ``dZ`` (m, n_H, n_W, C) and ``W`` (fh, fw, C_prev, C);
        or a mapping with those keys holding NumPy or Dask arrays; or a model
        input group (:mod:`dconv.store.model`): every layer (``layers=[...]``:
        those named) in one job, each layer's output at ``out/layers/<name>``.
    out : str or path
        Where the output group goes (local path or fsspec URL).
    options : JobOptions, optional
        How the job computes. Any of its fields may also be given as a keyword
        (``batch_chunk=256``, ``stride=2``, ``max_memory="512MiB"``,
        ``split_every=8``, ``overwrite=True``, ``resume=True``,
        ``check_finite=True``, ``simd="avx2"``, ...); see :class:`JobOptions`.
    client, scheduler, cluster, progress, quiet
        Where and how to run: see :func:`run_job`.
    storage_options : dict, optional
        fsspec options for ``inputs`` and ``out`` (never recorded).

    Returns
    -------
    JobResult, or ModelResult for a model input group
    """
    plan = plan_backward(inputs, out, options, storage_options=storage_options, **values)
    return run_job(plan, client=client, scheduler=scheduler, cluster=cluster, progress=progress, quiet=quiet)

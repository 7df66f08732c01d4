"""A cluster that is ready, and fits: waiting for an existing cluster's workers, and checking them against the plan.

One real `dask scheduler --scheduler-file F` (no worker of its own) serves every test here; each test
starts the `dask worker` processes it needs, on 127.0.0.1, and kills them after. Which worker ran each
chunk is read from the scheduler's task stream (``distributed.get_task_stream``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import textwrap
import threading
import time
from typing import Any, Iterator

import dask.array as da
import numpy as np
import pytest
from dask.utils import format_bytes

import dconv
from dconv.cluster import ClusterOptions, check_workers, read_scheduler_file
from dconv.sizing import worker_memory
from dconv.graph import CHUNK_PREFIX

from _pipeline import read_inputs, read_output
from conftest import _stop, dask_command, free_port, wait_until
from test_deploy import assert_equal_outputs, dconv_cli

distributed = pytest.importorskip("distributed")

SMALL, BIG = "150MiB", "400MiB"
"""Worker memory limits below and above what the test job's plan needs of a worker of one thread
(about 201 MiB: the baseline and headroom, its tasks are tiny)."""

NO_PAUSE = {f"DASK_DISTRIBUTED__WORKER__MEMORY__{key}": "False" for key in ("TARGET", "SPILL", "PAUSE", "TERMINATE")}
"""A worker's memory limit is only reported: a small worker keeps running tasks (as it would, for a while)."""


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[dict]:
    """A `dask scheduler --scheduler-file F` with no workers, and a client on it (for the task stream)."""
    folder = tmp_path_factory.mktemp("workers")
    path = folder / "scheduler.json"
    command = ["scheduler", "--scheduler-file", path, "--host", "127.0.0.1", "--port", free_port(),
               "--dashboard-address", "127.0.0.1:0"]
    with open(folder / "scheduler.log", "w") as log:
        process = subprocess.Popen(dask_command() + [str(a) for a in command], stdout=log, stderr=subprocess.STDOUT)
    try:
        address = read_scheduler_file(str(path), timeout=60)
        with distributed.Client(address, timeout=30) as client:
            yield {"file": path, "address": address, "client": client, "logs": folder}
    finally:
        _stop([process])


def start_worker(scheduler: dict, limit: str, threads: int) -> subprocess.Popen:
    """A `dask worker --scheduler-file F --memory-limit LIMIT --nthreads THREADS` process."""
    name = f"w-{limit}-{free_port()}"
    command = ["worker", "--scheduler-file", scheduler["file"], "--host", "127.0.0.1", "--nthreads", threads,
               "--memory-limit", limit, "--no-nanny", "--dashboard-address", "127.0.0.1:0", "--name", name]
    with open(scheduler["logs"] / f"{name}.log", "w") as log:
        return subprocess.Popen(dask_command() + [str(a) for a in command], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **NO_PAUSE})


@contextlib.contextmanager
def workers(scheduler: dict, *limits: str, threads: int = 1, delay: float = 0) -> Iterator[None]:
    """`dask worker` processes with these ``--memory-limit`` values, killed after (until the scheduler has none).

    Without ``delay``, yields once they have joined; with it, at once, and they start ``delay`` seconds later.
    """
    client, processes = scheduler["client"], []
    before = len(client.scheduler_info()["workers"])
    timer = threading.Timer(delay, lambda: processes.extend(start_worker(scheduler, size, threads) for size in limits))
    timer.start()
    try:
        if not delay:
            timer.join()
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) >= before + len(limits), 60)
        yield
    finally:
        timer.join()
        for process in processes:
            process.kill()
            process.wait()
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == before, 30)


def address_of(scheduler: dict, limit: int | None) -> str:
    """The address of the (only) worker with this memory limit in bytes (None: no limit)."""
    found = [address for address, info in scheduler["client"].scheduler_info()["workers"].items()
             if (info["memory_limit"] or None) == limit]
    assert len(found) == 1, found
    return found[0]


def chunk_workers(stream: Any) -> list[str]:
    """The worker that ran each chunk task in a task stream."""
    records = stream.data if hasattr(stream, "data") else stream
    return [record["worker"] for record in records if CHUNK_PREFIX in str(record["key"])]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """A small input group, the job's arguments, and its output computed with scheduler="synchronous"."""
    folder = tmp_path_factory.mktemp("job")
    inp = dconv.make_inputs(str(folder / "in.zarr"), m=24, height=6, width=5, in_channels=3, out_channels=4,
                            chunk=4, dtype="float64", padding=1, seed=22)
    options = {"batch_chunk": 4, "split_every": 2}
    dconv.backward_job(inp, folder / "sync.zarr", scheduler="synchronous", **options)
    plan = dconv.plan_job(inp, folder / "never.zarr", **options)
    flags = ["--batch-chunk", 4, "--split-every", 2]
    return {"input": inp, "options": options, "flags": flags, "memory": plan.worker_memory(),
            "expected": read_output(folder / "sync.zarr")}


# --------------------------------------------------------------------------- waiting for workers


@pytest.mark.cluster
def test_jobs_wait_for_the_first_worker_then_run(scheduler, job, forked_dconv, tmp_path, capsys):
    """The scheduler is up, its worker comes later (SLURM's usual order): the CLI (--scheduler-file) and
    backward_job(client=...) both say they wait, then run on it, bit for bit as the synchronous scheduler."""
    assert scheduler["client"].scheduler_info()["workers"] == {}
    cli_out, api_out = tmp_path / "cli.zarr", tmp_path / "api.zarr"
    cli = {}
    command = ["backward", job["input"], cli_out, "--scheduler-file", scheduler["file"], *job["flags"], "--quiet"]
    runner = threading.Thread(target=lambda: cli.update(result=forked_dconv.run(command, timeout=120)))
    with workers(scheduler, BIG, delay=2):
        runner.start()
        capsys.readouterr()
        result = dconv.backward_job(job["input"], api_out, client=scheduler["client"], **job["options"])
        runner.join()
    completed, api_err = cli["result"], capsys.readouterr().err
    assert completed.returncode == 0, completed.stderr
    for stderr in (completed.stderr, api_err):
        assert stderr.startswith("dconv: waiting for workers (0 of 1)\n"), stderr
    assert result.computed_chunks == 6
    assert_equal_outputs(read_output(cli_out), job["expected"])
    assert_equal_outputs(read_output(api_out), job["expected"])


@pytest.mark.cluster
def test_no_worker_within_the_wait_timeout_is_refused(scheduler, job, tmp_path, capsys):
    """`--wait-timeout 1` and no worker: exit 2, one error line naming the scheduler and the timeout; no output.
    In Python, `cluster=ClusterOptions(...)` gives the waiting of a job on a `client`."""
    out = tmp_path / "out.zarr"
    assert scheduler["client"].scheduler_info()["workers"] == {}
    code, stdout, stderr = dconv_cli(capsys, "backward", job["input"], out, "--scheduler-file", scheduler["file"],
                                     "--wait-timeout", 1, *job["flags"], "--quiet")
    assert (code, stdout) == (2, ""), stderr
    assert stderr.splitlines() == [
        "dconv: waiting for workers (0 of 1)",
        f"dconv: error: no worker joined the scheduler at {scheduler['address']} within 1 s (--wait-timeout); "
        "0 of 1 (--wait-workers) arrived.",
    ]
    assert not out.exists()
    plan = dconv.plan_job(job["input"], out, **job["options"])
    with pytest.raises(dconv.InputError, match=r"within 1 s \(wait_timeout\); 0 of 2 \(wait_workers\) arrived\.$"):
        dconv.run_job(plan, client=scheduler["client"], cluster=ClusterOptions(wait_workers=2, wait_timeout=1),
                      say=lambda line: None)
    assert not out.exists()


def test_the_plans_warnings_hold_for_a_cluster_without_workers(job, tmp_path):
    """No division by the count of workers still to come."""
    plan = dconv.plan_job(job["input"], tmp_path / "out.zarr", batch_chunk=1)
    assert plan.warnings(0, 1) == plan.warnings(1, 1)


# --------------------------------------------------------------------------- workers against the plan


def test_what_a_worker_of_several_threads_needs():
    """limit_for(T) = (baseline + T x (task + headroom)) / pause; a worker without a limit holds anything."""
    memory = worker_memory(10 * 2**20, pause=0.8)
    assert memory.limit_for(1) == memory.limit
    assert memory.limit_for(3) == -(-(memory.baseline + 3 * (memory.task + memory.headroom)) * 5 // 4)
    workers = {"tcp://a:1": {"memory_limit": None, "nthreads": 4}, "tcp://b:1": {"memory_limit": 0, "nthreads": 1}}
    fit = check_workers(workers, memory)
    assert (fit.fitting, fit.too_small, fit.threads, fit.warnings) == (("tcp://a:1", "tcp://b:1"), (), 4, ())


@pytest.mark.cluster
def test_workers_too_small_for_the_plan_are_refused_before_any_task(scheduler, job, tmp_path, capsys):
    """A worker with --memory-limit below the plan's: exit 2, one line with the --memory-limit to give; nothing ran."""
    out = tmp_path / "out.zarr"
    with workers(scheduler, SMALL), distributed.get_task_stream(scheduler["client"]) as stream:
        small = address_of(scheduler, 150 * 2**20)
        code, stdout, stderr = dconv_cli(capsys, "backward", job["input"], out, "--scheduler-file", scheduler["file"],
                                         *job["flags"], "--quiet")
    flag = job["memory"].flag
    assert (code, stdout) == (2, ""), stderr
    assert stderr.splitlines() == [
        f"dconv: error: no worker can hold a task: each needs --memory-limit {flag} (at 1 thread), the largest "
        f"has 150.00 MiB ({small}); start workers with --nthreads 1 --memory-limit {flag}, or use a smaller "
        "--batch-chunk or --max-memory."
    ]
    assert not out.exists() and stream.data == []


@pytest.mark.cluster
def test_tasks_go_only_to_the_workers_that_fit(scheduler, job, tmp_path, capsys):
    """One worker too small, one big enough: a warning naming the small one, and every chunk runs on the big one."""
    out = tmp_path / "out.zarr"
    with workers(scheduler, SMALL, BIG), distributed.get_task_stream(scheduler["client"]) as stream:
        small, big = address_of(scheduler, 150 * 2**20), address_of(scheduler, 400 * 2**20)
        code, _, stderr = dconv_cli(capsys, "backward", job["input"], out, "--scheduler", scheduler["address"],
                                    *job["flags"], "--quiet")
    assert code == 0, stderr
    assert (
        f"dconv: warning: 1 of 2 workers cannot hold a task (worker {small}: memory limit 150.00 MiB or less, "
        f"a task needs --memory-limit {job['memory'].flag} at 1 thread); the job runs on the other 1; "
    ) in stderr
    assert chunk_workers(stream) == [big] * 6
    assert_equal_outputs(read_output(out), job["expected"])


@pytest.mark.cluster
def test_a_worker_that_joins_mid_job_gets_tasks(scheduler, job, tmp_path, monkeypatch):
    """One small and one big worker; once the first chunk is done a second big worker (no memory limit) joins,
    and runs chunks of the later waves (of 2 chunks each); the small one runs none.

    A_prev is a Dask array whose blocks each take 0.2 s to make (a task of the chunk's wave), so that
    the job lasts while the worker starts.
    """
    monkeypatch.setattr(dconv.plan, "WAVE_CHUNKS", 2)
    monkeypatch.setattr(dconv.waves, "WAVE_TASKS_PER_THREAD", 1)
    options = {"batch_chunk": 1, "split_every": 2, "padding": 1}

    def slowly(block: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return block

    arrays = read_inputs(job["input"])
    inputs = {**arrays, "A_prev": da.from_array(arrays["A_prev"], chunks=(1, -1, -1, -1)).map_blocks(slowly)}
    plan = dconv.plan_job(inputs, tmp_path / "out.zarr", **options)
    client, done = scheduler["client"], {}
    with workers(scheduler, SMALL, BIG), distributed.get_task_stream(client) as stream:
        small = address_of(scheduler, 150 * 2**20)
        runner = threading.Thread(target=lambda: done.update(result=dconv.run_job(plan, client=client)))
        start = time.time()
        runner.start()
        assert wait_until(lambda: chunk_workers(client.get_task_stream(start=start)), 60)
        with workers(scheduler, "0"):
            joined = address_of(scheduler, None)
            runner.join(timeout=120)
    ran = chunk_workers(stream)
    assert done["result"].computed_chunks == 24 and len(ran) == 24
    assert small not in ran and joined in ran, ran
    expected = dconv.backward_job(job["input"], tmp_path / "sync.zarr", scheduler="synchronous", **options)
    np.testing.assert_array_equal(done["result"].dW, expected.dW)


@pytest.mark.cluster
def test_workers_of_several_threads_are_warned_with_their_memory_per_thread(scheduler, job, tmp_path):
    """2 threads and --memory-limit 240MiB: each task has 120 MiB, below what 2 at once need; the job runs."""
    said: list[str] = []
    plan = dconv.plan_job(job["input"], tmp_path / "out.zarr", **job["options"])
    with workers(scheduler, "240MiB", threads=2):
        worker = address_of(scheduler, 240 * 2**20)
        result = dconv.run_job(plan, client=scheduler["client"], say=said.append)
    memory = job["memory"]
    assert said == [
        f"dconv: warning: worker {worker} has 2 threads and memory limit 240.00 MiB: 120.00 MiB per thread, below "
        f"the {format_bytes(memory.limit_for(2) // 2)} per thread that 2 tasks at once need (--memory-limit "
        f"{-(-memory.limit_for(2) // 2**20)}MiB); start workers with --nthreads 1 --memory-limit {memory.flag}"
    ]
    np.testing.assert_array_equal(result.dW, job["expected"]["dW"])


# --------------------------------------------------------------------------- local schedulers on the command line


@pytest.mark.parametrize("name", ["threads", "synchronous"])
def test_a_local_scheduler_on_the_command_line_and_in_a_spec(name, job, tmp_path, capsys):
    """`--scheduler threads` and `[cluster] scheduler = "synchronous"` run in this process, as run_job(scheduler=)."""
    code, _, stderr = dconv_cli(capsys, "backward", job["input"], tmp_path / "cli.zarr", "--scheduler", name,
                                *job["flags"], "--quiet")
    assert code == 0, stderr
    assert_equal_outputs(read_output(tmp_path / "cli.zarr"), job["expected"])
    spec = tmp_path / "job.toml"
    spec.write_text(textwrap.dedent(f"""
        [input]
        path = "{job['input']}"
        [output]
        path = "{tmp_path / 'spec.zarr'}"
        [job]
        batch_chunk = 4
        split_every = 2
        [cluster]
        scheduler = "{name}"
    """))
    code, _, stderr = dconv_cli(capsys, "run", spec, "--quiet")
    assert code == 0, stderr
    assert_equal_outputs(read_output(tmp_path / "spec.zarr"), job["expected"])


@pytest.mark.parametrize("address, message", [
    ("bogus", "--scheduler must be a Dask scheduler address such as tcp://host:8786, or one of threads, synchronous; "
              "got 'bogus' instead."),
    ("tcp://127.0.0.1:{port}", "could not connect to a Dask scheduler at 'tcp://127.0.0.1:{port}': "),
])
def test_a_bad_scheduler_address_is_one_line_and_exit_2(address, message, job, tmp_path, capsys):
    port = free_port()
    address, message = address.format(port=port), message.format(port=port)
    code, stdout, stderr = dconv_cli(capsys, "backward", job["input"], tmp_path / "out.zarr", "--scheduler", address,
                                     "--connect-timeout", 1, "--quiet")
    assert (code, stdout) == (2, ""), stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"dconv: error: {message}"), stderr
    assert not (tmp_path / "out.zarr").exists()

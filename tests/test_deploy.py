"""Deployment: a job on a cluster reached through a scheduler file, and the workers' memory limit from the plan.

The scheduler-file cluster is Dask's HPC convention, run for real: ``dask scheduler
--scheduler-file F`` and ``dask worker --scheduler-file F`` subprocesses on 127.0.0.1.
"""

from __future__ import annotations

import logging
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from dask.utils import format_bytes

import dconv
from dconv.cli import main
from dconv.cluster import ClusterOptions, machine_memory, read_scheduler_file

from _pipeline import read_output
from conftest import dask_command, free_port


def dconv_cli(capsys, *args) -> tuple[int, str, str]:
    """``dconv ARGS`` run in this process (the CLI's own code, without an interpreter's start): exit code, stdout, stderr."""
    logger = logging.getLogger("dconv")
    level = logger.level  # main() sets it
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    finally:
        logger.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_equal_outputs(got: dict, want: dict) -> None:
    for name in ("dA_prev", "dW", "db"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """A `dask scheduler --scheduler-file F` and one `dask worker --scheduler-file F`; yields F."""
    distributed = pytest.importorskip("distributed")
    folder = tmp_path_factory.mktemp("scheduler-file")
    path = folder / "scheduler.json"
    logs = [open(folder / f"{name}.log", "w") for name in ("scheduler", "worker")]
    commands = [
        ["scheduler", "--scheduler-file", path, "--host", "127.0.0.1", "--port", free_port(),
         "--dashboard-address", "127.0.0.1:0"],
        ["worker", "--scheduler-file", path, "--nthreads", "1", "--host", "127.0.0.1", "--no-nanny",
         "--dashboard-address", "127.0.0.1:0"],
    ]
    processes = []
    try:
        for command, log in zip(commands, logs):  # the worker waits for the file the scheduler writes
            processes.append(subprocess.Popen(
                dask_command() + [str(a) for a in command], stdout=log, stderr=subprocess.STDOUT, cwd=folder
            ))
        read_scheduler_file(str(path), timeout=60)  # distributed would wait for it without limit
        with distributed.Client(scheduler_file=str(path), timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
        yield path
    finally:
        for process in reversed(processes):  # the worker first: it would wait for a scheduler that left
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
    """A small input group and the output of the same job run in process (the threads scheduler)."""
    folder = tmp_path_factory.mktemp("job")
    inp = dconv.make_inputs(str(folder / "in.zarr"), m=11, height=6, width=5, in_channels=3, out_channels=4,
                            chunk=3, dtype="float64", padding=1, seed=3)
    dconv.backward_job(inp, folder / "threads.zarr", batch_chunk=3, split_every=2, scheduler="threads")
    return {"input": inp, "expected": read_output(folder / "threads.zarr")}


@pytest.mark.cluster
def test_backward_through_a_scheduler_file(scheduler_file, job_input, tmp_path, capsys):
    """`dconv backward ... --scheduler-file F`: the job runs on F's cluster, with the in-process run's results."""
    out = tmp_path / "out.zarr"
    code, stdout, stderr = dconv_cli(capsys, "backward", job_input["input"], out, "--scheduler-file", scheduler_file,
                                     "--batch-chunk", 3, "--split-every", 2)
    assert code == 0, stderr
    assert f"(from {scheduler_file}), dashboard" in stderr
    assert "local cluster" not in stderr
    assert stdout.startswith(f"dconv: wrote {out}: 4 of 4 chunks computed")
    assert_equal_outputs(read_output(out), job_input["expected"])


@pytest.mark.cluster
def test_a_spec_names_its_scheduler_file_relative_to_where_dconv_runs(
    scheduler_file, job_input, tmp_path, capsys, monkeypatch
):
    """`[cluster] scheduler_file = "scheduler.json"`, run from the directory that holds it, as the input paths are."""
    spec = tmp_path / "job.toml"
    spec.write_text(textwrap.dedent(f"""
        [input]
        path = "{job_input['input']}"
        [output]
        path = "{tmp_path / 'out.zarr'}"
        [job]
        batch_chunk = 3
        split_every = 2
        [cluster]
        scheduler_file = "{scheduler_file.name}"
    """))
    monkeypatch.chdir(scheduler_file.parent)
    code, _, stderr = dconv_cli(capsys, "run", spec, "--quiet")
    assert code == 0, stderr
    assert_equal_outputs(read_output(tmp_path / "out.zarr"), job_input["expected"])


@pytest.mark.cluster
def test_a_scheduler_file_in_the_python_api(scheduler_file, job_input, tmp_path):
    """`ClusterOptions(scheduler_file=...)` from Python; a remote cluster gets no memory limit from dconv."""
    result = dconv.backward_job(job_input["input"], tmp_path / "out.zarr", batch_chunk=3, split_every=2,
                                cluster=ClusterOptions(scheduler_file=str(scheduler_file)))
    assert result.computed_chunks == 4
    np.testing.assert_array_equal(result.dW, job_input["expected"]["dW"])


# --------------------------------------------------------------------------- worker memory from the plan


def huge_input(path: Path, samples: int) -> str:
    """An input group of ``samples`` 16x16x8 -> 8 float32 samples whose A_prev and dZ hold no chunk: metadata only."""
    group = zarr.open_group(str(path), mode="w")
    for name, shape in (("A_prev", (samples, 16, 16, 8)), ("dZ", (samples, 16, 16, 8))):
        group.create_array(name, shape=shape, chunks=(256, *shape[1:]), dtype="float32",
                           dimension_names=("m", "h", "w", "c"))
    group.create_array("W", shape=(3, 3, 8, 8), dtype="float32")[...] = 0.5
    group.attrs["hparameters"] = {"stride": 1, "pad": 1}
    return str(path)


def test_workers_that_would_need_more_than_the_machine_are_refused_before_anything_starts(tmp_path, capsys):
    """One task of the whole batch whose bound alone exceeds the machine: exit 2, one line, no cluster, no output."""
    sample = 4 * 16 * 16 * 8 * 2  # A_prev and dZ blocks of one sample; the bound holds more
    samples = machine_memory() // sample + 256
    inp = huge_input(tmp_path / "huge.zarr", samples)
    out = tmp_path / "out.zarr"
    plan = dconv.plan_job(inp, out, batch_chunk=samples)
    assert plan.worker_memory().limit > machine_memory()
    with pytest.raises(dconv.InputError, match=r"1 worker x memory limit .* \(task bound .* pause\) = .* more "
                       r"than this machine's .*; use a smaller batch_chunk or max_memory"):
        dconv.run_job(plan, cluster=ClusterOptions(workers=1))
    code, stdout, stderr = dconv_cli(capsys, "backward", inp, out, "--batch-chunk", samples, "--workers", 2)
    assert (code, stdout) == (2, ""), stderr
    lines = stderr.strip().splitlines()  # not even the plan line: the cluster would come next
    assert len(lines) == 1 and lines[0].startswith("dconv: error: 2 workers x memory limit"), stderr
    assert "a smaller --batch-chunk or --max-memory" in lines[0]
    assert not out.exists()


def test_a_spec_that_would_make_its_input_is_refused_before_making_it(tmp_path, capsys, monkeypatch):
    """`dconv run` plans the input its `[input.make]` would write, and refuses the job before writing a byte."""
    samples = machine_memory() // (4 * 8 * 8 * 4 * 2) + 256
    (tmp_path / "job.toml").write_text(textwrap.dedent(f"""
        [input]
        path = "in.zarr"
        [input.make]
        m = {samples}
        height = 8
        width = 8
        in_channels = 4
        out_channels = 4
        [output]
        path = "out.zarr"
        [job]
        batch_chunk = {samples}
    """))
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = dconv_cli(capsys, "run", "job.toml", "--workers", 1)
    assert (code, stdout) == (2, ""), stderr
    assert stderr.startswith("dconv: error: 1 worker x memory limit") and len(stderr.splitlines()) == 1, stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["job.toml"]


def test_the_refusal_says_how_many_workers_fit(tmp_path):
    """As many workers as fit in the machine pass; one more is refused, with the number that fit."""
    plan = dconv.plan_job(huge_input(tmp_path / "big.zarr", 1 << 20), tmp_path / "out.zarr", batch_chunk=256)
    limit = plan.worker_memory().limit
    fit = machine_memory() // limit
    assert fit >= 1, (limit, machine_memory())
    dconv.describe_job(plan, ClusterOptions(workers=fit))  # fits: no error
    with pytest.raises(dconv.InputError, match=f"{fit} worker{'s' if fit > 1 else ''} fit: use fewer workers"):
        dconv.describe_job(plan, ClusterOptions(workers=fit + 1))


def test_dry_run_prints_the_memory_limit_to_give_workers(job_input, tmp_path, capsys):
    """`--dry-run` says what memory limit the embedded workers get and what to give a remote cluster's."""
    plan = dconv.plan_job(job_input["input"], tmp_path / "out.zarr", batch_chunk=3)
    memory = plan.worker_memory()
    flag = f"{-(-memory.limit // 2**20)}MiB"
    assert memory.limit == -(-(memory.task + memory.baseline + memory.headroom) // memory.pause)
    code, stdout, stderr = dconv_cli(capsys, "backward", job_input["input"], tmp_path / "out.zarr",
                                     "--batch-chunk", 3, "--workers", 2, "--dry-run")
    assert code == 0, stderr
    line = next(line for line in stdout.splitlines() if line.startswith("workers "))
    assert line == (
        f"workers 2 x memory limit {format_bytes(memory.limit)} (task bound {format_bytes(memory.task)} + baseline "
        f"{format_bytes(memory.baseline)} + headroom {format_bytes(memory.headroom)}, / {memory.pause:g} pause); "
        f"on another cluster, give each worker --nthreads 1 --memory-limit {flag}"
    )
    code, stdout, stderr = dconv_cli(capsys, "backward", job_input["input"], tmp_path / "out.zarr",
                                     "--batch-chunk", 3, "--scheduler-file", tmp_path / "nothing.json", "--dry-run")
    assert code == 0, stderr
    assert f"workers give each worker --nthreads 1 --memory-limit {flag} (task bound " in stdout


@pytest.mark.cluster
def test_the_embedded_cluster_gives_its_workers_the_plans_memory_limit(job_input, tmp_path, capsys):
    """run_job starts the embedded cluster with each worker's memory_limit from the plan."""
    plan = dconv.plan_job(job_input["input"], tmp_path / "out.zarr", batch_chunk=3, split_every=2)
    limit = plan.worker_memory().limit
    result = dconv.run_job(plan, cluster=ClusterOptions(workers=1), quiet=False, say=lambda line: None)
    assert f"memory limit {format_bytes(limit)} each" in capsys.readouterr().err
    np.testing.assert_array_equal(result.dW, job_input["expected"]["dW"])


def test_the_worker_memory_formula():
    """limit = (task bound + baseline + headroom) / pause, the pause fraction read from dask.config."""
    import dask.config

    from dconv.sizing import WORKER_BASELINE, worker_memory

    task = 100 * 2**20
    memory = worker_memory(task)
    assert (memory.baseline, memory.headroom, memory.pause) == (WORKER_BASELINE, 64 * 2**20 + task // 4, 0.8)
    assert memory.limit == -(-(task + WORKER_BASELINE + 64 * 2**20 + task // 4) * 5 // 4)
    with dask.config.set({"distributed.worker.memory.pause": 0.5}):
        assert worker_memory(task).limit == 2 * (task + WORKER_BASELINE + memory.headroom)
    with dask.config.set({"distributed.worker.memory.pause": False}):
        assert worker_memory(task).pause == 0.95  # no pausing: below the point where the nanny restarts it


def test_deploy_gives_remote_workers_the_embedded_clusters_malloc_settings():
    """Every place docs/DEPLOY.md starts workers (the settings table, dask-jobqueue, SLURM, Kubernetes) names
    the malloc values the embedded cluster gives its own (dconv.cluster.WORKER_MALLOC_ENV)."""
    import re

    from dconv.cluster import WORKER_MALLOC_ENV

    text = (Path(__file__).resolve().parent.parent / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    for name, value in WORKER_MALLOC_ENV.items():
        given = re.findall(rf"{name}\W+(?:value\W+)?(\d+)", text)
        assert len(given) >= 6 and set(given) == {value}, (name, given)

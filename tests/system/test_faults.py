"""Fault tolerance: killed jobs, resume, lost workers, idempotent chunk tasks, honest completion.

Every subprocess here has a timeout. The jobs that are killed run in a fresh interpreter, as a
user starts them; the other CLI runs, forked from a process that has imported dconv
(``forked_dconv``). The large-job tests share one input (128 chunks of 4 samples, a few seconds
on 2 workers) and one uninterrupted reference run, made once per module; their results must
match it bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from dconv.store import OutputStore
from dconv.store.lease import read_lease
from _fault_helpers import (
    assert_bitwise_equal,
    chunks_computed,
    describe,
    done_count,
    done_flags,
    kill_group,
    live_group_members,
    provenance_of,
    snapshot,
    status_of,
    stop,
    wait_for_done,
)
from conftest import dask_command, dconv_command, free_port, wait_until

BIG = dict(m=512, height=32, width=32, in_channels=16, out_channels=32, dtype="float64", chunk=4, seed=7)
BATCH_CHUNK, SPLIT_EVERY = 4, 4  # 128 chunks, a 4-level reduction tree
N_CHUNKS = math.ceil(BIG["m"] / BATCH_CHUNK)
JOB_TIMEOUT = 120


@dataclass(frozen=True)
class BigJob:
    input: Path
    reference: Path  # an uninterrupted run of the same job
    options: tuple[str, ...] = ("--batch-chunk", str(BATCH_CHUNK), "--split-every", str(SPLIT_EVERY), "--quiet")


@pytest.fixture(scope="module")
def big_job(tmp_path_factory) -> BigJob:
    from dconv.store import make_inputs

    root = tmp_path_factory.mktemp("big-job")
    inputs = Path(make_inputs(str(root / "input.zarr"), **BIG))
    job = BigJob(input=inputs, reference=root / "reference.zarr")
    # in this process: the job's bits are the same on any scheduler (test_job checks it)
    result = dconv.backward_job(str(inputs), str(job.reference), batch_chunk=BATCH_CHUNK, split_every=SPLIT_EVERY,
                                scheduler="threads")
    assert (result.computed_chunks, result.n_chunks) == (N_CHUNKS, N_CHUNKS)
    return job


def start_job(args: list, log_dir: Path, name: str) -> subprocess.Popen:
    """``dconv ARGS`` as the leader of a new session (so that killpg reaches its workers too)."""
    with open(log_dir / f"{name}.out", "w") as stdout, open(log_dir / f"{name}.err", "w") as stderr:
        return subprocess.Popen(
            dconv_command() + [str(a) for a in args], start_new_session=True, stdout=stdout, stderr=stderr
        )


def inspect_json(forked_dconv, out: Path) -> tuple[int, dict]:
    result = forked_dconv.run(["inspect", out, "--json"])
    assert "Traceback" not in result.stderr, describe(result)
    return result.returncode, json.loads(result.stdout)


def job_logs(log_dir: Path, name: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(log_dir.glob(f"{name}.*")))


# --------------------------------------------------------------------------- 1. SIGKILL of the whole job


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.40], ids=["40pct"])  # one kill point: the resume path is the same at any
def test_resume_after_sigkill_of_whole_job(big_job, forked_dconv, tmp_path, fraction):
    out = tmp_path / "out.zarr"
    # a short lease timeout: the killed job's lease is taken over 1 s after its last heartbeat, not 60
    args = ["backward", big_job.input, out, "--workers", "2", *big_job.options, "--lease-timeout", "1"]
    target = math.ceil(fraction * N_CHUNKS)
    job = start_job(args, tmp_path, "killed")
    try:
        wait_for_done(out, target, job, timeout=JOB_TIMEOUT)
        os.killpg(job.pid, signal.SIGKILL)  # the client and its worker processes alike
        job.wait(timeout=10)
    finally:
        kill_group(job)
    assert job.returncode == -signal.SIGKILL, job_logs(tmp_path, "killed")
    assert wait_until(lambda: not live_group_members(job.pid), timeout=10), (
        f"processes of the killed job survived: {live_group_members(job.pid)}"
    )

    flags = done_flags(out)
    done = int(flags.sum())
    assert flags.size == N_CHUNKS
    assert target <= done < N_CHUNKS, f"{done} of {N_CHUNKS} done: the kill came too late to test anything"
    assert status_of(out) != "complete"

    # inspect: exit 3, "incomplete", done and missing counts
    result = forked_dconv.run(["inspect", out])
    assert result.returncode == 3, describe(result)
    assert "incomplete" in result.stdout.lower(), describe(result)
    assert re.search(rf"\b{done}\b", result.stdout) and re.search(rf"\b{N_CHUNKS - done}\b", result.stdout), describe(
        result
    )
    code, summary = inspect_json(forked_dconv, out)
    assert code == 3
    assert summary["complete"] is False
    assert summary["chunks"]["done"] == done
    assert summary["chunks"]["missing_count"] == N_CHUNKS - done

    # open_result: refused, unless allow_incomplete
    with pytest.raises(dconv.InputError):
        dconv.open_result(str(out))
    partial = dconv.open_result(str(out), allow_incomplete=True)
    assert partial["dA_prev"].shape == (BIG["m"], BIG["height"], BIG["width"], BIG["in_channels"])

    # the resume command inspect prints, run as printed once the killed job's lease is stale (its own
    # timeout, 1 s), takes the lease over and computes only the missing chunks: the uninterrupted result
    command = summary["resume_command"]
    assert command == shlex.join(["dconv", "backward", str(big_job.input), str(out), "--resume", "--workers", "2"])
    assert wait_until(lambda: read_lease(out) is None or read_lease(out).age() > 1.5, timeout=10)
    result = forked_dconv.run(shlex.split(command)[1:], timeout=JOB_TIMEOUT)
    assert result.returncode == 0, describe(result)
    assert chunks_computed(result.stdout) == (N_CHUNKS - done, N_CHUNKS)
    assert status_of(out) == "complete"
    assert_bitwise_equal(out, big_job.reference)
    assert forked_dconv.run(["inspect", out]).returncode == 0
    dconv.open_result(str(out))


# --------------------------------------------------------------------------- 2. --resume with nothing to resume


def test_resume_on_missing_output_runs_the_job(make_input, forked_dconv, tmp_path, dask_cluster):
    inputs = make_input()
    out = tmp_path / "fresh.zarr"
    result = forked_dconv.run(["backward", inputs, out, "--resume", "--scheduler", dask_cluster["address"],
                               "--batch-chunk", "7", "--quiet"])
    assert result.returncode == 0, describe(result)
    assert chunks_computed(result.stdout) == (3, 3)
    assert status_of(out) == "complete"
    group = zarr.open_group(inputs, mode="r")
    expected = dconv.conv2d_backward(group["dZ"][...], group["A_prev"][...], group["W"][...], stride=1, padding=1)
    got = dconv.open_result(str(out))
    for name in ("dA_prev", "dW", "db"):
        np.testing.assert_allclose(got[name][...], getattr(expected, name), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 3. resume must match the job


# option overrides that still fit the input's 8x8 -> 8x8 shapes, and the pattern naming what differs;
# options None: another input of the same shapes (the pattern is then its path)
MISMATCHES = [
    pytest.param(["--batch-chunk", "4"], r"batch[_-]chunk\W{1,8}4\b", id="batch_chunk"),
    pytest.param(["--stride", "2", "--padding", "5"], r"stride\W{1,8}2\b", id="stride"),
    pytest.param(["--dilation", "2", "--padding", "2"], r"dilation\W{1,8}2\b", id="dilation"),
    pytest.param(
        ["--split-every", "3"],
        r"split[_-]every\W{1,8}3\b",
        id="split_every",
    ),
    pytest.param(None, None, id="input"),
]


@pytest.mark.parametrize("options, pattern", MISMATCHES)
def test_resume_with_other_inputs_or_parameters_is_refused(make_input, forked_dconv, tmp_path, options, pattern):
    inputs = make_input(seed=1)
    out = tmp_path / "out.zarr"
    dconv.backward_job(inputs, str(out), batch_chunk=7, split_every=8, scheduler="synchronous")
    if options is None:
        inputs = make_input(seed=2)
        options, pattern = [], re.escape(str(inputs))
    before = snapshot(out)
    result = forked_dconv.run(
        ["backward", inputs, out, "--resume", "--workers", "1", "--quiet", "--batch-chunk", "7", "--split-every", "8",
         *options],
        cwd=tmp_path,
    )
    assert snapshot(out) == before, "the refused resume modified OUT"
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("dconv: warning: ")]
    assert len(lines) == 1, describe(result)
    assert re.search(r"resume", lines[0], re.I), describe(result)
    assert re.search(pattern, lines[0]), f"the message does not say what differs ({pattern}):\n{describe(result)}"


# --------------------------------------------------------------------------- 4. a worker dies


@pytest.mark.slow
@pytest.mark.cluster
def test_job_survives_loss_of_a_worker(big_job, tmp_path):
    distributed = pytest.importorskip("distributed")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            process = subprocess.Popen(dask_command() + args, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    out = tmp_path / "out.zarr"
    job = None
    try:
        spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"])
        workers = [
            spawn(
                f"worker-{i}",
                ["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                 "--dashboard-address", "127.0.0.1:0", "--name", f"faults-w{i}"],
            )
            for i in range(2)
        ]
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)

        job = start_job(["backward", big_job.input, out, "--scheduler", address, *big_job.options], tmp_path, "job")
        wait_for_done(out, N_CHUNKS // 5, job, timeout=JOB_TIMEOUT)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=10)
        done_at_kill = done_count(out)
        assert done_at_kill < N_CHUNKS, "the job finished before the worker was killed"

        job.wait(timeout=JOB_TIMEOUT)
        assert job.returncode == 0, job_logs(tmp_path, "job")
        stdout = (tmp_path / "job.out").read_text()
        assert chunks_computed(stdout) == (N_CHUNKS, N_CHUNKS)
        assert status_of(out) == "complete"
        assert_bitwise_equal(out, big_job.reference)
        with distributed.Client(address, timeout=30) as client:  # the dead worker was not replaced
            assert [w["name"] for w in client.scheduler_info()["workers"].values()] == ["faults-w1"]
    finally:
        if job is not None:
            kill_group(job)
        stop(processes[::-1])


# --------------------------------------------------------------------------- 5. idempotent chunk tasks


@pytest.mark.parametrize("index", [0, 2], ids=["first-chunk", "last-short-chunk"])
def test_chunk_task_run_twice_writes_the_same_bytes(make_input, tmp_path, index):
    from dconv.plan import plan_job

    inputs = make_input()  # m=20: chunks of 7, 7 and 6 samples
    out = tmp_path / "out.zarr"
    plan = plan_job(inputs, str(out), batch_chunk=7)
    plan.open_output()

    def run(i: int):
        return plan.run_chunk(i)

    first = run(index)
    after_first = snapshot(out)
    run((index + 1) % len(plan.bounds))  # another chunk in between
    after_other = snapshot(out)
    second = run(index)
    after_second = snapshot(out)

    assert after_second == after_other, "re-running the chunk changed stored files"
    changed_by_other = {k for k in after_other if after_first.get(k) != after_other[k]}
    assert {k: v for k, v in after_second.items() if k not in changed_by_other} == {
        k: v for k, v in after_first.items() if k not in changed_by_other
    }
    # the chunk really wrote something: its dA_prev block and done flag
    assert f"dA_prev/c/{index}/0/0/0" in after_first
    assert done_flags(out)[index]
    assert all(np.asarray(first.reduced[k]).tobytes() == np.asarray(second.reduced[k]).tobytes() for k in first.reduced)
    group = zarr.open_group(str(out), mode="r")
    start, stop_ = plan.bounds[index]
    stored = np.asarray(group["dA_prev"][start:stop_])
    expected = dconv.conv2d_backward(
        zarr.open_group(inputs, mode="r")["dZ"][start:stop_],
        zarr.open_group(inputs, mode="r")["A_prev"][start:stop_],
        plan.W,
        stride=1,
        padding=1,
    )
    np.testing.assert_allclose(stored, expected.dA_prev, rtol=1e-12, atol=1e-12)
    assert OutputStore(str(out)).read_partial(index)[0]["dW"].tobytes() == first.reduced["dW"].tobytes()


# --------------------------------------------------------------------------- 6. honest completion


def test_failed_job_is_marked_failed_and_refused(make_input, forked_dconv, tmp_path, dask_cluster):
    inputs = Path(make_input())  # chunks of 7 samples
    chunk = inputs / "A_prev" / "c" / "1" / "0" / "0" / "0"
    good_bytes = chunk.read_bytes()
    chunk.write_bytes(b"\x00corrupt" * 16)
    out = tmp_path / "out.zarr"
    args = ["backward", inputs, out, "--scheduler", dask_cluster["address"], "--batch-chunk", "7", "--quiet"]

    result = forked_dconv.run(args)
    assert result.returncode == 2, describe(result)  # a corrupt input is bad input
    provenance = provenance_of(out)
    assert provenance["status"] == "failed", provenance
    assert "A_prev" in provenance.get("reason", ""), provenance
    assert not done_flags(out)[1]

    result = forked_dconv.run(["inspect", out])
    assert result.returncode == 3, describe(result)
    assert "failed" in result.stdout and "A_prev" in result.stdout, describe(result)
    with pytest.raises(dconv.InputError):
        dconv.open_result(str(out))
    assert dconv.open_result(str(out), allow_incomplete=True).attrs["dconv"]["status"] == "failed"

    # the Python API fails the same way
    api_out = tmp_path / "api.zarr"
    with pytest.raises(dconv.InputError, match="A_prev"):
        dconv.backward_job(str(inputs), str(api_out), batch_chunk=7, scheduler="synchronous")
    assert status_of(api_out) == "failed"

    # once the chunk is repaired, --resume finishes the job
    chunk.write_bytes(good_bytes)
    done_before = done_count(out)
    result = forked_dconv.run([*args, "--resume"])
    assert result.returncode == 0, describe(result)
    assert chunks_computed(result.stdout) == (3 - done_before, 3)
    assert status_of(out) == "complete"
    group = zarr.open_group(str(inputs), mode="r")
    expected = dconv.conv2d_backward(group["dZ"][...], group["A_prev"][...], group["W"][...], stride=1, padding=1)
    for name in ("dA_prev", "dW", "db"):
        np.testing.assert_allclose(dconv.open_result(str(out))[name][...], getattr(expected, name), rtol=1e-10)

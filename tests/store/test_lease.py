"""One writer per output: the lease (dconv/store/lease.py), against real processes, a real SIGKILL and moto's S3.

The first job of each end-to-end test is a real ``dconv backward`` process on the
embedded cluster, on 512 tiny chunks (a few seconds of work); the jobs that
follow it run forked from a process that has imported dconv (``forked_dconv``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import dconv
from _fault_helpers import assert_bitwise_equal, chunks_computed, describe, done_count, kill_group, provenance_of
from conftest import dconv_command, wait_until
from test_s3 import bucket, new_fs, s3_endpoint, storage_options  # noqa: F401  the moto server, and a bucket
from dconv import simd
from dconv.errors import InputError, JobInterrupted, LeaseLost
from dconv.plan import plan_job
from dconv.store.output import open_output
from dconv.store.lease import LEASE_NAME, LeaseInfo, acquire, read_lease
from dconv.store.summary import format_summary, summarize

# 512 chunks of 2 samples, 8x8x4 -> 8: a few seconds for one worker, mostly each task's fixed cost.
INPUT = dict(m=1024, height=8, width=8, in_channels=4, out_channels=8, dtype="float32", chunk=2, seed=5)
JOB = ["--batch-chunk", 2, "--split-every", 4]
TIMEOUT = 120
HELD = re.compile(
    r"dconv: error: out '(?P<out>[^']+)' is being written by another job \(host (?P<host>\S+), pid (?P<pid>\d+), "
    r"since \S+, last heartbeat (?P<age>\d+) s ago\); wait for it, or if it is dead it is taken over after "
    r"(?P<limit>\d+) s without a heartbeat\."
)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input, and an uninterrupted run of the job (in this process: the same bits as on a cluster)."""
    root = tmp_path_factory.mktemp("lease")
    inputs = dconv.make_inputs(str(root / "input.zarr"), **INPUT)
    reference = root / "reference.zarr"
    dconv.backward_job(inputs, reference, batch_chunk=2, split_every=4, scheduler="synchronous")
    return inputs, reference


def start_job(inputs, out, *extra) -> subprocess.Popen:
    """``dconv backward`` on the embedded cluster (one worker), in a fresh interpreter and process group."""
    args = ["backward", inputs, out, *JOB, "--workers", 1, "--quiet", *extra]
    return subprocess.Popen(
        dconv_command() + [str(a) for a in args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def errors_of(stderr: str) -> list[str]:
    """stderr less the plan's warnings (one line each)."""
    return [line for line in stderr.splitlines() if not line.startswith("dconv: warning: ")]


def write_lease(out, **fields) -> LeaseInfo:
    """Put another owner's lease at ``out`` (``fields`` replace a fresh one's), as another job would."""
    lease = LeaseInfo(**{**vars(LeaseInfo.new(60.0)), "host": "elsewhere", "pid": 4242, **fields})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / LEASE_NAME).write_bytes(lease.to_bytes())
    return lease


def seconds_ago(seconds: float) -> str:
    """A heartbeat ``seconds`` ago, as a lease records it."""
    return datetime.fromtimestamp(time.time() - seconds, timezone.utc).isoformat(timespec="milliseconds")


def test_a_second_job_on_a_held_output_is_refused_in_one_line_and_the_first_finishes(job, forked_dconv, tmp_path):
    inputs, reference = job
    out = tmp_path / "out.zarr"
    first = start_job(inputs, out)
    try:
        assert wait_until(lambda: first.poll() is not None or (out / LEASE_NAME).exists(), timeout=TIMEOUT)
        assert first.poll() is None, "the first job ended before its lease was seen"
        refusals = [forked_dconv.run(["backward", inputs, out, *JOB, flag]) for flag in ("--resume", "--overwrite")]
        still_running = first.poll() is None
        stdout, stderr = first.communicate(timeout=TIMEOUT)
    finally:
        kill_group(first)
    assert still_running, "the first job ended while the others were refused: the test proves nothing"
    for refused in refusals:
        assert refused.returncode == 2, describe(refused)
        lines = errors_of(refused.stderr)
        assert len(lines) == 1 and refused.stdout == "", describe(refused)
        match = HELD.fullmatch(lines[0])
        assert match, describe(refused)
        assert (match["out"], int(match["pid"]), match["limit"]) == (str(out), first.pid, "60"), lines[0]
        assert int(match["age"]) <= 15, lines[0]  # renewed every 15 s
    assert first.returncode == 0, f"exit {first.returncode}\n{stdout}\n{stderr}"
    assert chunks_computed(stdout) == (512, 512)
    assert provenance_of(out)["status"] == "complete"
    assert_bitwise_equal(out, reference)
    assert not (out / LEASE_NAME).exists()


def test_a_sigkilled_jobs_lease_is_taken_over_by_resume_after_the_timeout(job, forked_dconv, tmp_path):
    inputs, reference = job
    out = tmp_path / "out.zarr"
    first = start_job(inputs, out, "--lease-timeout", 1)
    try:
        started = wait_until(lambda: first.poll() is not None or done_count(out) > 0, timeout=TIMEOUT)
        assert started and first.poll() is None, "the job ended before its first chunk was seen"
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        kill_group(first)
    held = read_lease(out)
    assert (held.pid, held.timeout) == (first.pid, 1.0), held
    assert wait_until(lambda: read_lease(out).age() > 1.5, timeout=10)

    command = dconv.summarize(str(out))["resume_command"]  # as inspect prints it: no lease flag
    assert command == shlex.join(["dconv", "backward", inputs, str(out), "--resume", "--workers", "1"])
    resumed = forked_dconv.run([*shlex.split(command)[1:], "--quiet"], timeout=TIMEOUT)
    assert resumed.returncode == 0, describe(resumed)
    line = errors_of(resumed.stderr)
    assert len(line) == 1, describe(resumed)
    taken = re.fullmatch(rf"dconv: taking over the lease of {re.escape(str(out))} from host (\S+) pid (\d+): "
                         r"no heartbeat for (\d+) s", line[0])
    assert taken and (taken[1], int(taken[2])) == (held.host, first.pid) and int(taken[3]) >= 1, line[0]
    done, total = chunks_computed(resumed.stdout)
    assert 0 < done < total == 512
    assert_bitwise_equal(out, reference)
    assert not (out / LEASE_NAME).exists()


def nan_input(m: int = 400) -> dict[str, np.ndarray]:
    """In-memory arrays whose last sample holds a NaN: check_finite fails the job at its last chunk."""
    rng = np.random.default_rng(7)
    arrays = {"A_prev": rng.standard_normal((m, 8, 8, 4)), "dZ": rng.standard_normal((m, 6, 6, 8)),
              "W": rng.standard_normal((3, 3, 4, 8))}
    arrays["A_prev"][-1, 0, 0, 0] = np.nan
    return arrays


@pytest.mark.parametrize("end", ["complete", "failed", "interrupted"])
def test_the_lease_is_held_while_the_job_runs_and_removed_whatever_the_end(tmp_path, monkeypatch, end):
    monkeypatch.setattr(simd, "_active", None)  # in-process chunk tasks set this process's level
    out = tmp_path / "out.zarr"
    seen: list[LeaseInfo] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            held = read_lease(out)
            if held is not None:
                seen.append(held)
                renewed = len({lease.heartbeat for lease in seen}) > 1
                if end == "interrupted" and renewed and done_count(out) > 0:
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    raises = {"complete": None, "failed": InputError, "interrupted": JobInterrupted}[end]
    try:
        with pytest.raises(raises) if raises else _nothing():
            dconv.backward_job(nan_input(), out, batch_chunk=1, check_finite=end != "complete", lease_timeout=0.4,
                               scheduler="synchronous" if end != "complete" else "threads")
    finally:
        stop.set()
        watcher.join()
    assert seen and seen[0].pid == os.getpid() and seen[0].timeout == 0.4, seen
    assert len({lease.heartbeat for lease in seen}) > 1, "the lease was never renewed"
    assert len({lease.id for lease in seen}) == 1
    assert provenance_of(out)["status"] == end
    assert not (out / LEASE_NAME).exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_renewal_that_finds_another_owner_stops(tmp_path):
    out = tmp_path / "out.zarr"
    lease = acquire(str(out), timeout=60.0)
    assert read_lease(out).id == lease.info.id
    lease.renew()  # still ours: renewed
    other = write_lease(out)
    with pytest.raises(LeaseLost, match=rf"^lost the lease on '{re.escape(str(out))}' to elsewhere:4242 "):
        lease.renew()
    lease.release()
    assert read_lease(out) == other  # the new owner's lease stays


def test_a_job_whose_lease_is_taken_stops_and_leaves_the_output_alone(job, tmp_path, monkeypatch):
    """In-process: the renewal finds another owner, interrupts the job, which raises LeaseLost and marks nothing."""
    monkeypatch.setattr(simd, "_active", None)
    inputs, _ = job
    out = tmp_path / "out.zarr"

    def steal() -> None:
        if wait_until(lambda: done_count(out) > 0, timeout=TIMEOUT):
            write_lease(out)

    thief = threading.Thread(target=steal, daemon=True)
    thief.start()
    with pytest.raises(LeaseLost, match="to elsewhere:4242"):
        dconv.backward_job(inputs, out, batch_chunk=2, split_every=4, scheduler="threads", lease_timeout=0.4)
    thief.join()
    assert provenance_of(out)["status"] == "running"  # neither "failed" nor "interrupted": not its output any more
    assert read_lease(out).host == "elsewhere"


def test_inspect_shows_the_lease_and_says_running_only_while_it_is_fresh(make_input, tmp_path):
    inputs, out = make_input(m=6, chunk=2), tmp_path / "out.zarr"
    plan = plan_job(inputs, out, batch_chunk=2)
    lease = acquire(str(out), timeout=60.0)
    plan.open_output()  # the layout, "running", keeps the lease
    summary = summarize(str(out))
    assert summary["running"] is True and summary["status"] == "running"
    assert {k: summary["lease"][k] for k in ("host", "pid", "id", "fresh")} == {
        "host": lease.info.host, "pid": os.getpid(), "id": lease.info.id, "fresh": True}
    json.dumps(summary, allow_nan=False)
    text = format_summary(summary)
    assert text.startswith(f"{out}: running\n  lease: held by host {lease.info.host} pid {os.getpid()} "
                           f"(id {lease.info.id}), heartbeat 0 s ago\n"), text
    assert "resume with" not in text and "a job is writing it" in text

    stale = write_lease(out, heartbeat=seconds_ago(75), timeout=60.0)
    summary = summarize(str(out))
    assert summary["running"] is False and summary["lease"]["fresh"] is False and summary["lease"]["id"] == stale.id
    text = format_summary(summary)
    assert text.startswith(f"{out}: not running any more (its status says running, but its lease is stale"), text
    assert "  lease: held by host elsewhere pid 4242" in text and ": stale (its timeout is 60 s)" in text
    assert re.search(r"^  resume with: dconv backward .* --resume$", text, re.M), text

    os.remove(out / LEASE_NAME)
    summary = summarize(str(out))
    assert summary["lease"] is None and summary["running"] is False
    assert "no job holds its lease" in format_summary(summary).splitlines()[0]


def test_a_store_without_exclusive_create_warns_and_still_refuses_a_second_job():
    said: list[str] = []
    url = f"memory://lease-{os.getpid()}-{time.monotonic_ns()}/out.zarr"
    first = acquire(url, timeout=60.0, say=said.append)
    assert len(said) == 1 and said[0].startswith("dconv: warning: ") and "exclusive create" in said[0], said
    with pytest.raises(InputError, match="is being written by another job"):
        acquire(url, timeout=60.0)
    first.release()
    assert read_lease(url) is None


# --------------------------------------------------------------------------- S3 (moto's server)


@pytest.fixture
def s3_out(s3_endpoint, bucket):  # noqa: F811  test_s3's fixtures
    """``(url, storage options, s3fs filesystem)`` of an output in a fresh bucket on the moto server of test_s3.py."""
    return f"s3://{bucket}/out.zarr", storage_options(s3_endpoint), new_fs(s3_endpoint)


def test_s3_exclusive_create_refuses_a_second_acquire_and_takes_over_a_stale_lease(s3_out):
    url, options, fs = s3_out
    # the store itself: a PUT with If-None-Match: * on an existing key fails (moto 5.x, as AWS S3)
    probe = url.removeprefix("s3://") + "/probe"
    fs.pipe_file(probe, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(probe, b"second", mode="create")
    assert fs.cat_file(probe) == b"first"
    fs.rm_file(probe)

    said: list[str] = []
    first = acquire(url, options, timeout=60.0, say=said.append)
    assert said == []  # exclusive create: no warning
    with pytest.raises(InputError) as refused:
        acquire(url, options, timeout=60.0)
    assert HELD.fullmatch(f"dconv: error: {refused.value}") and f"pid {os.getpid()}," in str(refused.value)

    # the holder goes silent: its heartbeat, 75 s old
    path = url.removeprefix("s3://") + f"/{LEASE_NAME}"
    silent = LeaseInfo(**{**vars(first.info), "heartbeat": seconds_ago(75)})
    fs.pipe_file(path, silent.to_bytes())
    second = acquire(url, options, timeout=60.0, say=said.append)
    assert said == [f"dconv: taking over the lease of {url} from host {silent.host} pid {os.getpid()}: no heartbeat "
                    "for 75 s"], said
    assert read_lease(url, options).id == second.info.id != first.info.id
    with pytest.raises(LeaseLost):
        first.renew()
    first.release()  # not its lease any more: left alone
    assert read_lease(url, options).id == second.info.id
    second.release()
    assert read_lease(url, options) is None


def test_s3_create_over_an_old_output_keeps_the_lease(s3_out, make_input):
    """--overwrite on S3: the old output's members go (its records too), the new job's lease stays."""
    url, options, fs = s3_out
    inputs, tree = make_input(m=6, chunk=2), url.removeprefix("s3://") + "/_progress/tree"
    dconv.backward_job(inputs, url, batch_chunk=2, scheduler="threads", keep_partials=True, storage_options=options)
    assert fs.ls(tree) and read_lease(url, options) is None
    plan = plan_job(inputs, url, batch_chunk=2, overwrite=True, storage_options=options)
    lease = acquire(url, options, timeout=60.0)
    plan.open_output()
    fs.invalidate_cache()
    assert read_lease(url, options).id == lease.info.id
    assert not fs.exists(tree)
    assert open_output(url, options)[1]["status"] == "running"
    lease.release()

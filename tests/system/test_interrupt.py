"""Ctrl-C and SIGTERM: one line, exit 130 / 143, an "interrupted" output that inspect tells how to resume.

The signal goes to the job's whole process group, as a terminal's Ctrl-C does
(and a batch scheduler's SIGTERM reaches every process of the job): the
embedded cluster's workers must stay silent and leave the client to record the
interruption. The resumed job must give the bits of an uninterrupted run.

The interrupted jobs run in a fresh interpreter, as a user starts them; ``inspect`` and the
resumed job run forked from a process that has imported dconv (conftest's ``forked_dconv``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
from datetime import datetime

import numpy as np
import pytest

import dconv
from _fault_helpers import (
    assert_bitwise_equal,
    chunks_computed,
    describe,
    done_count,
    done_flags,
    kill_group,
    live_group_members,
    provenance_of,
)
from conftest import dconv_command, free_port, wait_until
from dconv import simd
from dconv.errors import JobInterrupted

# 64 chunks of 8 samples, 32x32x16 -> 32: a second or two of work for 2 workers, so a signal sent
# once the first chunk is done finds most of the job still to do.
INPUT = dict(m=512, height=32, width=32, in_channels=16, out_channels=32, dtype="float32", chunk=8, seed=3)
BATCH_CHUNK, SPLIT_EVERY = 8, 4
N_CHUNKS = INPUT["m"] // BATCH_CHUNK
TIMEOUT = 120


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input, and an uninterrupted run of the job (in this process: the same bits as on a cluster)."""
    root = tmp_path_factory.mktemp("interrupt")
    inputs = dconv.make_inputs(str(root / "input.zarr"), **INPUT)
    reference = root / "reference.zarr"
    dconv.backward_job(inputs, reference, batch_chunk=BATCH_CHUNK, split_every=SPLIT_EVERY, scheduler="threads")
    return inputs, reference


def missing_text(flags: np.ndarray) -> str:
    """The missing chunks as inspect should list them: ``0-3, 7, 9, 10``, written out independently."""
    parts, index = [], 0
    while index < flags.size:
        if flags[index]:
            index += 1
            continue
        last = index
        while last + 1 < flags.size and not flags[last + 1]:
            last += 1
        parts.append(f"{index}-{last}" if last - index >= 2 else ", ".join(map(str, range(index, last + 1))))
        index = last + 1
    return ", ".join(parts)


@pytest.mark.parametrize(
    "signum, workers, quiet, resume",
    [(signal.SIGINT, 2, True, True), (signal.SIGTERM, 1, False, False)],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_stops_the_job_in_one_line_and_its_resume_command_finishes_it(
    job, forked_dconv, tmp_path, signum, workers, quiet, resume
):
    """SIGINT with --quiet: stderr is the one line. SIGTERM with the cluster's line and progress on stderr: the
    last line, and nothing that is not dconv's. The resume command does not depend on the signal: run once."""
    inputs, reference = job
    name = signal.Signals(signum).name
    out = tmp_path / "out.zarr"
    args = ["backward", inputs, out, "--batch-chunk", BATCH_CHUNK, "--split-every", SPLIT_EVERY, "--workers", workers]
    process = subprocess.Popen(
        dconv_command() + [str(a) for a in args] + (["--quiet"] if quiet else []),
        start_new_session=True,  # its own process group, which the signal goes to, as a terminal's Ctrl-C does
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = wait_until(lambda: process.poll() is not None or done_count(out) > 0, timeout=TIMEOUT)
        assert started and process.poll() is None, "the job ended before its first chunk was seen"
        os.killpg(process.pid, signum)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        kill_group(process)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert wait_until(lambda: not live_group_members(process.pid), timeout=30), "the job's processes outlived it"

    # exit 128 + signal, and one line: no traceback, nothing from the workers
    assert result.returncode == 128 + signum, describe(result)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, describe(result)
    # the plan's warnings (one line each) may come first, whatever --quiet says
    lines = [line for line in stderr.splitlines() if not line.startswith("dconv: warning: ")]
    if not quiet:  # the plan, the cluster's line and progress come first; "interrupted", the last
        assert lines[0].startswith("dconv: 64 tasks of 8 samples"), describe(result)
        assert lines[1].startswith(f"dconv: local cluster, {workers} worker"), describe(result)
        assert all(line.startswith("dconv: ") for line in lines), describe(result)
        assert sum("interrupted" in line for line in lines) == 1, describe(result)
        lines = lines[-1:]
    assert len(lines) == 1, describe(result)
    flags = done_flags(out)
    assert 1 <= flags.sum() < N_CHUNKS, f"{flags.sum()} of {N_CHUNKS} chunks done: the signal came too late"
    expected = rf"dconv: interrupted by {name} with (\d+) of {N_CHUNKS} chunks of {re.escape(str(out))} done; "
    message = re.fullmatch(expected + r"resume with: (dconv backward .*)", lines[0])
    assert message, describe(result)
    assert int(message.group(1)) == flags.sum()  # counted once the cluster closed: what inspect counts

    provenance = provenance_of(out)
    assert provenance["status"] == "interrupted" and provenance["signal"] == name, provenance
    assert datetime.fromisoformat(provenance["interrupted"]) >= datetime.fromisoformat(provenance["started"])
    assert "reason" not in provenance

    # inspect: exit 3, the missing chunks as ranges, the signal, the command that resumes the job
    inspected = forked_dconv.run(["inspect", out])
    assert inspected.returncode == 3, describe(inspected)
    text = inspected.stdout
    assert f"  INCOMPLETE: {flags.sum()} of {N_CHUNKS} batch chunks done, {N_CHUNKS - flags.sum()} missing " \
           f"({missing_text(flags)})\n" in text, text
    assert f"  interrupted by {name} at {provenance['interrupted']}\n" in text, text
    command = re.search(r"^  resume with: (.*)$", text, re.M).group(1)
    assert command == message.group(2)
    assert "compression n/a" in text and not re.search(r"compression \d", text), text
    if not resume:
        return

    # the command, as printed, resumes the job: only the missing chunks run, and the bits are the uninterrupted run's
    words = shlex.split(command)
    assert words[:2] == ["dconv", "backward"]
    resumed = forked_dconv.run(words[1:], timeout=TIMEOUT)
    assert resumed.returncode == 0, describe(resumed)
    assert chunks_computed(resumed.stdout) == (N_CHUNKS - flags.sum(), N_CHUNKS)
    assert provenance_of(out)["status"] == "complete"
    assert_bitwise_equal(out, reference)


@pytest.fixture
def complete_output(make_input, tmp_path):
    """A small complete output, its input and the result of the job that wrote it."""
    inputs, out = make_input(m=12, chunk=4), tmp_path / "out.zarr"
    result = dconv.backward_job(inputs, out, batch_chunk=4, split_every=2, scheduler="threads")
    return inputs, out, result


def test_resume_of_a_complete_output_says_so_and_starts_no_cluster(forked_dconv, complete_output):
    inputs, out, result = complete_output
    before = provenance_of(out)
    run = forked_dconv.run(["backward", inputs, out, "--resume", "--batch-chunk", 4, "--split-every", 2])
    assert run.returncode == 0, describe(run)
    assert run.stderr == "", describe(run)  # no cluster line, no dashboard, no progress
    assert run.stdout.count("\n") == 1 and run.stdout.startswith(f"dconv: {out} is already complete, nothing to do")
    assert chunks_computed(run.stdout) == (0, 3)
    assert provenance_of(out) == before  # not even reopened


def test_backward_job_on_a_complete_output_returns_the_stored_result(complete_output):
    """No cluster: the one named here does not exist, and is never reached."""
    inputs, out, first = complete_output
    nowhere = dconv.ClusterOptions(scheduler=f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.5)
    again = dconv.backward_job(inputs, out, batch_chunk=4, split_every=2, resume=True, cluster=nowhere)
    assert again.already_complete and again.computed_chunks == 0 and again.n_chunks == first.n_chunks == 3
    assert set(again.values) == set(first.values)
    for name in ("dW", "db"):
        assert again.values[name].dtype == first.values[name].dtype
        assert again.values[name].tobytes() == first.values[name].tobytes(), name
    assert again.nonfinite == first.nonfinite and again.nonfinite_dA_prev == first.nonfinite_dA_prev
    assert again.simd == first.simd and again.out == first.out
    assert "already complete" in again.describe()


def test_ctrl_c_in_python_marks_the_output_interrupted(job, tmp_path, monkeypatch):
    """In-process (the threaded scheduler): Ctrl-C raises JobInterrupted, a KeyboardInterrupt, and the output
    says "interrupted"; SIGTERM's default action is back once the job is over."""
    monkeypatch.setattr(simd, "_active", None)  # in-process chunk tasks set this process's level
    inputs, _ = job
    out = tmp_path / "out.zarr"

    def interrupt_after_the_first_chunk() -> None:
        if wait_until(lambda: done_count(out) > 0, timeout=TIMEOUT):
            os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_after_the_first_chunk, daemon=True)
    watcher.start()
    with pytest.raises(JobInterrupted) as caught:
        dconv.backward_job(inputs, out, batch_chunk=BATCH_CHUNK, split_every=SPLIT_EVERY, scheduler="threads")
    watcher.join()
    error = caught.value
    assert isinstance(error, KeyboardInterrupt) and error.exit_code == 130
    assert (error.signal, error.out, error.total) == ("SIGINT", str(out), N_CHUNKS)
    assert 1 <= error.done < N_CHUNKS
    assert error.resume_command == f"dconv backward {inputs} {out} --resume --scheduler threads"
    assert f"interrupted by SIGINT with {error.done} of {N_CHUNKS} chunks" in str(error)
    provenance = provenance_of(out)
    assert (provenance["status"], provenance["signal"]) == ("interrupted", "SIGINT")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

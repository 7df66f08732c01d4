"""dconv.report: the plan's text: the line said before a job starts, the --dry-run description, the warnings."""

from __future__ import annotations

import re

import numpy as np
import pytest
from dask.utils import format_bytes

from dconv import report
from dconv.plan import plan_job
from dconv.sizing import small_task, task_memory

from _plans import plan_in_memory


# --------------------------------------------------------------------------- the plan line


@pytest.mark.parametrize(
    "m, batch_chunk, workers, threads, expected",
    [
        (20, 6, 2, 1, "dconv: 4 tasks of up to 6 samples (m = 20), at most {memory} each; 2 workers x 1 thread"),
        (20, 5, 1, 4, "dconv: 4 tasks of 5 samples (m = 20), at most {memory} each; 1 worker x 4 threads"),
        (20, 1, 2, 1, "dconv: 20 tasks of 1 sample (m = 20), at most {memory} each; 2 workers x 1 thread"),
        (20, 64, 1, 1, "dconv: 1 task of 20 samples (m = 20), at most {memory} each; 1 worker x 1 thread"),
    ],
)
def test_announce_is_one_line_with_plurals_right(make_input, tmp_path, m, batch_chunk, workers, threads, expected):
    plan = plan_job(make_input(m=m, chunk=batch_chunk, padding=1), tmp_path / "out.zarr", batch_chunk=batch_chunk)
    assert plan.announce(workers, threads) == expected.format(memory=format_bytes(plan.task_memory()))


def test_announce_names_max_memory_and_the_batch_chunk_it_chose(tmp_path):
    plan = plan_in_memory(tmp_path, max_memory="10MiB")
    line = plan.announce(2, 1)
    assert re.fullmatch(
        rf"dconv: {len(plan.bounds)} tasks of up to {plan.batch_chunk} samples \(m = 1024\), at most [\d.]+ MiB each "
        r"\(max_memory 10.00 MiB\); 2 workers x 1 thread",
        line,
    ), line
    assert plan.task_memory() <= 10 * 2**20 < task_memory(plan.batch_chunk + 1, plan.shapes, plan.geometry, np.float32)


def test_describe_speaks_singular_and_gives_disk_figures(make_input, tmp_path):
    plan = plan_job(make_input(m=20, chunk=1, padding=1), tmp_path / "out.zarr", batch_chunk=1)
    text = plan.describe()
    assert "chunks  20 of up to 1 sample (m = 20)" in text
    disk = plan.disk_bytes()
    assert disk["input"] == 8 * 20 * (8 * 8 * 3 + 8 * 8 * 4) + 8 * 3 * 3 * 3 * 4  # A_prev, dZ, W, float64
    assert disk["dA_prev"] == 8 * 20 * 8 * 8 * 3
    # at most split_every x depth records (dW, db partials, NaN count) of a 20-chunk tree of fan-in 8
    # (depth 2) while running, and one level byte per chunk after
    assert disk["_progress"] == 8 * 2 * (8 * 3 * 3 * 3 * 4 + 8 * 4 + 8) + 20
    output = sum(disk.values()) - disk["input"]
    assert f"disk    input {format_bytes(disk['input'])} (uncompressed); output {format_bytes(output)}: " in text
    assert f"dA_prev {format_bytes(disk['dA_prev'])} (uncompressed)" in text


# --------------------------------------------------------------------------- warnings


def test_a_plan_without_problems_warns_nothing(tmp_path):
    plan = plan_in_memory(tmp_path)
    assert plan.warnings(2, 1, cores=2) == [] and report.warnings(plan, 2, 1, cores=2) == []
    assert report.straddle_warning(plan) is None


def test_warns_when_tasks_cut_input_chunks(make_input, tmp_path):
    inp = make_input(m=40, chunk=8, padding=1)
    plan = plan_job(inp, tmp_path / "out.zarr", batch_chunk=4)
    line = plan.straddle_warning()
    assert plan.warnings(2, 1, cores=2) == [line]
    assert line.startswith("dconv: warning: batch_chunk 4 is not a multiple of the input's Zarr chunk 8 along m: ")
    assert "decode each input chunk 2 times" in line and line.endswith("use a multiple of 8")  # 4 is small
    assert "\n" not in line
    assert plan_job(inp, tmp_path / "out.zarr", batch_chunk=16).straddle_warning() is None
    assert plan_job(inp, tmp_path / "out.zarr", batch_chunk=40).straddle_warning() is None  # one task: whole array


def test_warns_when_tasks_are_too_small(tmp_path):
    plan = plan_in_memory(tmp_path, batch_chunk=1)
    assert small_task(1, plan.shapes, plan.geometry).enough == 106  # 2 GFLOP of 18.9 MFLOP samples
    (line,) = plan.warnings(2, 1, cores=2)
    assert line.startswith("dconv: warning: tasks of 1 sample are small (18.9 MFLOP, 1024 pixels each): ")
    assert "(36 s in all)" in line and line.endswith("use batch_chunk >= 106")
    assert plan_in_memory(tmp_path, m=8192, batch_chunk=105).warnings(2, 1, cores=2) != []
    assert plan_in_memory(tmp_path, m=8192, batch_chunk=106).warnings(2, 1, cores=2) == []


def test_a_small_job_is_not_warned_about_its_few_small_tasks(make_input, tmp_path):
    """The quickstart's shape: 4 tiny tasks cost a fraction of a second in all."""
    plan = plan_job(make_input(m=64, chunk=16, height=16, width=16, in_channels=8, out_channels=16), tmp_path / "o",
                    batch_chunk=16, padding=1)
    assert small_task(16, plan.shapes, plan.geometry) is not None
    assert plan.warnings(2, 1, cores=2) == []


def test_warns_when_workers_would_sit_idle(tmp_path):
    plan = plan_in_memory(tmp_path, batch_chunk=1024)
    (line,) = plan.warnings(2, 1, cores=2)
    assert line == "dconv: warning: 1 task for 2 workers x 1 thread: 1 of 2 will sit idle; use batch_chunk <= 512"
    assert plan.warnings(1, 1, cores=2) == []


def test_a_job_that_is_one_small_task_in_all_is_not_warned_about_idle_workers(make_input, tmp_path):
    """The FROM_PYTORCH recipe's job: 104 samples of 16x16x8 -> 16 make one task of a few milliseconds."""
    plan = plan_job(make_input(m=104, chunk=104, height=16, width=16, in_channels=8, out_channels=16), tmp_path / "o")
    assert len(plan.bounds) == 1 and plan.warnings(2, 1, cores=2) == []


def test_warns_when_workers_times_threads_exceed_the_cores(tmp_path):
    plan = plan_in_memory(tmp_path)
    (line,) = plan.warnings(3, 1, cores=2)
    assert line.startswith("dconv: warning: 3 workers x 1 thread run 3 tasks at once on 2 cores: ")
    assert line.endswith("use 2 workers x 1 thread")
    assert plan.warnings(1, 2, cores=2) == []
    assert plan.warnings(3, 1, cores=None) == []  # a remote cluster's cores are not known here

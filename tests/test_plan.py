"""dconv.plan before a job runs: the plan line, its warnings, the memory bound (input chunks that tasks
cut count whole), the --max-memory messages, the disk figures, plan_recipe, and the plain progress lines
that replace tqdm's bar when the stream is not a terminal."""

from __future__ import annotations

import io
import re
import threading
import time
import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from dask.utils import format_bytes

from dconv import InputError
from dconv.options import InputRecipe
from dconv.plan import plan_job, plan_recipe, read_memory, small_task, task_memory
from dconv.graph import CHUNK_PREFIX
from dconv.progress import PlainProgress, format_duration
from dconv.waves import compute_with_progress
from dconv.store import make_inputs

DEFAULT_LAYER = {"height": 32, "width": 32, "in_channels": 16, "out_channels": 32}  # make-inputs' default


def plan_in_memory(tmp_path, m: int = 1024, **options):
    """The plan of make-inputs' default layer (3x3, padding 1, float32) on lazy Dask zeros: any m, no memory."""
    height, width, c_prev, c_out = DEFAULT_LAYER.values()
    inputs = {
        "A_prev": da.zeros((m, height, width, c_prev), dtype=np.float32),
        "dZ": da.zeros((m, height, width, c_out), dtype=np.float32),
        "W": np.zeros((3, 3, c_prev, c_out), np.float32),
    }
    return plan_job(inputs, tmp_path / "out.zarr", padding=1, **options)


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
    assert plan.warnings(2, 1, cores=2) == []


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
    _, _, enough = small_task(1, plan.shapes, plan.geometry)
    assert enough == 106  # 2 GFLOP of 18.9 MFLOP samples
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


# --------------------------------------------------------------------------- the memory bound


def test_the_bound_counts_the_input_chunks_a_task_cuts(make_input, tmp_path):
    """Tasks of 4 samples in input chunks of 16: zarr holds each cut chunk whole, encoded and decoded."""
    whole = plan_job(make_input(m=40, chunk=4, padding=1), tmp_path / "out.zarr", batch_chunk=4)
    cut = plan_job(make_input(m=40, chunk=16, padding=1), tmp_path / "out.zarr", batch_chunk=4)
    kernel_only = task_memory(4, cut.shapes, cut.geometry, cut.compute_dtype)
    assert whole.task_memory() == kernel_only
    dz_chunk = 16 * 8 * 8 * 4 * 8  # 16 samples of dZ (8, 8, 4), float64
    blocks = 8 * 4 * (8 * 8 * 3 + 8 * 8 * 4)
    assert read_memory(4, 40, 16, 8 * 8 * 4 * 8) == 2 * dz_chunk
    assert cut.task_memory() == blocks + max(kernel_only - blocks, 2 * dz_chunk)
    assert cut.task_memory() > kernel_only


@pytest.mark.parametrize(
    "batch, chunk, touched",
    [(4, 8, 1), (3, 8, 2), (8, 8, 0), (16, 8, 0), (12, 8, 2), (40, 8, 0), (9, 4, 3), (64, 8, 0)],
)
def test_read_memory_counts_the_chunks_the_worst_task_touches(batch, chunk, touched):
    assert read_memory(batch, 40, chunk, 1) == touched * 2 * chunk
    assert read_memory(batch, 40, chunk, 1, fast_reader=False) >= touched * 2 * chunk


def test_a_cut_chunk_task_stays_within_its_bound(make_input, tmp_path):
    """tracemalloc's peak of a real task: above the bound without the cut chunk, within the bound with it."""
    inp = make_input(m=32, chunk=32, height=32, width=32, in_channels=4, out_channels=8, padding=1)
    plan = plan_job(inp, tmp_path / "out.zarr", batch_chunk=4)
    plan.open_output()
    plan.run_chunk(1)  # imports and first-call caches, outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        plan.run_chunk(2)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert task_memory(4, plan.shapes, plan.geometry, plan.compute_dtype) < peak <= plan.task_memory()


# --------------------------------------------------------------------------- --max-memory messages


def test_max_memory_speaks_of_the_batch_chunk_asked_for(tmp_path):
    with pytest.raises(InputError) as error:
        plan_in_memory(tmp_path, batch_chunk=64, max_memory="100KiB")
    message = str(error.value)
    assert message.startswith("batch_chunk 64 needs about ") and "more than max_memory 100.00 kiB" in message
    assert "not even 1 sample fits: it needs about" in message
    with pytest.raises(InputError, match=r"^batch_chunk 64 needs about .*; use batch_chunk <= \d+, or leave it out"):
        plan_in_memory(tmp_path, batch_chunk=64, max_memory="10MiB")


def test_max_memory_counts_the_input_chunks_a_task_would_cut(make_input, tmp_path):
    """Input chunks of 32: every smaller task holds a whole chunk, so a budget below that refuses even 1 sample."""
    inp = make_input(m=64, chunk=32, height=32, width=32, in_channels=4, out_channels=8, padding=1)
    shapes = {"A_prev": (64, 32, 32, 4), "dZ": (64, 32, 32, 8)}
    chunk_bytes = 2 * 32 * 32 * 32 * 8 * 8  # dZ, encoded and decoded
    held = r"\(a task that cuts the input's Zarr chunks of 32 samples holds them whole while it reads\)"
    with pytest.raises(InputError, match=rf"^one sample needs about .* per task {held}, more than max_memory"):
        plan_job(inp, tmp_path / "out.zarr", max_memory=chunk_bytes)
    plan = plan_job(inp, tmp_path / "out.zarr", max_memory=2 * chunk_bytes)
    assert 32 % plan.batch_chunk == 0 and plan.task_memory() <= 2 * chunk_bytes
    assert shapes["A_prev"] == plan.shapes["A_prev"]


# --------------------------------------------------------------------------- plan_recipe


def test_plan_recipe_writes_nothing_and_plans_what_make_inputs_would_write(tmp_path):
    recipe = InputRecipe(m=40, height=8, width=8, in_channels=3, out_channels=4, chunk=16, dtype="float64")
    inputs, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    planned = plan_recipe(recipe, inputs, out, batch_chunk=8)
    assert list(tmp_path.iterdir()) == []
    text = planned.describe()
    assert text.startswith(f"input   {inputs} does not exist yet; the run would first make it: m=40, 8x8x3 -> 4")
    assert "chunks  5 of up to 8 samples (m = 40)" in text and "disk    input " in text
    with pytest.raises(InputError, match="does not exist yet"):
        planned.open_output()
    assert list(tmp_path.iterdir()) == []

    make_inputs(str(inputs), recipe)
    real = plan_job(inputs, out, batch_chunk=8)
    assert real.describe().splitlines()[1:] == text.splitlines()[1:]
    assert real.warnings(2, 1, cores=2) == planned.warnings(2, 1, cores=2) != []  # 8 cuts chunks of 16
    assert (real.task_memory(), real.disk_bytes()) == (planned.task_memory(), planned.disk_bytes())


def test_the_large_batch_spec_reads_whole_chunks_and_its_comment_gives_the_plan_s_figures(tmp_path):
    """pipelines/large-batch.toml, planned from its recipe: no warning, and the bound its comment quotes."""
    from dconv.spec import load_spec

    path = Path(__file__).parents[1] / "pipelines" / "large-batch.toml"
    spec, comment = load_spec(path), path.read_text()
    plan = plan_recipe(spec.make, tmp_path / "in.zarr", tmp_path / "out.zarr", spec.options)
    assert plan.warnings(2, 1, cores=2) == []
    assert f"each holding at most about {format_bytes(plan.task_memory())}" in comment.replace("\n# ", " ")
    recipe = InputRecipe.build(spec.make, chunk=1024)
    cut = plan_recipe(recipe, tmp_path / "in.zarr", tmp_path / "out.zarr", spec.options)
    (line,) = cut.warnings(2, 1, cores=2)
    assert "decode each input chunk 4 times" in line and line.endswith("or input chunks of 256 (or a divisor)")
    assert f"hold it whole: {format_bytes(cut.task_memory())} per task" in comment.replace("\n# ", " ")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def chunk_graph(n: int, step=lambda index: index):
    """``n`` tasks keyed as dconv's chunk tasks, summed."""
    parts = [dask.delayed(step, pure=True)(i, dask_key_name=(f"{CHUNK_PREFIX}-test", i)) for i in range(n)]
    return dask.delayed(sum)(parts)


PLAIN_LINE = r"dconv: \d+ of 5 chunks, [\d.e+-]+ chunks/s, (ETA (\d+s|\d+m\d\ds|\d+h\d\dm|unknown)|done in \d+s)"


def test_progress_off_a_terminal_is_plain_lines(tmp_path):
    stream = io.StringIO()
    first_line = threading.Event()

    def step(index: int) -> int:
        if index == 0:  # hold the first chunk until the timer has written a line
            deadline = time.monotonic() + 30
            while not stream.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            first_line.set()
        return index

    total = compute_with_progress(
        chunk_graph(5, step), "url", 5, scheduler="threads", show=True, file=stream, interval=0.05
    )
    assert total == 10 and first_line.is_set()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2, text
    assert all(re.fullmatch(PLAIN_LINE, line) for line in lines), text
    assert re.fullmatch(r"dconv: 5 of 5 chunks, [\d.e+-]+ chunks/s, done in \d+s", lines[-1]), text


def test_progress_on_a_terminal_is_a_bar():
    stream = Terminal()
    compute_with_progress(chunk_graph(5), "url", 5, scheduler="threads", show=True, file=stream)
    assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()


def test_progress_line_counts_rate_and_eta():
    progress = PlainProgress(4096, io.StringIO())
    assert progress.line().endswith("ETA unknown")
    progress.update(120)
    assert re.fullmatch(r"dconv: 120 of 4096 chunks, [\d.e+]+ chunks/s, ETA .+", progress.line())
    assert [format_duration(s) for s in (0.4, 42, 112, 3 * 3600 + 299)] == ["0s", "42s", "1m52s", "3h05m"]


def test_no_progress_when_not_shown():
    stream = io.StringIO()
    assert compute_with_progress(chunk_graph(3), "url", 3, scheduler="threads", show=False, file=stream) == 3
    assert stream.getvalue() == ""


@pytest.mark.parametrize(
    "m, fetched, expected",
    [(40, False, 0), (42, False, 8), (40, True, 2 * 8), (42, True, 8 + 2 * 8)],
    ids=["whole", "partial-last-chunk", "fetched", "fetched-partial-last-chunk"],
)
def test_read_memory_of_the_fast_reader_reading_whole_chunks(monkeypatch, m, fetched, expected):
    """Tasks of 16 samples, chunks of 8: a scratch chunk for the array's partial last chunk, and the
    encoded chunks a fetched read holds (2 at once), are counted; mapped local files hold none."""
    monkeypatch.delenv("DCONV_FAST_READ", raising=False)
    assert read_memory(16, m, 8, 1, fetched=fetched) == expected
    assert read_memory(16, m, 8, 1, fast_reader=False) == 2 * 2 * 8
    assert read_memory(4, m, 8, 1, fetched=fetched) == 2 * 8  # a cut: zarr's term, larger than the fast reader's


def test_the_plan_knows_how_each_input_is_read(make_input, tmp_path):
    plan = plan_job(make_input(m=40, chunk=4, padding=1), tmp_path / "out.zarr", batch_chunk=4)
    assert plan.input_reads == {"A_prev": "blosc/mapped", "dZ": "blosc/mapped"}

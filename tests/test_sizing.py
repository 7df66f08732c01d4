"""dconv.sizing: the memory bound of a task (input chunks that tasks cut count whole, as
dconv.store.read_memory says a read holds them), the --max-memory messages, small tasks."""

from __future__ import annotations

import tracemalloc

import pytest

from dconv import InputError
from dconv.plan import plan_job
from dconv.sizing import SmallTask, small_task, task_memory
from dconv.store import read_memory

from _plans import plan_in_memory


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


# --------------------------------------------------------------------------- small tasks


def test_small_task_names_the_work_of_a_task_and_the_fewest_samples_that_are_enough(tmp_path):
    """make-inputs' default layer: 18.9 MFLOP and 1024 pixels a sample; 2 GFLOP make 106 samples enough."""
    plan = plan_in_memory(tmp_path)
    one = small_task(1, plan.shapes, plan.geometry)
    assert one == SmallTask(flops=4 * 32 * 32 * 3 * 3 * 16 * 32, pixels=32 * 32, enough=106)
    assert small_task(105, plan.shapes, plan.geometry).enough == 106
    assert small_task(106, plan.shapes, plan.geometry) is None


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

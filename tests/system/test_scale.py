"""The job at scale: many worker processes, the tree submitted in waves, resume from a frontier of records.

One LocalCluster of 8 worker processes on 127.0.0.1 (1 thread each) runs 108
tiny chunk tasks in 4 waves of 27 chunks (at least 4 chunks per worker thread,
whatever ``wave_chunks`` asks): the bits are those of a synchronous run in this
process, every combine the scheduler receives adds at most ``split_every``
partials, the scheduler never holds the whole graph, and losing two workers
mid-job changes nothing.
"""

from __future__ import annotations

import os
import signal
import threading

import dask
import pytest

import dconv
from _fault_helpers import assert_bitwise_equal
from conftest import wait_until
from dconv.graph import CHUNK_PREFIX, COMBINE_PREFIX, aggregate
from dconv.job import run_job
from dconv.plan import plan_job
from dconv.store.output import level_counts
from dconv.waves import WAVES_IN_FLIGHT, Waves, compute_in_waves

distributed = pytest.importorskip("distributed")

# 108 chunks of 2 samples, fan-in 3: a tree of depth 5; on 8 workers, waves of 27 chunks (depth 3), 4 of them
INPUT = dict(m=216, height=8, width=8, in_channels=4, out_channels=4, chunk=2, dtype="float32", seed=5)
BATCH_CHUNK, SPLIT_EVERY, WAVE_CHUNKS = 2, 3, 9
N_CHUNKS = INPUT["m"] // BATCH_CHUNK
TIMEOUT = 120


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input, and the output of one synchronous run in this process (one wave: the whole tree)."""
    root = tmp_path_factory.mktemp("scale")
    inputs = dconv.make_inputs(str(root / "input.zarr"), **INPUT)
    reference = root / "reference.zarr"
    dconv.backward_job(inputs, reference, batch_chunk=BATCH_CHUNK, split_every=SPLIT_EVERY, scheduler="synchronous")
    return inputs, reference


class SubmittedTasks(distributed.diagnostics.plugin.SchedulerPlugin):
    """Records, as graphs reach the scheduler, each combine task's fan-in (the partials it is given to add,
    its fourth argument) and how many tasks the scheduler holds."""

    def __init__(self) -> None:
        self.fan_in: dict = {}
        self.chunk_tasks = 0
        self.graphs_with_chunks = 0
        self.most_tasks = 0

    def update_graph(self, scheduler, *, tasks, **kwargs) -> None:
        chunks = 0
        for key in tasks:
            name = str(key[0]) if isinstance(key, tuple) else str(key)
            if name.startswith(COMBINE_PREFIX):
                self.fan_in[key] = len(list(scheduler.tasks[key].run_spec.args[3]))
            chunks += name.startswith(CHUNK_PREFIX)
        self.chunk_tasks += chunks
        self.graphs_with_chunks += chunks > 0
        self.most_tasks = max(self.most_tasks, len(scheduler.tasks))


@pytest.fixture(scope="module")
def eight_workers():
    with distributed.LocalCluster(
        n_workers=8,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as client:
        yield cluster, client


def run_in_waves(plan, wave_chunks: int = WAVE_CHUNKS, **where) -> dict:
    """Open (or resume) the output, compute its tree in waves, finish it; the finished values."""
    finished = plan.open_output()
    graph = plan.graph(stored=plan.out.frontier() if finished.any() else None, wave_chunks=wave_chunks)
    total = compute_in_waves(graph, **where)
    values = aggregate(total, plan.out.layout)
    plan.out.finish(values, simd={"chunks": level_counts(total.levels)})
    return values


def plan_for(inputs, out, **options):
    return plan_job(inputs, out, batch_chunk=BATCH_CHUNK, split_every=SPLIT_EVERY, **options)


def test_eight_workers_in_waves_give_the_bits_of_one_process(job, eight_workers, tmp_path):
    inputs, reference = job
    cluster, client = eight_workers
    assert len(client.scheduler_info()["workers"]) == 8
    seen = SubmittedTasks()
    cluster.scheduler.add_plugin(seen, name="submitted-tasks")
    try:
        run_in_waves(plan_for(inputs, tmp_path / "out.zarr"), client=client)
    finally:
        cluster.scheduler.remove_plugin(name="submitted-tasks")
    assert_bitwise_equal(tmp_path / "out.zarr", reference)
    # every chunk once, in 4 waves of 27 chunks; the scheduler never held the whole tree (163
    # tasks), only the waves in flight and, until its release reaches it, the one finished last
    assert seen.chunk_tasks == N_CHUNKS and seen.graphs_with_chunks == 4
    tasks_per_wave = 27 + 9 + 3 + 1 + 1  # chunks, three combine levels, the wave's step-times task
    assert seen.most_tasks <= (WAVES_IN_FLIGHT + 1) * tasks_per_wave + 1, seen.most_tasks  # + the job's context
    # every combine of the tree (36 + 12 + 4 + 2 + 1 nodes), each adding at most split_every partials
    assert len(seen.fan_in) == 36 + 12 + 4 + 2 + 1
    assert all(1 <= fan_in <= SPLIT_EVERY for fan_in in seen.fan_in.values()), seen.fan_in


def test_a_resume_from_a_frontier_of_records_gives_the_same_bits(job, tmp_path):
    """Nodes of several depths stored by a first run: the resume reads them back and computes only the rest."""
    inputs, reference = job
    out = tmp_path / "out.zarr"
    first = plan_for(inputs, out)
    first.open_output()
    graph = first.graph()
    stored = [(2, 0), (1, 4), (0, 15), (3, 1)]  # chunks 0-8, 12-14, 15, 27-53 (of 108)
    for node in stored:
        tasks = {**graph.subtree(node), graph.context_key: graph.make_context_task()}
        dask.get(tasks, graph.key(node))
    # a combine drops its children's records: only the four nodes are left
    assert first.out.stored_nodes() == set(stored)
    assert first.out.frontier() == sorted(stored, key=lambda node: node[1] * SPLIT_EVERY ** node[0])

    resumed = run_job(plan_for(inputs, out, resume=True), scheduler="threads")
    assert resumed.computed_chunks == N_CHUNKS - (9 + 3 + 1 + 27)
    assert sum(resumed.simd.values()) == N_CHUNKS
    assert_bitwise_equal(out, reference)


@pytest.mark.parametrize("wave_chunks, depth", [(1, 1), (26, 2), (27, 3)])
def test_wave_boundaries_do_not_change_the_bits(job, tmp_path, wave_chunks, depth):
    """Waves of 3, 9 and 27 chunks (the reference ran as one wave), one after another in this process."""
    inputs, reference = job
    plan = plan_for(inputs, tmp_path / "out.zarr")
    assert Waves(plan.graph(wave_chunks=wave_chunks)).depth == depth
    run_in_waves(plan, wave_chunks, scheduler="threads")
    assert_bitwise_equal(tmp_path / "out.zarr", reference)


def test_losing_two_workers_mid_job_is_survived(job, eight_workers, tmp_path):
    """Two worker processes are killed (SIGKILL) once some chunks are done; their nannies restart them."""
    inputs, reference = job
    cluster, client = eight_workers
    plan = plan_for(inputs, tmp_path / "out.zarr")
    pids = sorted(client.run(os.getpid).values())
    killed_at: list[int] = []

    def kill_two_workers() -> None:
        def started() -> bool:
            try:
                return plan.out.done_chunks().sum() >= 6
            except Exception:  # the output is not created yet
                return False

        if wait_until(started, timeout=TIMEOUT):
            killed_at.append(int(plan.out.done_chunks().sum()))
            for pid in pids[:2]:
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_two_workers, daemon=True)
    killer.start()
    run_in_waves(plan, client=client)
    killer.join()
    assert killed_at and killed_at[0] < N_CHUNKS, f"the workers were killed after {killed_at} of {N_CHUNKS} chunks"
    assert_bitwise_equal(tmp_path / "out.zarr", reference)
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 8, timeout=TIMEOUT)
    assert not set(pids[:2]) & set(client.run(os.getpid).values())

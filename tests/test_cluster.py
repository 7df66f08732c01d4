"""dconv.cluster: ClusterOptions validation, the local cluster layout, and reaching a scheduler."""

from __future__ import annotations

import json
import os
import sys
import time

import dask
import pytest

from dconv import InputError
from dconv.cluster import ClusterOptions, available_cores, connect, local_cluster_layout

from conftest import free_port


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(InputError, match="workers must be an int >= 1"):
        ClusterOptions(workers=workers)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"wait_workers": 0}, "wait_workers must be an int >= 1; got 0 instead."),
        ({"wait_timeout": 0}, "wait_timeout must be a number > 0; got 0 instead."),
        ({"connect_timeout": "10"}, "connect_timeout must be a number > 0; got '10' instead."),
        ({"scheduler": "tcp://host"}, "scheduler must be a Dask scheduler address such as tcp://host:8786, or one of "
                                      "threads, synchronous; got 'tcp://host' instead."),
    ],
)
def test_waiting_and_scheduler_values_are_checked(given, message):
    with pytest.raises(InputError) as error:
        ClusterOptions(**given)
    assert str(error.value) == message


def test_a_local_scheduler_is_no_cluster():
    assert ClusterOptions(scheduler="threads").local == "threads" and ClusterOptions(scheduler="tcp://h:1").local is None


@pytest.mark.parametrize(
    "given",
    [
        {"workers": 2, "scheduler": "tcp://127.0.0.1:8786"},
        {"workers": 2, "scheduler_file": "scheduler.json"},
        {"scheduler": "tcp://127.0.0.1:8786", "scheduler_file": "scheduler.json"},
    ],
)
def test_workers_scheduler_and_scheduler_file_exclude_each_other(given):
    with pytest.raises(InputError, match=f"either workers .* or scheduler .*; got {' and '.join(given)}"):
        ClusterOptions(**given)


@pytest.mark.parametrize(
    "base, given",
    [
        (ClusterOptions(workers=2), {"scheduler_file": "scheduler.json"}),
        (ClusterOptions(scheduler="tcp://127.0.0.1:8786"), {"scheduler_file": "scheduler.json"}),
        (ClusterOptions(scheduler_file="scheduler.json"), {"workers": 2}),
        (ClusterOptions(scheduler_file="scheduler.json"), {"scheduler": "tcp://127.0.0.1:8786"}),
    ],
)
def test_giving_where_a_job_runs_replaces_where_the_base_said(base, given):
    """A spec's `workers = 2` under `--scheduler-file F`: F wins, as any of the three over any other."""
    assert ClusterOptions.build(base, **given) == ClusterOptions(**given)


def test_only_no_scheduler_means_the_embedded_cluster():
    assert ClusterOptions().embedded and ClusterOptions(workers=3).embedded
    assert not ClusterOptions(scheduler="tcp://127.0.0.1:8786").embedded
    assert not ClusterOptions(scheduler_file="scheduler.json").embedded


def test_layout_uses_every_core_once():
    cores = available_cores()
    n_workers, blas = local_cluster_layout(None)
    assert (n_workers, blas) == (cores, 1)
    for workers in (1, 2, 3, cores):
        n_workers, blas = local_cluster_layout(workers)
        assert n_workers == workers and blas == max(1, cores // workers)
        assert n_workers * blas <= max(cores, workers)


def test_cores_are_dasks_count_within_the_affinity_mask():
    """dask.system.cpu_count also honours a cgroup CPU quota, which the affinity mask does not show."""
    from dask.system import cpu_count

    assert available_cores() == cpu_count() <= len(os.sched_getaffinity(0))


def test_no_tls_means_no_security():
    assert ClusterOptions(scheduler="tcp://127.0.0.1:8786").security() is None


def test_connect_to_nothing_fails_within_the_timeout():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(InputError, match=f"Dask scheduler.* at '{address}'"):
        with connect(ClusterOptions(scheduler=address, connect_timeout=0.5), quiet=True):
            pass
    assert time.monotonic() - start < 8


def reach(path, timeout=0.3, **tls):
    with connect(ClusterOptions(scheduler_file=str(path), connect_timeout=timeout, **tls), quiet=True):
        pass


def test_a_missing_scheduler_file_is_waited_for_then_named(tmp_path, monkeypatch):
    """A scheduler writes its file as it starts: dconv waits connect_timeout for it, then names it and where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"scheduler_file must name a Dask scheduler file .*; 'nothing.json' "
                       rf"\(in {tmp_path}\) did not appear within 0.3 s\."):
        reach("nothing.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type": "Scheduler"}', "holds no address"),
        ("{not json", "holds no address"),
        ('["tcp://127.0.0.1:1"]', "holds no address"),
    ],
)
def test_a_scheduler_file_without_an_address_is_refused(tmp_path, text, message):
    path = tmp_path / "scheduler.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"scheduler_file must name a Dask scheduler file .*'{path}' {message}"):
        reach(path)


def test_an_unreadable_scheduler_file_is_refused_at_once(tmp_path):
    """A directory, say: no waiting, the reason in one line."""
    start = time.monotonic()
    with pytest.raises(InputError, match=f"scheduler_file must name .*; cannot read '{tmp_path}': "):
        reach(tmp_path, timeout=30)
    assert time.monotonic() - start < 10


def test_a_scheduler_file_of_a_scheduler_that_is_gone(tmp_path):
    """The file is there, nothing listens at its address: one line naming both, within the timeout."""
    address = f"tcp://127.0.0.1:{free_port()}"
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"type": "Scheduler", "address": address}))
    with pytest.raises(InputError, match=rf"Dask scheduler.* at '{address}' \(from scheduler_file '{path}'\)"):
        reach(path, timeout=0.5)


def test_a_tls_address_in_a_scheduler_file_needs_tls_material(tmp_path):
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    with pytest.raises(InputError, match="scheduler 'tls://127.0.0.1:1' uses TLS; give tls_ca_file"):
        reach(path)


@pytest.mark.cluster
def test_the_embedded_cluster_serves_its_dashboard_and_sets_the_memory_limit():
    """The link dconv prints answers with the dashboard itself, not distributed's "Dask needs bokeh" page;
    each worker's memory_limit is the one given (the plan's, in a job)."""
    from urllib.request import urlopen

    limit = 300 * 2**20 + 12345
    with connect(ClusterOptions(workers=1), memory_limit=limit, quiet=True) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [worker["memory_limit"] for worker in workers] == [limit]
        # the statistical profiler, whose hour of samples grows a worker with the job's length, is off
        assert list(client.run(dask.config.get, "distributed.worker.profile.enabled").values()) == [False]
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:"), link
        with urlopen(link, timeout=30) as response:
            page = response.read().decode("utf-8", "replace")
            assert response.status == 200
    assert "Dask needs bokeh" not in page and "<html" in page.lower(), page[:300]


def _start_environment() -> dict[str, str]:
    """This process's environment as it started (what glibc read), not as Python has changed it since."""
    with open("/proc/self/environ", "rb") as f:
        pairs = [entry.decode("utf-8", "replace").partition("=") for entry in f.read().split(b"\0") if entry]
    return {name: value for name, _, value in pairs}


@pytest.mark.cluster
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/environ")
def test_embedded_workers_start_with_dconvs_malloc_settings(monkeypatch):
    """Each embedded worker process starts with WORKER_MALLOC_ENV (not distributed's
    MALLOC_TRIM_THRESHOLD_=65536), even after another cluster left distributed's setting in this
    process's environment; this process's environment is as it was once the cluster is up."""
    import os

    from dconv.cluster import BLAS_THREAD_VARIABLES, WORKER_MALLOC_ENV

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what a distributed nanny leaves behind
    with connect(ClusterOptions(workers=1), quiet=True) as client:
        [started] = client.run(_start_environment).values()
        [now] = client.run(lambda: dict(os.environ)).values()
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert {name: started.get(name) for name in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    blas_threads = str(local_cluster_layout(1)[1])
    assert {name: now[name] for name in BLAS_THREAD_VARIABLES} == dict.fromkeys(BLAS_THREAD_VARIABLES, blas_threads)


@pytest.mark.parametrize("argv", [["--version"], ["inspect", "{out}"]])
def test_commands_without_a_cluster_do_not_import_distributed(tmp_path, argv):
    """`dconv --version` and `dconv inspect` never start a cluster, so they leave distributed unimported."""
    import subprocess

    from dconv import backward_job, make_inputs

    make_inputs(str(tmp_path / "in.zarr"), m=8, chunk=4)
    out = tmp_path / "out.zarr"
    backward_job(str(tmp_path / "in.zarr"), str(out), batch_chunk=4, scheduler="threads")
    code = (
        "import sys\nfrom dconv.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:  # --version\n"
        "    code = e.code or 0\n"
        "print('distributed' in sys.modules, code)"
    )
    args = [part.format(out=out) for part in argv]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False 0", result.stdout + result.stderr


def test_the_embedded_workers_do_not_import_the_script_that_starts_them(tmp_path):
    """A script whose top level holds 300 MiB (as one importing PyTorch does): spawned workers that ran it again
    would hold more than their memory limit and be killed at start, again and again; the job must just run."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import numpy as np\n"
        "import dconv\n"
        "BALLAST = np.ones(300 * 2**20, dtype=np.uint8)  # touched: resident in every process that runs this\n"
        "dconv.make_inputs('in.zarr', m=16, height=6, width=6, in_channels=2, out_channels=3)\n"
        "print(dconv.backward_job('in.zarr', 'out.zarr', cluster=dconv.ClusterOptions(workers=1)).describe())\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 of 1 chunks computed" in result.stdout

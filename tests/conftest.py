"""Shared fixtures: seeded inputs, a real local Dask cluster, real scheduler/worker clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Worker processes run the kernel single-threaded, as the embedded cluster does.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# `python -m dconv` and `dask worker` subprocesses import the installed dconv (with its compiled
# helper), never the checkout in the working directory: results they write are compared bit for bit.
os.environ["PYTHONSAFEPATH"] = "1"


def _test_the_installed_dconv() -> None:
    """``python -m pytest`` puts the checkout first on sys.path, and there ``import dconv`` finds
    the source tree, which has no compiled module, before the installed package. Test the
    installed package, as ``.venv/bin/pytest`` does: drop the checkout from sys.path when a
    (non-editable) install of dconv lives elsewhere."""
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    # the checkout's own dconv.egg-info (from pip's build) is a distribution too: look past it
    installed = [
        Path(dist.locate_file("dconv/__init__.py")).resolve() for dist in metadata.distributions(name="dconv")
    ]
    if not any(path.is_file() and path.parent != root / "dconv" for path in installed):
        return  # not installed, or installed editable from this checkout: the checkout is the package
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


_test_the_installed_dconv()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_command() -> list[str]:
    """The `dask` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [shutil.which("dask") or "dask"]


def dconv_command() -> list[str]:
    """The `dconv` CLI, run with this interpreter."""
    return [sys.executable, "-m", "dconv"]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261126)


@pytest.fixture
def make_input(tmp_path):
    """Factory: write a seeded input group under tmp_path and return its path."""
    from dconv.store import make_inputs

    counter = iter(range(10_000))

    def make(**kwargs) -> str:
        path = str(tmp_path / f"input-{next(counter)}.zarr")
        kwargs.setdefault("m", 20)
        kwargs.setdefault("height", 8)
        kwargs.setdefault("width", 8)
        kwargs.setdefault("in_channels", 3)
        kwargs.setdefault("out_channels", 4)
        kwargs.setdefault("chunk", 7)
        kwargs.setdefault("dtype", "float64")
        return make_inputs(path, **kwargs)

    return make


@pytest.fixture(scope="session")
def client():
    """A distributed Client on a real 2-worker, 1-thread-each LocalCluster on 127.0.0.1."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    ) as cluster, distributed.Client(cluster) as c:
        yield c


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _spawn(logs: Path, name: str, args: list[str], processes: list[subprocess.Popen]) -> subprocess.Popen:
    """Start ``dask ARGS`` with its output in ``logs/NAME.log``; add it to ``processes``."""
    log = open(logs / f"{name}.log", "w")
    process = subprocess.Popen(dask_command() + args, stdout=log, stderr=subprocess.STDOUT)
    processes.append(process)
    return process


def _worker_args(address: str, name: str) -> list[str]:
    return [
        "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
        "--no-nanny", "--dashboard-address", "127.0.0.1:0", "--name", name,
    ]


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1; yields the address.

    The workers are single-threaded. Each worker's PID is in the address dict
    under "worker_pids" so fault tests can kill one.
    """
    distributed = pytest.importorskip("distributed")
    logs = tmp_path_factory.mktemp("dask-logs")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []
    try:
        _spawn(logs, "scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"], processes)
        for i in range(2):
            _spawn(logs, f"worker-{i}", _worker_args(address, f"w{i}"), processes)
        with distributed.Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield {"address": address, "worker_pids": [p.pid for p in processes[1:]], "processes": processes}
    finally:
        _stop(processes)


BASELINE_ONLY_PRELOAD = '''"""`dask worker --preload`: this worker stands for a CPU that runs the baseline SIMD level only."""
import dconv.simd

dconv.simd.simd_levels = lambda: ["baseline"]
'''


@pytest.fixture(scope="session")
def mixed_levels_cluster(tmp_path_factory):
    """A `dask scheduler` with two `dask worker` processes, one of which reports that its CPU runs
    only the baseline SIMD level (a ``--preload`` script); yields the addresses.

    Yields ``{"address": scheduler, "baseline_worker": that worker's address}``.
    """
    distributed = pytest.importorskip("distributed")
    logs = tmp_path_factory.mktemp("mixed-levels")
    preload = logs / "baseline_only_cpu.py"
    preload.write_text(BASELINE_ONLY_PRELOAD)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []
    try:
        _spawn(logs, "scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"], processes)
        _spawn(logs, "worker-this-cpu", _worker_args(address, "this-cpu"), processes)
        _spawn(logs, "worker-baseline", _worker_args(address, "baseline-only") + ["--preload", str(preload)], processes)
        with distributed.Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
            workers = c.scheduler_info()["workers"]
        baseline = next(worker for worker, info in workers.items() if info["name"] == "baseline-only")
        yield {"address": address, "baseline_worker": baseline}
    finally:
        for worker in processes[1:]:  # workers first, killed: they hold nothing (SIGTERM took 15 s each)
            worker.kill()
            worker.wait()
        _stop(processes[:1])


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

"""Shared fixtures: seeded inputs, a real local Dask cluster, real scheduler/worker clusters, and
`python -m dconv` forked from a process that has imported dconv (``forked_dconv``)."""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def _stop_cluster(processes: list[subprocess.Popen]) -> None:
    """Stop a `dask scheduler` (``processes[0]``) and its workers: the workers first, killed, since they
    hold nothing (SIGTERM took 15 s each), then the scheduler."""
    for worker in processes[1:]:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    _stop(processes[:1])


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
        _stop_cluster(processes)


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
        _stop_cluster(processes)


@pytest.fixture(autouse=True, scope="session")
def _sigint_deliverable() -> Iterator[None]:
    """The interrupt tests send SIGINT to this process and to the jobs it starts. Where pytest was started
    with SIGINT ignored (a background job of a non-interactive shell, ``nohup``), take Python's handler back:
    a job started from here then gets the default action, as from a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


# --------------------------------------------------------------------------- `python -m dconv`, forked

# The server behind `forked_dconv`: it imports what a CLI run imports, once, then forks a child per
# request that runs `python -m dconv ARGS` (runpy) with its stdout and stderr in files, in its cwd.
FORK_SERVER = r"""
import atexit, json, os, runpy, select, signal, sys, threading, traceback

import dask.array, distributed, numpy, zarr  # noqa: F401  what a job imports
import dconv, dconv.cli, dconv.job  # noqa: F401
try:
    import s3fs  # noqa: F401  what a job on s3:// imports
except ImportError:
    pass
assert threading.active_count() == 1, threading.enumerate()  # fork a single-threaded process only


def exit_code(error):
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)  # as the interpreter does
    return 1


def child(request):
    code = 1
    try:
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        streams = ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write), (2, request["stderr"], write))
        for fd, path, flags in streams:
            os.dup2(os.open(path, flags, 0o600), fd)
        if request["cwd"] is not None:
            os.chdir(request["cwd"])
        for name, value in request["env"].items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        sys.argv = ["-m", *request["args"]]
        try:
            runpy.run_module("dconv", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = exit_code(e)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve():
    children, pending, open_ = {}, b"", True
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while open_ or children:
        ready, _, _ = select.select([0] if open_ else [], [], [], 0.02 if children else None)
        if ready:
            data = os.read(0, 1 << 16)
            open_, pending = bool(data), pending + data
            *lines, pending = pending.split(b"\n")
            for request in map(json.loads, lines):
                if "kill" in request:
                    pid = next((pid for pid, n in children.items() if n == request["kill"]), None)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                    continue
                pid = os.fork()
                if pid == 0:
                    child(request)
                children[pid] = request["id"]
            if not open_:  # pytest went away: so do the children
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(json.dumps({"id": children.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


serve()
"""

# Variables a forked run may set: dconv reads them when it runs, not at import (the server imported it);
# botocore reads the AWS_* ones (FORKED_ENV_PREFIX) and the proxy settings when a job opens an s3:// store.
FORKED_ENV = {"DCONV_SIMD", "NO_PROXY", "no_proxy"}
FORKED_ENV_PREFIX = "AWS_"


class ForkedDconv:
    """``python -m dconv ARGS`` in processes forked from one that has imported dconv: a run costs no import.

    Each run is a process of its own: its exit code, stdout and stderr are its
    own, so exit codes, "one line on stderr" and "no traceback" are checked as
    for ``subprocess.run``. What differs from a fresh interpreter: the modules
    are imported once, by the server (which checks that importing prints
    nothing), so only variables read at run time may be set (``FORKED_ENV``).
    Safe to call from several threads at once.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.server_log = logs / "server.log"
        script = logs / "fork_server.py"
        script.write_text(FORK_SERVER)
        with open(self.server_log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, bufsize=1,
            )
        ready = self.process.stdout.readline()
        if not ready.startswith('{"ready"'):
            self.close()
            raise RuntimeError(f"the dconv fork server did not start:\n{self.server_log.read_text()}")
        if self.server_log.read_text():
            self.close()
            raise RuntimeError(f"importing dconv printed on stderr:\n{self.server_log.read_text()}")
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue] = {}
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            reply = json.loads(line)
            with self._lock:
                self._waiting.pop(reply["id"]).put(reply["returncode"])
        with self._lock:  # the server died: nobody gets an answer
            for waiting in self._waiting.values():
                waiting.put(None)

    def _send(self, request: dict) -> None:
        with self._lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()

    def run(self, args: Sequence[Any], *, cwd: Any = None, env: dict | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess:
        """``dconv ARGS``: text output captured; killed after ``timeout`` seconds (subprocess.TimeoutExpired)."""
        env = env or {}
        if any(name not in FORKED_ENV and not name.startswith(FORKED_ENV_PREFIX) for name in env):
            raise ValueError(
                f"env must name only {sorted(FORKED_ENV)} or {FORKED_ENV_PREFIX}*; got {sorted(env)} instead."
            )
        number, answer = next(self._ids), queue.Queue()
        args = [str(a) for a in args]
        stdout, stderr = self.logs / f"{number}.out", self.logs / f"{number}.err"
        with self._lock:
            self._waiting[number] = answer
        self._send({"id": number, "args": args, "cwd": None if cwd is None else str(cwd), "env": env,
                    "stdout": str(stdout), "stderr": str(stderr)})
        try:
            code = answer.get(timeout=timeout)
        except queue.Empty:
            self._send({"kill": number})
            answer.get(timeout=30)
            raise subprocess.TimeoutExpired(["dconv", *args], timeout) from None
        if code is None:
            raise RuntimeError(f"the dconv fork server died:\n{self.server_log.read_text()}")
        return subprocess.CompletedProcess(["dconv", *args], code, stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def forked_dconv(tmp_path_factory) -> Iterator[ForkedDconv]:
    """Runs ``dconv ARGS`` as a process of its own, without the import (:class:`ForkedDconv`)."""
    server = ForkedDconv(tmp_path_factory.mktemp("forked-dconv"))
    yield server
    server.close()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

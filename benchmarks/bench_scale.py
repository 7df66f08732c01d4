"""Scaling benchmarks: per-task overhead, memory as m grows, bookkeeping at 100,000 chunks, model figures.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command
only (see benchmarks/README.md)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scale.py overhead
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scale.py memory
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scale.py bookkeeping
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scale.py model

Subcommands (each prints the CPU model, dconv's SIMD level and the BLAS that ran first,
and writes its figures as JSON with ``--json PATH``):

- ``overhead``: dconv's many-task job against a plain Dask job of the same I/O shape
  (``da.from_zarr(A_prev) * 2 -> to_zarr``, plus a tree-reduced sum of ``dZ``), over the
  same input store, on the same 2-worker LocalCluster, in interleaved rounds; the medians
  and their ratio (issue 15's target: dconv / peer <= 1.2).
- ``memory``: peak RSS of every process of a ``dconv backward`` command on the embedded
  cluster, summed, at m and 32 m with the same batch chunk (target: <= 1.05x); and the
  client process's own peak (it hosts the scheduler) at 1,000 and 20,000 tasks, as KiB
  per task (target: <= 2).
- ``bookkeeping``: an output of 100,000 chunks, written by the real chunk task in this
  process with some chunks left undone; then the wall time of ``dconv inspect`` and of
  the start of its resume (target: each <= 5 s on local disk).
- ``model``: the figures of the scaling model in docs/DESIGN.md: the scheduler's
  throughput for no-op tasks, the plain Dask peer's time per task, local disk and S3
  (moto server on 127.0.0.1) bandwidth for 8 MB blocks.

dconv is driven only through its CLI and its public Python API (``dconv.make_inputs``,
``dconv.plan_job``, ``dconv.backward_job``, ``dconv.summarize``), so the script keeps
working while the internals change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr

import dconv

TINY_LAYER = dict(height=8, width=8, in_channels=3, out_channels=4, kernel=3, padding=1, dtype="float32")
"""The overhead and bookkeeping layer: 8x8x3 -> 4, 3x3, pad 1, float32 (the issue's tiny chunks)."""

MEMORY_LAYER = dict(height=8, width=8, in_channels=4, out_channels=4, kernel=3, padding=1, dtype="float32")
"""The memory layer: 8x8x4 samples keep m = 2**20 at about 1 GiB of inputs."""

BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

MiB = 2**20


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """lscpu's "Model name" (else /proc/cpuinfo's "model name")."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                return value.strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return "unknown"


def blas_kernels() -> list[dict[str, Any]]:
    """What threadpoolctl reports for each BLAS/OpenMP library loaded in this process."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads")
    return [{key: info.get(key) for key in keys if info.get(key) is not None} for info in threadpool_info()]


def machine() -> dict[str, Any]:
    """The CPU, dconv's SIMD level and the BLAS; printed at the top of every subcommand."""
    np.ones((4, 4)) @ np.ones((4, 4))  # loads the BLAS, so threadpoolctl sees it
    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": dconv.version_text(),
        "blas": blas_kernels(),
        "versions": _versions(),
        "load_average": os.getloadavg(),
    }
    print(f"CPU: {info['cpu']}, {info['cores']} cores; load average {', '.join(f'{x:.1f}' for x in info['load_average'])}")
    print(f"SIMD: {info['simd']}")
    print(f"BLAS: {info['blas']}")
    print(f"versions: {info['versions']}")
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            print(f"warning: {name}={os.environ[name]} is set; unset it for benchmarks (benchmarks/README.md)")
    return info


def _versions() -> dict[str, str]:
    import dask
    import distributed
    import zarr

    return {"dconv": dconv.__version__, "numpy": np.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "zarr": zarr.__version__, "python": sys.version.split()[0]}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """``path`` (kept), or a temporary directory removed afterwards."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="dconv-scale-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_inputs_once(path: Path, m: int, chunk: int, layer: dict[str, Any]) -> str:
    """Make a seeded input group at ``path`` unless a finished one with this shape is there."""
    marker = path / ".bench-complete"
    wanted = json.dumps({"m": m, "chunk": chunk, **layer}, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        return str(path)
    start = time.perf_counter()
    dconv.make_inputs(str(path), m=m, chunk=chunk, seed=1, overwrite=True, **layer)
    marker.write_text(wanted)
    print(f"  made {path.name}: m = {m}, chunk {chunk} ({time.perf_counter() - start:.1f} s)", flush=True)
    return str(path)


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[Any]:
    """A LocalCluster of ``workers`` single-threaded worker processes on 127.0.0.1, BLAS at 1 thread."""
    import logging

    import distributed

    env = {name: "1" for name in BLAS_VARIABLES}
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.ERROR, env=env) as cluster:
        with distributed.Client(cluster) as client:
            client.run(__import__, "dconv.graph")  # the workers import dconv and zarr before any timing
            yield client


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {path}")


def _process_cpu() -> float:
    return time.process_time()


def cpu_timed(client: Any, function: Callable[[], Any]) -> dict[str, float]:
    """Run ``function``: its wall seconds, and the CPU seconds it cost this process and the workers.

    This process is the client, and the LocalCluster's scheduler runs in it. CPU time is
    less sensitive than wall time to other work on a shared machine.
    """
    workers_before = client.run(_process_cpu)
    client_before, start = time.process_time(), time.perf_counter()
    function()
    wall, client_cpu = time.perf_counter() - start, time.process_time() - client_before
    workers_cpu = sum(client.run(_process_cpu).values()) - sum(workers_before.values())
    return {"wall": wall, "client_cpu": client_cpu, "worker_cpu": workers_cpu}


# ----------------------------------------------------------------------------- overhead


def dconv_round(client: Any, inputs: str, out: str) -> float:
    """Wall seconds of dconv's job on ``client``, one sample per task."""
    start = time.perf_counter()
    dconv.backward_job(inputs, out, client=client, overwrite=True, batch_chunk=1)
    return time.perf_counter() - start


def peer_round(inputs: str, out: str, split_every: int = 8) -> float:
    """Wall seconds of the plain Dask peer on the default (distributed) scheduler.

    The same I/O shape as a dconv task, without a kernel: read a chunk of ``A_prev``,
    write ``2 * A_prev`` uncompressed (as dconv writes ``dA_prev``), and read a chunk of
    ``dZ`` into a tree-reduced sum; both in one ``dask.compute``.
    """
    import dask
    import dask.array as da

    start = time.perf_counter()
    doubled = da.from_zarr(inputs, component="A_prev") * 2
    stored = da.to_zarr(doubled, out, component="dA_prev", mode="w", compute=False, compressors=None)
    total = da.from_zarr(inputs, component="dZ").sum(axis=0, split_every=split_every, dtype=np.float64)
    dask.compute(stored, total)
    return time.perf_counter() - start


def run_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """dconv's many-task job against the plain Dask peer, interleaved rounds on one cluster."""
    results: dict[str, Any] = {"machine": machine(), "tasks": args.tasks, "workers": args.workers,
                               "layer": TINY_LAYER, "rounds": []}
    print(f"overhead: {args.tasks} tasks of 1 sample (8x8x3 -> 4, 3x3, float32), {args.workers} workers x 1 thread, "
          f"{args.rounds} interleaved rounds")
    with workdir(args.workdir) as root:
        inputs = make_inputs_once(root / f"tiny-{args.tasks}.zarr", args.tasks, 1, TINY_LAYER)
        warmup = make_inputs_once(root / "tiny-warmup.zarr", 4 * args.workers, 1, TINY_LAYER)
        with local_cluster(args.workers) as client:
            dconv_round(client, warmup, str(root / "dconv-out.zarr"))  # first-use costs on the workers, untimed
            peer_round(warmup, str(root / "peer-out.zarr"))
            for round_index in range(1, args.rounds + 1):
                ours = cpu_timed(client, lambda: dconv_round(client, inputs, str(root / "dconv-out.zarr")))
                peer = cpu_timed(client, lambda: peer_round(inputs, str(root / "peer-out.zarr")))
                results["rounds"].append({"dconv": ours, "peer": peer})
                print(f"  round {round_index}: dconv {ours['wall']:6.2f} s (CPU: client {ours['client_cpu']:.1f} s, "
                      f"workers {ours['worker_cpu']:.1f} s), peer {peer['wall']:6.2f} s (CPU: client "
                      f"{peer['client_cpu']:.1f} s, workers {peer['worker_cpu']:.1f} s), ratio "
                      f"{ours['wall'] / peer['wall']:.2f}", flush=True)
    dconv_s = median([r["dconv"]["wall"] for r in results["rounds"]])
    peer_s = median([r["peer"]["wall"] for r in results["rounds"]])
    per_task = {name: seconds * args.workers / args.tasks * 1e3 for name, seconds in (("dconv", dconv_s), ("peer", peer_s))}
    results.update(dconv_median=dconv_s, peer_median=peer_s, ratio=dconv_s / peer_s, ms_per_task_per_worker=per_task)
    print(f"medians: dconv {dconv_s:.2f} s, peer {peer_s:.2f} s; dconv / peer = {dconv_s / peer_s:.2f} (target <= 1.2)")
    print(f"per task per worker: dconv {per_task['dconv']:.1f} ms, peer {per_task['peer']:.1f} ms")
    cpu = {name: {key: median([r[name][key] for r in results["rounds"]]) / args.tasks * 1e3
                  for key in ("client_cpu", "worker_cpu")} for name in ("dconv", "peer")}
    results["cpu_ms_per_task"] = cpu
    print("CPU per task (medians): " + "; ".join(
        f"{name} client and scheduler {c['client_cpu']:.2f} ms, workers {c['worker_cpu']:.2f} ms" for name, c in cpu.items()))
    return results


# ----------------------------------------------------------------------------- memory


def _peak_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) in KiB, from /proc; None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _role(process: Any, root_pid: int) -> str:
    """A short name for a process of the job: the client, a worker, or what its command line says."""
    if process.pid == root_pid:
        return "client (scheduler, nannies)"
    with contextlib.suppress(Exception):
        command = " ".join(process.cmdline())
        if "resource_tracker" in command:
            return "resource tracker"
        if "forkserver" in command:
            return "forkserver"
        if "multiprocessing" in command or "spawn" in command:
            return "worker"
        return command[:60]
    return "?"


def command_peaks(command: list[str], interval: float = 0.1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` and track the peak RSS of each of its processes.

    Every ``interval`` seconds the process tree is listed; each process's peak is the
    larger of its kernel high-water mark (VmHWM, exact between polls) and the RSS seen.

    Returns
    -------
    dict
        ``wall`` seconds, ``processes`` (pid -> role and peak bytes), ``sum`` of the
        per-process peaks, ``client`` the root process's peak, ``stdout``, ``stderr``.
    """
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, dict[str, Any]] = {}

    def poll() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):
                for member in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss = member.memory_info().rss
                        hwm = (_peak_kib(member.pid) or 0) * 1024
                        entry = peaks.setdefault(member.pid, {"role": _role(member, process.pid), "peak": 0})
                        entry["peak"] = max(entry["peak"], rss, hwm)
            time.sleep(interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    poller.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}: {stderr.strip()[-2000:]}")
    return {"wall": wall, "processes": peaks, "sum": sum(p["peak"] for p in peaks.values()),
            "client": peaks.get(process.pid, {"peak": 0})["peak"], "stdout": stdout, "stderr": stderr}


def dconv_command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "dconv", *(str(a) for a in args)]


def cli_make_inputs(path: Path, m: int, chunk: int, layer: dict[str, Any]) -> str:
    """``dconv make-inputs`` (the CLI), unless a finished group of this shape is at ``path``."""
    marker = path / ".bench-complete"
    wanted = json.dumps({"m": m, "chunk": chunk, **layer}, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        return str(path)
    start = time.perf_counter()
    subprocess.run(dconv_command("make-inputs", path, "--m", m, "--chunk", chunk, "--height", layer["height"],
                                 "--width", layer["width"], "--in-channels", layer["in_channels"],
                                 "--out-channels", layer["out_channels"], "--kernel", layer["kernel"],
                                 "--padding", layer["padding"], "--dtype", layer["dtype"], "--seed", 1,
                                 "--overwrite"), check=True)
    marker.write_text(wanted)
    print(f"  made {path.name}: m = {m}, chunk {chunk} ({time.perf_counter() - start:.1f} s)", flush=True)
    return str(path)


def backward_peaks(inputs: str, out: Path, batch_chunk: int, workers: int) -> dict[str, Any]:
    """Peaks of a whole ``dconv backward`` command on the embedded local cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    return command_peaks(dconv_command("backward", inputs, out, "--batch-chunk", batch_chunk, "--workers", workers,
                                       "--overwrite", "--quiet"), env=env)


def _print_peaks(label: str, run: dict[str, Any]) -> None:
    parts = ", ".join(f"{p['role']} {p['peak'] / MiB:.0f}" for p in sorted(run["processes"].values(),
                                                                         key=lambda p: -p["peak"]))
    print(f"  {label}: {run['wall']:.1f} s; summed peak {run['sum'] / MiB:.0f} MiB ({parts} MiB)", flush=True)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Summed peak RSS at m and factor x m; the client's growth per task."""
    results: dict[str, Any] = {"machine": machine(), "workers": args.workers, "layer": MEMORY_LAYER}
    big_m = args.m * args.factor
    print(f"memory: dconv backward (CLI, embedded cluster of {args.workers} workers), 8x8x4 -> 4, 3x3, float32")
    with workdir(args.workdir) as root:
        print(f"summed peak RSS at m = {args.m} and {big_m}, batch chunk {args.batch_chunk}:")
        runs = {}
        for m in (args.m, big_m):
            inputs = cli_make_inputs(root / f"mem-{m}.zarr", m, args.batch_chunk, MEMORY_LAYER)
            runs[m] = backward_peaks(inputs, root / f"mem-out-{m}.zarr", args.batch_chunk, args.workers)
            _print_peaks(f"m = {m} ({-(-m // args.batch_chunk)} tasks)", runs[m])
            shutil.rmtree(root / f"mem-out-{m}.zarr", ignore_errors=True)
        ratio = runs[big_m]["sum"] / runs[args.m]["sum"]
        print(f"  ratio {ratio:.3f} for {args.factor}x m (target <= 1.05)")

        print(f"client process (hosts the scheduler), batch chunk {args.task_batch_chunk}:")
        clients = {}
        for tasks in args.task_counts:
            m = tasks * args.task_batch_chunk
            inputs = cli_make_inputs(root / f"tasks-{m}.zarr", m, args.task_batch_chunk, MEMORY_LAYER)
            clients[tasks] = backward_peaks(inputs, root / f"tasks-out-{m}.zarr", args.task_batch_chunk, args.workers)
            _print_peaks(f"{tasks} tasks", clients[tasks])
            shutil.rmtree(root / f"tasks-out-{m}.zarr", ignore_errors=True)
        low, high = min(args.task_counts), max(args.task_counts)
        per_task = (clients[high]["client"] - clients[low]["client"]) / (high - low) / 1024
        print(f"  client peak {clients[low]['client'] / MiB:.1f} MiB at {low} tasks, "
              f"{clients[high]['client'] / MiB:.1f} MiB at {high}: {per_task:.2f} KiB per task (target <= 2)")

    def brief(run: dict[str, Any]) -> dict[str, Any]:
        return {"wall": run["wall"], "sum": run["sum"], "client": run["client"],
                "processes": {str(pid): p for pid, p in run["processes"].items()}}

    results.update(m=args.m, big_m=big_m, batch_chunk=args.batch_chunk, ratio=ratio,
                   runs={str(m): brief(run) for m, run in runs.items()},
                   task_batch_chunk=args.task_batch_chunk, client_kib_per_task=per_task,
                   clients={str(t): brief(run) for t, run in clients.items()})
    return results


# ----------------------------------------------------------------------------- bookkeeping


def undone_chunks(n_chunks: int, undone: int) -> set[int]:
    """``undone`` chunk indices spread evenly over the batch (the last chunk among them)."""
    if undone <= 0:
        return set()
    return {int(i) for i in np.linspace(n_chunks - 1, 0, num=min(undone, n_chunks)).round()}


def write_chunks(inputs: str, out: str, n_chunks: int, undone: set[int], threads: int) -> float:
    """Create the output and run every chunk's real task in this process, but ``undone``; seconds."""
    plan = dconv.plan_job(inputs, out, batch_chunk=1, overwrite=True)
    plan.open_output()
    todo = [i for i in range(n_chunks) if i not in undone]
    start = time.perf_counter()
    step = max(1, len(todo) // 10)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for count, _ in enumerate(pool.map(plan.run_chunk, todo), start=1):
            if count % step == 0:
                elapsed = time.perf_counter() - start
                print(f"  {count}/{len(todo)} chunks written ({elapsed:.0f} s)", flush=True)
    return time.perf_counter() - start


def write_records(inputs: str, out: str, n_chunks: int, undone: set[int], threads: int) -> float:
    """Create the output and write every chunk but ``undone`` through the chunk task's own write
    (``OutputStore.write_chunk``: its dA_prev block, then its leaf record), with the values of
    chunk 0 computed once: what ``write_chunks`` leaves, without reading and computing 100,000
    chunks. Seconds."""
    from dconv.graph import chunk_partial

    plan = dconv.plan_job(inputs, out, batch_chunk=1, overwrite=True)
    plan.open_output()
    group = zarr.open_group(inputs, mode="r")
    dZ, A_prev = (np.asarray(group[name][0:1]) for name in ("dZ", "A_prev"))
    values = chunk_partial(dZ, A_prev, plan.W, plan.geometry, plan.options)
    level = dconv.simd.active_level()
    todo = [i for i in range(n_chunks) if i not in undone]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda i: plan.out.write_chunk(i, i, values, level), todo))
    return time.perf_counter() - start


def chunks_started(out: Path) -> int:
    """How many dA_prev chunks are on disk (zarr's default chunk keys: one directory per index along m)."""
    with contextlib.suppress(OSError):
        return sum(1 for _ in os.scandir(out / "dA_prev" / "c"))
    return 0


def interrupted_job(inputs: str, out: Path, n_chunks: int, stop_at: float, workers: int) -> float:
    """A real ``dconv backward`` command on the embedded cluster, stopped with SIGINT (Ctrl-C)
    once ``stop_at`` of the chunks are written: what an interrupted job leaves. Seconds."""
    import signal

    command = dconv_command("backward", inputs, out, "--batch-chunk", 1, "--workers", workers, "--overwrite", "--quiet")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = 0.0
    while process.poll() is None and chunks_started(out) < stop_at * n_chunks:
        time.sleep(2)
        if time.perf_counter() - last > 60:
            last = time.perf_counter()
            print(f"  {chunks_started(out)}/{n_chunks} chunks written ({last - start:.0f} s)", flush=True)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    if process.returncode not in (130, 0):
        raise RuntimeError(f"dconv backward exited {process.returncode}: {stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def resume_start(inputs: str, out: str) -> dict[str, float]:
    """Seconds to plan the resume, reopen the output (reading what is done), read the stored
    tree-node records that a resume reuses (where the store keeps them) and build the graph."""
    plan_s, plan = timed(lambda: dconv.plan_job(inputs, out, batch_chunk=1, resume=True))
    open_s, finished = timed(plan.open_output)
    frontier_s, stored = timed(plan.out.frontier)
    graph_s, _ = timed(lambda: plan.graph(stored=stored))
    return {"plan": plan_s, "open_output": open_s, "frontier": frontier_s, "graph": graph_s,
            "total": plan_s + open_s + frontier_s + graph_s, "done": int(np.count_nonzero(finished)),
            "frontier_nodes": None if stored is None else len(stored)}


def stored_objects(path: Path) -> int:
    return sum(1 for item in path.rglob("*") if item.is_file())


def run_bookkeeping(args: argparse.Namespace) -> dict[str, Any]:
    """inspect and the start of a resume on an output of ``args.chunks`` chunks."""
    results: dict[str, Any] = {"machine": machine(), "chunks": args.chunks, "layer": TINY_LAYER}
    undone = undone_chunks(args.chunks, args.undone)
    if args.via == "chunks":
        print(f"bookkeeping: {args.chunks} chunks of 1 sample, each task run in this process, {len(undone)} left undone")
    elif args.via == "records":
        print(f"bookkeeping: {args.chunks} chunks of 1 sample, written by the chunk task's write with chunk 0's "
              f"values, {len(undone)} left undone")
    else:
        print(f"bookkeeping: {args.chunks} chunks of 1 sample, a dconv backward command stopped with SIGINT at "
              f"{args.stop_at:.0%} of the chunks")
    with workdir(args.workdir) as root:
        inputs = make_inputs_once(root / f"book-in-{args.chunks}.zarr", args.chunks, args.input_chunk, TINY_LAYER)
        out = root / f"book-out-{args.chunks}.zarr"
        try:
            if args.via == "chunks":
                results["write_seconds"] = write_chunks(inputs, str(out), args.chunks, undone, args.threads)
            elif args.via == "records":
                results["write_seconds"] = write_records(inputs, str(out), args.chunks, undone, args.threads)
            else:
                results["write_seconds"] = interrupted_job(inputs, out, args.chunks, args.stop_at, args.workers)
        except Exception as error:  # the store is being redesigned: say where it stopped
            print(f"  writing the chunks failed: {type(error).__name__}: {error}")
            results["error"] = f"write: {type(error).__name__}: {error}"
            return results
        progress = out / "_progress"
        results["progress_objects"] = stored_objects(progress) if progress.exists() else 0
        print(f"  wrote the chunks in {results['write_seconds']:.0f} s ({args.via}); "
              f"{results['progress_objects']} stored objects under _progress/")
        for round_index in range(1, args.rounds + 1):
            start = time.perf_counter()
            shown = subprocess.run(dconv_command("inspect", out, "--json"), capture_output=True, text=True)
            inspect_s = time.perf_counter() - start
            if shown.returncode not in (0, 3):  # 3: the output is incomplete, as it is here
                raise RuntimeError(f"dconv inspect exited {shown.returncode}: {shown.stderr.strip()}")
            summary = json.loads(shown.stdout)
            summarize_s, _ = timed(lambda: dconv.summarize(str(out)))
            resumed = resume_start(inputs, str(out))
            results.setdefault("rounds", []).append({"inspect_cli": inspect_s, "summarize": summarize_s,
                                                     "resume": resumed})
            print(f"  round {round_index}: dconv inspect {inspect_s:.2f} s (summarize in-process {summarize_s:.2f} s; "
                  f"{summary['chunks']['done']}/{summary['chunks']['total']} done); resume start {resumed['total']:.2f} s "
                  f"(plan {resumed['plan']:.2f}, open_output {resumed['open_output']:.2f}, frontier {resumed['frontier']:.2f} "
                  f"[{resumed['frontier_nodes']} nodes], graph {resumed['graph']:.2f})",
                  flush=True)
    inspect_s = median([r["inspect_cli"] for r in results["rounds"]])
    resume_s = median([r["resume"]["total"] for r in results["rounds"]])
    results.update(inspect_median=inspect_s, resume_median=resume_s)
    print(f"medians: dconv inspect {inspect_s:.2f} s, resume start {resume_s:.2f} s (targets <= 5 s each)")
    return results


# ----------------------------------------------------------------------------- model


def _noop(x: Any) -> Any:
    return x


def scheduler_throughput(client: Any, n_tasks: int) -> dict[str, float]:
    """``n_tasks`` independent no-op tasks as one graph: tasks per second, and CPU milliseconds per task
    of the client and scheduler (one process here) and of the workers together."""
    import dask

    tasks = [dask.delayed(_noop, pure=False)(i) for i in range(n_tasks)]
    run = cpu_timed(client, lambda: dask.compute(*tasks))
    return {"tasks_per_s": n_tasks / run["wall"], "client_cpu_ms": run["client_cpu"] / n_tasks * 1e3,
            "worker_cpu_ms": run["worker_cpu"] / n_tasks * 1e3}


def disk_write_bandwidth(root: Path, block: int, blocks: int) -> dict[str, float]:
    """MB/s writing ``blocks`` files of ``block`` bytes: into the page cache, and with fsync each."""
    data = np.random.default_rng(0).integers(0, 256, size=block, dtype=np.uint8).tobytes()
    target = root / "disk-bandwidth"
    target.mkdir(exist_ok=True)
    rates = {}
    for durable in (False, True):
        start = time.perf_counter()
        for i in range(blocks):
            with open(target / f"block-{durable}-{i}", "wb") as handle:
                handle.write(data)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
        rates["fsync" if durable else "page_cache"] = blocks * block / (time.perf_counter() - start) / 1e6
    shutil.rmtree(target, ignore_errors=True)
    return rates


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str | None]:
    """moto's S3 server on 127.0.0.1:<free port> (yields its URL), or None when moto is not installed."""
    script = Path(sys.executable).with_name("moto_server")
    if not script.exists():
        yield None
        return
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen([str(script), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                opener.open(endpoint + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:  # any HTTP answer: it is up
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_bandwidth(endpoint: str, block: int, blocks: int) -> dict[str, float]:
    """MB/s of ``blocks`` sequential PUTs and GETs of ``block`` bytes through s3fs."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench", skip_instance_cache=True)
    fs.mkdir("bench")
    data = np.random.default_rng(0).integers(0, 256, size=block, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    for i in range(blocks):
        fs.pipe_file(f"bench/block-{i}", data)
    put = blocks * block / (time.perf_counter() - start) / 1e6
    start = time.perf_counter()
    for i in range(blocks):
        if len(fs.cat_file(f"bench/block-{i}")) != block:
            raise RuntimeError(f"object bench/block-{i} came back short")
    get = blocks * block / (time.perf_counter() - start) / 1e6
    return {"put": put, "get": get}


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    """The scaling model's measured figures (docs/DESIGN.md, "Scaling model")."""
    results: dict[str, Any] = {"machine": machine(), "workers": args.workers}
    block = args.block_mb * 10**6
    with workdir(args.workdir) as root:
        with local_cluster(args.workers) as client:
            scheduler_throughput(client, 200)  # first-use costs, untimed
            peer_round(make_inputs_once(root / "tiny-warmup.zarr", 4 * args.workers, 1, TINY_LAYER),
                       str(root / "peer-out.zarr"))
            runs = [scheduler_throughput(client, args.noop_tasks) for _ in range(args.rounds)]
            figures = {key: median([run[key] for run in runs]) for key in runs[0]}
            results.update(scheduler_runs=runs, scheduler=figures)
            rates = ", ".join(f"{run['tasks_per_s']:.0f}" for run in runs)
            print(f"scheduler: {args.noop_tasks} no-op tasks on {args.workers} workers: {rates} tasks/s, median "
                  f"{figures['tasks_per_s']:.0f}; CPU per task: client and scheduler {figures['client_cpu_ms']:.2f} ms, "
                  f"workers {figures['worker_cpu_ms']:.2f} ms", flush=True)
            inputs = make_inputs_once(root / f"tiny-{args.tasks}.zarr", args.tasks, 1, TINY_LAYER)
            peer = [cpu_timed(client, lambda: peer_round(inputs, str(root / "peer-out.zarr")))
                    for _ in range(args.rounds)]
            per_task = {key: median([run[key] for run in peer]) / args.tasks * 1e3 for key in peer[0]}
            results.update(peer_runs=peer, peer_ms_per_task=per_task)
            walls = ", ".join(f"{run['wall']:.2f}" for run in peer)
            print(f"plain Dask peer, {args.tasks} one-sample tasks: {walls} s; per task: "
                  f"{per_task['wall'] * args.workers:.1f} ms wall per worker, CPU: client and scheduler "
                  f"{per_task['client_cpu']:.2f} ms, workers {per_task['worker_cpu']:.2f} ms", flush=True)
        disk = disk_write_bandwidth(root, block, args.blocks)
        results["disk_write_MBps"] = disk
        print(f"local disk ({root}), {args.blocks} x {args.block_mb} MB writes: {disk['page_cache']:.0f} MB/s into the "
              f"page cache, {disk['fsync']:.0f} MB/s with fsync", flush=True)
    with moto_server() as endpoint:
        if endpoint is None:
            print("S3: moto_server not installed (pip install 'moto[server]' s3fs); skipped")
        else:
            s3 = s3_bandwidth(endpoint, block, args.blocks)
            results["s3_moto_MBps"] = s3
            print(f"S3 (moto server on 127.0.0.1, s3fs), {args.blocks} x {args.block_mb} MB, one at a time: "
                  f"PUT {s3['put']:.0f} MB/s, GET {s3['get']:.0f} MB/s")
    return results


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = main.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--workdir", default=None, help="where the stores go, kept (default: a temporary directory)")
        sub.add_argument("--json", default=None, metavar="PATH", help="write the figures here")
        return sub

    overhead = command("overhead", "dconv's many-task job against a plain Dask peer, interleaved rounds")
    overhead.add_argument("--tasks", type=int, default=2000, help="tasks of one sample each (default 2000)")
    overhead.add_argument("--rounds", type=int, default=3, help="interleaved rounds, dconv then peer (default 3)")
    overhead.add_argument("--workers", type=int, default=2)
    overhead.set_defaults(run=run_overhead)

    memory = command("memory", "summed peak RSS at m and 32 m; the client's memory per task")
    memory.add_argument("--m", type=int, default=2**15, help="the smaller batch (default 2**15)")
    memory.add_argument("--factor", type=int, default=32, help="the larger batch is factor x m (default 32)")
    memory.add_argument("--batch-chunk", type=int, default=1024, help="for both batches (default 1024)")
    memory.add_argument("--task-counts", type=int, nargs=2, default=[1000, 20000], metavar=("LOW", "HIGH"),
                        help="task counts for the client's memory per task (default 1000 20000)")
    memory.add_argument("--task-batch-chunk", type=int, default=1, help="batch chunk of those runs (default 1)")
    memory.add_argument("--workers", type=int, default=2)
    memory.set_defaults(run=run_memory)

    bookkeeping = command("bookkeeping", "dconv inspect and the start of a resume at 100,000 chunks")
    bookkeeping.add_argument("--chunks", type=int, default=100_000, help="chunks of one sample (default 100000)")
    bookkeeping.add_argument("--undone", type=int, default=100, help="chunks left undone, spread out (default 100)")
    bookkeeping.add_argument("--input-chunk", type=int, default=1000,
                             help="the input's Zarr chunk along m (default 1000: quick to make)")
    bookkeeping.add_argument("--threads", type=int, default=2, help="threads writing the chunks (default 2)")
    bookkeeping.add_argument("--rounds", type=int, default=3, help="timings of inspect and resume (default 3)")
    bookkeeping.add_argument("--via", choices=("chunks", "records", "job"), default="chunks",
                             help="chunks: run each chunk's task in this process (plan.run_chunk), no combine task, "
                                  "so every finished chunk keeps its own record (the worst case); records: the same "
                                  "records through the chunk task's own write, with chunk 0's values (quick at 100,000 "
                                  "chunks); job: a real dconv backward command, stopped with SIGINT (default chunks)")
    bookkeeping.add_argument("--stop-at", type=float, default=0.99,
                             help="with --via job: the fraction of chunks written before the SIGINT (default 0.99)")
    bookkeeping.add_argument("--workers", type=int, default=2, help="with --via job (default 2)")
    bookkeeping.set_defaults(run=run_bookkeeping)

    model = command("model", "scheduler throughput, the peer's time per task, disk and S3 bandwidth")
    model.add_argument("--workers", type=int, default=2)
    model.add_argument("--noop-tasks", type=int, default=5000, help="no-op tasks per throughput round (default 5000)")
    model.add_argument("--tasks", type=int, default=2000, help="tasks of the plain Dask peer (default 2000)")
    model.add_argument("--rounds", type=int, default=3)
    model.add_argument("--block-mb", type=int, default=8, help="block size in MB (default 8)")
    model.add_argument("--blocks", type=int, default=32, help="blocks per bandwidth figure (default 32)")
    model.set_defaults(run=run_model)
    return main


def main() -> None:
    args = parser().parse_args()
    results = args.run(args)
    results["command"] = args.command
    write_json(args.json, results)


if __name__ == "__main__":
    main()

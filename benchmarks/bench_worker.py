"""The kernel in a plain process against the kernel in a Dask worker: per-chunk time and page faults.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command only::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_worker.py

The same chunks (``--batch-chunk`` samples of 32x32x16 -> 32, 3x3, pad 1, float32, the
layer of bench_job.py) go through ``dconv.conv2d_backward`` at one thread, one BLAS
thread, in

- ``plain``: a fresh Python process (``python bench_worker.py --child``), one or two at once;
- ``worker``: a worker of a 2-worker ``distributed.LocalCluster`` made as the embedded
  cluster makes it, one or both workers busy;

each under three malloc environments, set before the process starts:

- ``glibc``: no ``MALLOC_*`` variable (a plain process's default: dynamic mmap threshold);
- ``distributed``: what distributed gives its workers (``MALLOC_TRIM_THRESHOLD_=65536``,
  from ``distributed.nanny.pre-spawn-environ``);
- ``dconv``: what the embedded cluster gives them (:data:`dconv.cluster.WORKER_MALLOC_ENV`).

For each chunk the task reads its own thread's minor page faults
(``getrusage(RUSAGE_THREAD)``, load-independent), its thread CPU time and the wall time
around the kernel. The first chunk of each process is left out (it imports and warms up).
The BLAS each process ran is printed (threadpoolctl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")

DISTRIBUTED_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536"}
"""distributed's own ``distributed.nanny.pre-spawn-environ`` malloc setting."""


def environments() -> dict[str, dict[str, str]]:
    from dconv.cluster import WORKER_MALLOC_ENV

    return {"glibc": {}, "distributed": dict(DISTRIBUTED_ENV), "dconv": dict(WORKER_MALLOC_ENV)}


def blas() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [{k: info.get(k) for k in ("internal_api", "architecture", "num_threads")} for info in threadpool_info()]


def run_chunks(n_chunks: int, batch_chunk: int, dA_prev: bool = True) -> dict:
    """Run ``n_chunks`` chunks through the kernel here, at one thread; per chunk its wall, CPU and faults.

    Returns
    -------
    dict
        ``wall``, ``cpu`` (seconds) and ``minflt`` lists, one entry per chunk; ``env``: this
        process's malloc variables; ``blas``; ``pid``.
    """
    import numpy as np
    from threadpoolctl import threadpool_limits

    from dconv.kernel import backward_kernel
    from dconv.params import ConvParams, backward_geometry

    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 3, 16, 32), dtype=np.float32)
    params = ConvParams.parse(stride=1, padding=1)
    geometry = backward_geometry((batch_chunk, 32, 32, 32), (batch_chunk, 32, 32, 16), W.shape, params)
    wall, cpu, minflt = [], [], []
    with threadpool_limits(1):
        for index in range(n_chunks):
            chunk = np.random.default_rng(index)
            A_prev = chunk.standard_normal((batch_chunk, 32, 32, 16), dtype=np.float32)
            dZ = chunk.standard_normal((batch_chunk, 32, 32, 32), dtype=np.float32)
            faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            seconds, clock = time.thread_time(), time.perf_counter()
            # as a job's chunk task calls it (dconv.graph.chunk_partial)
            backward_kernel(dZ, A_prev, W, geometry, threads=1, float64_sums=True, dA_prev=dA_prev)
            wall.append(time.perf_counter() - clock)
            cpu.append(time.thread_time() - seconds)
            minflt.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults)
        info = blas()
    env = {name: os.environ[name] for name in MALLOC_VARIABLES if name in os.environ}
    return {"wall": wall, "cpu": cpu, "minflt": minflt, "env": env, "blas": info, "pid": os.getpid()}


def plain(env: dict[str, str], busy: int, n_chunks: int, batch_chunk: int) -> list[dict]:
    """``busy`` fresh processes at once, each started with ``env`` and running :func:`run_chunks`."""
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    command = [sys.executable, __file__, "--child", str(n_chunks), "--batch-chunk", str(batch_chunk)]
    processes = [
        subprocess.Popen(command, env={**base, **env}, stdout=subprocess.PIPE, text=True) for _ in range(busy)
    ]
    return [json.loads(process.communicate()[0]) for process in processes]


def worker(env: dict[str, str], busy: int, n_chunks: int, batch_chunk: int) -> list[dict]:
    """:func:`run_chunks` on ``busy`` of the 2 workers of a LocalCluster whose workers start with ``env``."""
    import dask
    import distributed

    from dconv.cluster import BLAS_THREAD_VARIABLES

    # the config replaces distributed's pre-spawn malloc setting: only the variables of `env` are set. A
    # nanny copies them into this process's environment, where they would win over the next cluster's config.
    for name in MALLOC_VARIABLES:
        os.environ.pop(name, None)
    spawn = {f"distributed.nanny.pre-spawn-environ.{name}": None for name in MALLOC_VARIABLES}
    spawn.update({f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in env.items()})
    with dask.config.set(spawn), distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
        env={name: "1" for name in BLAS_THREAD_VARIABLES}, silence_logs=50,
    ) as cluster, distributed.Client(cluster) as client:
        addresses = sorted(client.scheduler_info()["workers"])[:busy]
        futures = [
            client.submit(run_chunks, n_chunks, batch_chunk, workers=[address], pure=False) for address in addresses
        ]
        return client.gather(futures)


def job(env: dict[str, str], m: int, batch_chunk: int, workdir: Path) -> dict:
    """A whole ``dconv.backward_job`` on the embedded cluster (2 workers) whose workers start with ``env``:
    its summed kernel, read and write seconds per chunk and its total seconds."""
    import dconv.cluster
    from dconv import ClusterOptions, backward_job
    from dconv.store import make_inputs

    inputs = workdir / f"in-{m}.zarr"
    if not inputs.exists():
        make_inputs(str(inputs), m=m, chunk=batch_chunk, overwrite=True, seed=1, height=32, width=32,
                    in_channels=16, out_channels=32, kernel=(3, 3), padding=1, dtype="float32")
    for name in MALLOC_VARIABLES:
        os.environ.pop(name, None)
    saved, dconv.cluster.WORKER_MALLOC_ENV = dconv.cluster.WORKER_MALLOC_ENV, dict(env)
    try:
        result = backward_job(str(inputs), str(workdir / "out.zarr"), batch_chunk=batch_chunk, overwrite=True,
                              cluster=ClusterOptions(workers=2), quiet=True)
    finally:
        dconv.cluster.WORKER_MALLOC_ENV = saved
    chunks = -(-m // batch_chunk)
    return {"kernel_ms": 1e3 * result.seconds["kernel"] / chunks, "read_ms": 1e3 * result.seconds["read"] / chunks,
            "write_ms": 1e3 * result.seconds["write"] / chunks, "total_s": result.seconds["total"]}


def summary(runs: list[dict]) -> dict:
    """Medians over every process's chunks but its first."""
    pick = lambda name: [value for run in runs for value in run[name][1:]]  # noqa: E731
    return {
        "wall_ms": 1e3 * statistics.median(pick("wall")),
        "cpu_ms": 1e3 * statistics.median(pick("cpu")),
        "minflt": statistics.median(pick("minflt")),
        "env": runs[0]["env"],
        "blas": runs[0]["blas"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=9, help="chunks per busy process (the first is left out)")
    parser.add_argument("--batch-chunk", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every configuration")
    parser.add_argument("--job-m", type=int, default=4096, help="batch of the whole-job comparison (0: none)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_chunks(args.child, args.batch_chunk)))
        return
    from bench_kernel import cpu_description

    print(f"CPU: {cpu_description()}; chunk {args.batch_chunk} x 32x32x16 -> 32, 3x3, pad 1, float32; 1 thread")
    results: dict[str, list[dict]] = {}
    jobs: dict[str, list[dict]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_worker-"))
    for _ in range(args.rounds):  # interleaved: a change in the machine's load touches every configuration
        for env_name, env in environments().items():
            for where, run in (("plain", plain), ("worker", worker)):
                for busy in (1, 2):
                    key = f"{where:6} {env_name:11} busy {busy}"
                    results.setdefault(key, []).extend(run(env, busy, args.chunks, args.batch_chunk))
            if args.job_m:
                jobs.setdefault(env_name, []).append(job(env, args.job_m, args.batch_chunk, workdir))
    shutil.rmtree(workdir, ignore_errors=True)
    rows = {key: summary(runs) for key, runs in results.items()}
    print(f"BLAS: {next(iter(rows.values()))['blas']}")
    for key, row in rows.items():
        print(f"{key}: kernel {row['wall_ms']:6.1f} ms wall, {row['cpu_ms']:6.1f} ms CPU, "
              f"{row['minflt']:7.0f} minor faults per chunk  (env {row['env']})")
    for env_name in environments():
        for busy in (1, 2):
            base, row = rows[f"plain  {'dconv':11} busy {busy}"], rows[f"worker {env_name:11} busy {busy}"]
            print(f"worker ({env_name}) / plain (dconv env), {busy} busy: {row['wall_ms'] / base['wall_ms']:.2f}x "
                  f"wall, {row['cpu_ms'] / base['cpu_ms']:.2f}x CPU")
    for env_name, runs in jobs.items():
        best = min(runs, key=lambda run: run["kernel_ms"])
        print(f"job m={args.job_m} ({env_name} env), best of {len(runs)}: kernel {best['kernel_ms']:.1f} ms, read "
              f"{best['read_ms']:.1f} ms, write {best['write_ms']:.1f} ms per chunk summed over tasks; "
              f"total {best['total_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": results, "jobs": jobs}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

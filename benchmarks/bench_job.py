"""Whole-job benchmark: dconv backward on Zarr against the kernel alone and a PyTorch loop.

Run from the repository root, with the machine's OpenBLAS overrides unset for this
command only (see the README's benchmark section)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_job.py

    python benchmarks/bench_job.py --m 512 --memory-m 256 --repeats 1 --codecs zstd none   # smoke test

It prints, measured side by side in one run on the same Zarr input:

- kernel only: ``dconv.conv2d_backward`` over the in-memory batch, chunk by chunk,
  in one process using every core's BLAS threads (no I/O);
- the job: the whole ``dconv backward`` command with 2 local workers, wall clock as a
  user times it (imports and cluster start included), its compute time alone, and its
  summed per-task kernel time;
- a PyTorch loop (when torch is installed): the whole ``benchmarks/torch_loop.py``
  command, wall clock, imports included: one process reads the same Zarr chunks,
  runs autograd's conv backward, and writes dA_prev to Zarr with the same codec;
- peak RSS summed over every process of the job (client, scheduler, nannies and
  workers, sampled every 20 ms), at two batch sizes (``--m``, ``--memory-m``) with
  the same batch chunk.

The job and the PyTorch loop run on the same samples stored with each input codec of
``--codecs`` (:data:`CODECS`; make-inputs writes Blosc LZ4, the others are rewritten
from it with zarr directly). For each it prints the read rate, GB/s per core: the input
bytes decoded (A_prev and dZ) over the job's read seconds summed over its tasks (each
task reads on one thread); the start (whole command minus compute: imports, cluster
start and close, plan, output); and the job again with ``--no-dA-prev``.

Every figure is a ratio or a time from this run on this machine; the BLAS kernel
that ran is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import dconv
from bench_kernel import cpu_description, cpu_info
from dconv.store import make_inputs


CODECS = {
    "blosc-lz4": None,  # as make_inputs writes it
    "zstd": {},  # zarr-python 3's default: bytes + zstd
    "none": {"compressors": None},
    "sharded+zstd": {"compressors": ZstdCodec(), "shards": "shard"},
}
"""Input codec -> ``create_array`` arguments for A_prev and dZ (``"shard"``: shards of 4 batch chunks);
None: the group make_inputs writes (Blosc LZ4, byte shuffle)."""

SHARD_CHUNKS = 4
"""Batch chunks per shard of the sharded inputs."""


def recode(source: str, path: str, codec: str, chunk: int) -> str:
    """A copy of input group ``source`` at ``path`` with A_prev and dZ stored with ``codec``; W and the
    attributes as they are. Returns ``path``."""
    options = dict(CODECS[codec])
    group = zarr.open_group(source, mode="r")
    target = zarr.open_group(path, mode="w", attributes=dict(group.attrs))
    W = group["W"]
    target.create_array("W", shape=W.shape, chunks=W.chunks, dtype=W.dtype, attributes=dict(W.attrs))[...] = W[...]
    for name in ("A_prev", "dZ"):
        array = group[name]
        shape, chunks = array.shape, (chunk, *array.shape[1:])
        made = dict(options)
        if made.get("shards") == "shard":
            made["shards"] = (chunk * SHARD_CHUNKS, *shape[1:])
        copy = target.create_array(name, shape=shape, chunks=chunks, dtype=array.dtype,
                                   attributes=dict(array.attrs), **made)
        step = made.get("shards", chunks)[0]
        for start in range(0, shape[0], step):
            copy[start : start + step] = array[start : start + step]
    return path


def input_bytes(path: str) -> int:
    """Decoded bytes of an input group's A_prev and dZ: what a job reads."""
    group = zarr.open_group(path, mode="r")
    return group["A_prev"].nbytes + group["dZ"].nbytes


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    return [
        {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for info in threadpool_info()
    ]


def kernel_only(path: str, batch_chunk: int) -> float:
    """Seconds for the kernel alone over the whole batch, data already in memory."""
    group = zarr.open_group(path, mode="r")
    A_prev, dZ, W = group["A_prev"][:], group["dZ"][:], group["W"][:]
    hp = group.attrs["hparameters"]
    start = time.perf_counter()
    for i in range(0, A_prev.shape[0], batch_chunk):
        dconv.conv2d_backward(dZ[i : i + batch_chunk], A_prev[i : i + batch_chunk], W, stride=hp["stride"], padding=hp["pad"])
    return time.perf_counter() - start


def torch_loop(path: str, out: str, batch_chunk: int) -> dict | None:
    """The whole PyTorch-loop command (benchmarks/torch_loop.py): wall seconds, and its loop alone."""
    try:
        import torch  # noqa: F401  (only to know whether the peer can run)
    except ImportError:
        return None
    script = Path(__file__).with_name("torch_loop.py")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), path, out, "--batch-chunk", str(batch_chunk)],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"torch_loop.py failed: {result.stderr}")
    return {"wall": wall, "loop": float(result.stdout.split()[-1])}


def run_job(path: str, out: str, batch_chunk: int, workers: int, *extra: str) -> dict:
    """Run the CLI job in a subprocess (``extra``: more of its flags); return wall time, job seconds and peak
    summed RSS."""
    import psutil

    command = [sys.executable, "-m", "dconv", "backward", path, out, "--batch-chunk", str(batch_chunk),
               "--workers", str(workers), "--overwrite", "--quiet", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"dconv backward failed: {stderr}")
    provenance = zarr.open_group(out, mode="r").attrs["dconv"]
    return {"wall": wall, "seconds": provenance["seconds"], "peak_rss": peak[0], "stdout": stdout.strip()}


def start_seconds(job: dict) -> float:
    """A whole command's seconds outside its compute: imports, cluster start and close, plan, output."""
    return job["wall"] - job["seconds"]["compute"]


def describe_round(round_: dict, nbytes: int) -> str:
    """One line: the job (its start, compute and summed step times, read GB/s per core), --no-dA-prev, PyTorch."""
    job, lean, peer = round_["job"], round_["no_dA_prev"], round_["torch_loop"]
    seconds = job["seconds"]
    peer_text = (f"; PyTorch command {peer['wall']:.2f} s (loop {peer['loop']:.2f} s), dconv / PyTorch "
                 f"{job['wall'] / peer['wall']:.2f}" if peer else "")
    return (f"dconv command {job['wall']:.2f} s (start {start_seconds(job):.2f} s, compute {seconds['compute']:.2f} s; "
            f"task sums: kernel {seconds['kernel']:.2f} s, read {seconds['read']:.2f} s = "
            f"{nbytes / seconds['read'] / 1e9:.2f} GB/s per core, write {seconds['write']:.2f} s); "
            f"--no-dA-prev {lean['wall']:.2f} s (compute {lean['seconds']['compute']:.2f} s){peer_text}")


def best_of(rounds: list[dict]) -> dict:
    """The round of each measurement with the shortest whole command."""
    fields = ("job", "no_dA_prev", "torch_loop")
    return {
        field: min((r[field] for r in rounds), key=lambda run: run["wall"]) if rounds[0][field] else None
        for field in fields
    }


def scaling(workdir: Path, batch_chunk: int, layer: dict, repeats: int) -> list[dict]:
    """Job compute time and peak RSS with 1 and 2 workers over three batch sizes.

    Measured as the headline figures are: ``repeats`` interleaved rounds, the best
    (shortest compute) of each configuration, and the largest peak RSS.
    """
    print(f"\nscaling (compute time excludes cluster start; best of {repeats} interleaved rounds):")
    configs = [(m, workers) for m in (1024, 4096, 16384) for workers in (1, 2)]
    for m, _ in configs:
        path = str(workdir / f"in-{m}.zarr")
        if not Path(path).exists():
            make_inputs(path, m=m, chunk=batch_chunk, overwrite=True, seed=1, **layer)
    runs: dict = {config: [] for config in configs}
    for _ in range(repeats):
        for m, workers in configs:
            job = run_job(str(workdir / f"in-{m}.zarr"), str(workdir / f"scale-{m}-{workers}.zarr"), batch_chunk, workers)
            runs[(m, workers)].append(job)
    rows = []
    for (m, workers), jobs in runs.items():
        compute = min(job["seconds"]["compute"] for job in jobs)
        peak = max(job["peak_rss"] for job in jobs)
        rows.append({"m": m, "workers": workers, "compute": compute, "peak_rss": peak})
        print(f"  m={m:6d} workers={workers}: compute {compute:6.2f} s ({m / compute:6.0f} samples/s), "
              f"peak RSS {peak / 2**20:.0f} MiB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=16384, help="batch size of the speed comparison")
    parser.add_argument("--memory-m", type=int, default=4096,
                        help="a second batch size: peak memory there against at --m (same batch chunk)")
    parser.add_argument("--batch-chunk", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workdir", default=None, help="where the Zarr stores go (default: a temp dir)")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS),
                        help="input codecs (default: all); the first is the one peak RSS is reported for")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of job, kernel alone and PyTorch loop, interleaved; the minimum of each counts")
    parser.add_argument("--scaling", action="store_true",
                        help="also time the job with 1 and 2 workers at m = 1024, 4096, 16384")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dconv-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    layer = dict(height=32, width=32, in_channels=16, out_channels=32, kernel=(3, 3), padding=1, dtype=args.dtype)
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}; dconv {dconv.__version__}")
    print(cpu_description())
    print(f"BLAS: {blas_info()}")
    print(f"layer: 32x32x16 -> 32, 3x3, pad 1, {args.dtype}; batch_chunk {args.batch_chunk}; {args.workers} workers")

    results: dict = {"m": args.m, "batch_chunk": args.batch_chunk, "workers": args.workers, "dtype": args.dtype,
                     "cpu": cpu_info(), "codecs": args.codecs}
    for m in (args.m, args.memory_m):
        path = str(workdir / f"in-{m}.zarr")
        make_inputs(path, m=m, chunk=args.batch_chunk, overwrite=True, seed=1, **layer)
    source = str(workdir / f"in-{args.m}.zarr")
    inputs = {codec: source if CODECS[codec] is None else recode(source, str(workdir / f"in-{args.m}-{codec}.zarr"),
                                                                    codec, args.batch_chunk)
              for codec in args.codecs}

    # The machine is shared and noisy: interleave the measurements and keep each one's best round.
    rounds = []
    for _ in range(args.repeats):
        for codec, path in inputs.items():
            job = run_job(path, str(workdir / f"out-{args.m}.zarr"), args.batch_chunk, args.workers)
            lean = run_job(path, str(workdir / f"out-{args.m}.zarr"), args.batch_chunk, args.workers, "--no-dA-prev")
            peer = torch_loop(path, str(workdir / "torch-out.zarr"), args.batch_chunk)
            rounds.append({"codec": codec, "job": job, "no_dA_prev": lean, "torch_loop": peer})
            print(f"{codec}: {describe_round(rounds[-1], input_bytes(path))}", flush=True)
        rounds.append({"kernel_only": kernel_only(source, args.batch_chunk)})
    kernel_s = min(r["kernel_only"] for r in rounds if "kernel_only" in r)
    best = {codec: best_of([r for r in rounds if r.get("codec") == codec]) for codec in inputs}
    other = run_job(str(workdir / f"in-{args.memory_m}.zarr"), str(workdir / f"out-{args.memory_m}.zarr"),
                    args.batch_chunk, args.workers)
    print(f"m={args.memory_m}: dconv command {other['wall']:.2f} s, compute {other['seconds']['compute']:.2f} s")
    results.update({"best": best, f"job_m{args.memory_m}": other, "kernel_only": kernel_s, "rounds": rounds})

    print(f"\nbest of {args.repeats} rounds, m = {args.m}; kernel only (in memory, all cores) {kernel_s:.2f} s, "
          f"{args.m / kernel_s:.0f} samples/s")
    print(f"{'input codec':13} {'read GB/s/core':>14} {'command':>8} {'start':>6} {'compute':>8} {'kernel':>7} "
          f"{'no dA_prev':>10} {'PyTorch':>8} {'dconv/PyTorch':>13}")
    for codec, row in best.items():
        job, lean, peer = row["job"], row["no_dA_prev"], row["torch_loop"]
        gbps = input_bytes(inputs[codec]) / job["seconds"]["read"] / 1e9
        torch_text = f"{peer['wall']:7.2f}s {job['wall'] / peer['wall']:13.2f}" if peer else f"{'-':>8} {'-':>13}"
        print(f"{codec:13} {gbps:14.2f} {job['wall']:7.2f}s {start_seconds(job):5.2f}s "
              f"{job['seconds']['compute']:7.2f}s {job['seconds']['kernel']:6.2f}s {lean['wall']:9.2f}s {torch_text}")
    job = best[args.codecs[0]]["job"]
    rss_m, rss_other = job["peak_rss"], other["peak_rss"]
    print(f"peak RSS m={args.m}: {rss_m / 2**20:.0f} MiB, m={args.memory_m}: {rss_other / 2**20:.0f} MiB, "
          f"ratio {rss_m / rss_other:.2f} for {args.m / args.memory_m:.0f}x the batch")
    if args.scaling:
        results["scaling"] = scaling(workdir, args.batch_chunk, layer, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

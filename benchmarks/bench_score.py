"""``dconv score`` against this machine's plain sgemm of the same product, side by side in one run.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command only::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_score.py

It writes a one-layer output of m_train = 2^20 float32 sketches (k_in = k_out = 16: 256 features,
chunks of 8192) and a query output of 10,000, with NumPy and Zarr, laid out as a backward job writes
them. Then, in one run:

- **sgemm**: ``(m_train x 256) @ (256 x 10000)`` in NumPy float32 with 2 BLAS threads, in blocks of
  8192 train rows into one reused buffer (the whole product is 42 GB), the features in memory; timed
  before and after the score (the machine may be shared), the faster counts;
- **dconv score** ``TRAIN QUERY SCORES --top 10`` as a process of its own, on the embedded cluster
  (one single-threaded worker per core), wall time from start to exit, with the peak RSS of its
  process tree (every process sampled every 0.2 s; the workers' own peaks, VmHWM, are read as well
  where the process is still there).

It prints the CPU, the BLAS, both times, the ratio, and the peak memory, and writes them as JSON
(``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import threadpoolctl
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _score_fixtures import one_layer  # noqa: E402

K_IN = K_OUT = 16
CHUNK = 8192


def write_outputs(workdir: Path, m_train: int, m_query: int) -> tuple[str, str]:
    """The train and query outputs, float32 sketches, chunks of CHUNK samples; written a chunk at a time."""
    rng = np.random.default_rng(0)
    projections = rng.standard_normal((K_IN, 17)), rng.standard_normal((K_OUT, 3))
    train = str(workdir / "train.zarr")
    group = zarr.open_group(train, mode="w", zarr_format=3)
    sketch = group.create_group("sketch")
    values = sketch.create_array("values", shape=(m_train, K_IN, K_OUT), chunks=(CHUNK, K_IN, K_OUT),
                                 dtype="float32", compressors=None, dimension_names=["m", "k_in", "k_out"])
    for start in range(0, m_train, CHUNK):
        stop = min(start + CHUNK, m_train)
        values[start:stop] = rng.standard_normal((stop - start, K_IN, K_OUT), dtype=np.float32)
    sketch.create_array("P_in", data=projections[0])
    sketch.create_array("P_out", data=projections[1])
    group.attrs["dconv"] = {"status": "complete", "sketch": {"k_in": K_IN, "k_out": K_OUT, "kind": "gaussian",
                                                             "seed": 0, "dtype": "float32"}}
    query = one_layer(workdir / "query.zarr", rng.standard_normal((m_query, K_IN, K_OUT), dtype=np.float32),
                      projections, batch_chunk=CHUNK)
    return train, query


def time_sgemm(train: str, query: str, threads: int) -> float:
    """Seconds of the plain product, in blocks of CHUNK train rows, features already in memory."""
    features = np.asarray(zarr.open_array(f"{train}/sketch/values")[...]).reshape(-1, K_IN * K_OUT)
    queries = np.asarray(zarr.open_array(f"{query}/sketch/values")[...]).reshape(-1, K_IN * K_OUT)
    out = np.empty((CHUNK, queries.shape[0]), dtype=np.float32)
    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
        np.matmul(features[:CHUNK], queries.T, out=out)  # warm up
        start = time.perf_counter()
        for row in range(0, features.shape[0], CHUNK):
            block = features[row : row + CHUNK]
            np.matmul(block, queries.T, out=out[: block.shape[0]])
        return time.perf_counter() - start


class TreeMemory:
    """The peak RSS of a process and its descendants (sum and largest single one), sampled every ``interval``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_sum = self.peak_one = 0
        self.hwm: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                total += rss
                self.peak_one = max(self.peak_one, rss)
                self.hwm[process.pid] = max(self.hwm.get(process.pid, 0), _vm_hwm(process.pid))
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm(pid: int) -> int:
    """The process's own peak RSS (VmHWM), bytes; 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def time_score(train: str, query: str, out: str, extra: list[str]) -> tuple[float, TreeMemory, str]:
    """Wall seconds of ``dconv score`` as its own process, its memory, its stderr."""
    command = [str(Path(sys.executable).parent / "dconv"), "score", train, query, out, "--top", "10", "--overwrite",
               "--quiet", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(process.pid) as memory:
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"dconv score failed ({process.returncode}): {stderr}")
    return seconds, memory, stdout + stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m-train", type=int, default=2**20)
    parser.add_argument("--m-query", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads of the plain sgemm")
    parser.add_argument("--workdir", default=None, help="where the outputs go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("score_args", nargs="*", help="more dconv score flags (after --)")
    args = parser.parse_args()
    from bench_kernel import cpu_info

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        train, query = write_outputs(workdir, args.m_train, args.m_query)
        print(f"wrote the outputs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        before = time_sgemm(train, query, args.threads)
        seconds, memory, said = time_score(train, query, str(workdir / "scores.zarr"), args.score_args)
        after = time_sgemm(train, query, args.threads)  # the machine is shared: the sgemm brackets the score
        sgemm = min(before, after)
        provenance = zarr.open_group(str(workdir / "scores.zarr"), mode="r").attrs["dconv_score"]
    flops = 2.0 * args.m_train * K_IN * K_OUT * args.m_query
    blas = [(i["internal_api"], i.get("architecture"), i["version"]) for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"]
    figures = {
        "cpu": cpu_info()["model"], "cores": os.cpu_count(), "blas": blas,
        "m_train": args.m_train, "m_query": args.m_query, "features": K_IN * K_OUT, "top": 10,
        "sgemm_seconds": round(sgemm, 2), "sgemm_before_after_seconds": [round(before, 2), round(after, 2)],
        "load_average": os.getloadavg(), "sgemm_gflops": round(flops / sgemm / 1e9, 1),
        "score_seconds": round(seconds, 2), "score_in_tasks_seconds": provenance.get("seconds"),
        "ratio": round(seconds / sgemm, 3), "block": provenance.get("block"),
        "peak_rss_tree_bytes": memory.peak_sum, "peak_rss_one_process_bytes": memory.peak_one,
        "peak_vm_hwm_bytes": sorted(memory.hwm.values(), reverse=True)[:4],
    }
    print(f"CPU {figures['cpu']}, {figures['cores']} cores; BLAS {blas}")
    print(f"sgemm ({args.m_train} x 256) @ (256 x {args.m_query}), {args.threads} BLAS threads: {sgemm:.2f} s "
          f"({figures['sgemm_gflops']} GFLOP/s; {before:.2f} s before the score, {after:.2f} s after)")
    print(f"dconv score --top 10 (embedded cluster): {seconds:.2f} s wall, {provenance.get('seconds')} s from the "
          f"output's creation to its finish; {seconds / sgemm:.2f} x the sgemm; blocks of {provenance.get('block')}")
    print(f"peak RSS: whole process tree {memory.peak_sum / 2**20:.0f} MiB (sampled), largest process "
          f"{memory.peak_one / 2**20:.0f} MiB; VmHWM of the largest {[round(v / 2**20) for v in figures['peak_vm_hwm_bytes']]} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

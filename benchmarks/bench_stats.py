"""What ``--stats`` and ``--no-dA-prev`` cost: whole jobs side by side, and the peak memory of one task.

Run from the repository root, with the machine's OpenBLAS overrides unset for this
command only (see the README's benchmark section)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_stats.py

For each of three layers (float32, m = 4096 by default, batch chunks of 256, Zarr input
chunked the same way), on one embedded cluster of 2 single-threaded workers (as
``dconv backward`` starts it), it runs the
same job four ways: plain, ``stats=True``, ``dA_prev=False`` and both. The four are
interleaved in each round, their order rotating from round to round, and each one's
median job time (``JobResult.seconds["compute"]``: the graph, from the first task to the
last write) counts. It prints the ratios ``stats / plain`` and ``plain / no-dA_prev``.

Then, in this process, the peak of what one chunk task allocates (``tracemalloc``:
NumPy reports its buffers to it) while it reads, computes and writes its chunk, with and
without the statistics, beside the plan's bound on it (``JobPlan.task_memory``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tracemalloc
from pathlib import Path

import dconv
from bench_job import blas_info
from dconv.cluster import ClusterOptions, connect
from bench_kernel import cpu_description, cpu_info
from dconv.store import make_inputs

LAYERS = {
    "32x32x16->32 3x3 s1": dict(height=32, width=32, in_channels=16, out_channels=32, kernel=3, stride=1, padding=1),
    "16x16x64->128 3x3 s2": dict(height=16, width=16, in_channels=64, out_channels=128, kernel=3, stride=2, padding=1),
    "8x8x128->128 1x1": dict(height=8, width=8, in_channels=128, out_channels=128, kernel=1, stride=1, padding=0),
}

VARIANTS = {
    "plain": {},
    "stats": {"stats": True},
    "no_dA_prev": {"dA_prev": False},
    "stats_no_dA_prev": {"stats": True, "dA_prev": False},
}


def task_peak(path: str, out: str, batch_chunk: int, **options) -> tuple[int, int]:
    """``(peak bytes one chunk task allocated, the plan's bound)``, the task run in this process."""
    plan = dconv.plan_job(path, out, batch_chunk=batch_chunk, overwrite=True, **options)
    plan.open_output()
    plan.run_chunk(0)  # once to warm up: imports, the block arrays' metadata
    tracemalloc.start()
    plan.run_chunk(1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, plan.task_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--batch-chunk", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=list(LAYERS), metavar="LAYER")
    parser.add_argument("--workdir", default=None, help="where the Zarr stores go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--products", action="store_true",
                        help="instead: --stats alone against --stats with --dot of 16 queries and with --sketch 32,32")
    args = parser.parse_args()
    if args.products:
        return products(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dconv-bench-stats-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(cpu_description())
    print(f"BLAS: {blas_info()}")
    print(f"m = {args.m}, float32, batch_chunk {args.batch_chunk}, {args.workers} workers x 1 thread, "
          f"{args.rounds} interleaved rounds (medians)")
    results: dict = {"cpu": cpu_info(), "m": args.m, "batch_chunk": args.batch_chunk, "workers": args.workers, "layers": {}}
    # dconv's embedded cluster, as `dconv backward` starts it: single-threaded workers with
    # single-threaded BLAS (workers x threads x BLAS threads = cores)
    with connect(ClusterOptions(workers=args.workers), quiet=True) as client:
        for layer in args.layers:
            path = str(workdir / f"in-{layer.split()[0]}.zarr")
            make_inputs(path, m=args.m, chunk=args.batch_chunk, dtype="float32", overwrite=True, seed=1, shared=0.5,
                        **LAYERS[layer])
            times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            names = list(VARIANTS)
            dconv.backward_job(path, workdir / "warm.zarr", client=client, batch_chunk=args.batch_chunk, overwrite=True)
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                for name in order:
                    result = dconv.backward_job(path, workdir / f"out-{name}.zarr", client=client,
                                                batch_chunk=args.batch_chunk, overwrite=True, **VARIANTS[name])
                    times[name].append(result.seconds["compute"])
            median = {name: statistics.median(values) for name, values in times.items()}
            peaks = {name: task_peak(path, str(workdir / f"task-{name}.zarr"), args.batch_chunk, **VARIANTS[name])
                     for name in ("plain", "stats")}
            entry = {
                "seconds": times,
                "median": median,
                "stats_over_plain": median["stats"] / median["plain"],
                "plain_over_no_dA_prev": median["plain"] / median["no_dA_prev"],
                "stats_no_dA_prev_over_plain": median["stats_no_dA_prev"] / median["plain"],
                "task_peak": {name: peak for name, (peak, _) in peaks.items()},
                "task_bound": {name: bound for name, (_, bound) in peaks.items()},
            }
            results["layers"][layer] = entry
            print(f"\n{layer}:")
            for name in VARIANTS:
                print(f"  {name:17s} median {median[name]:6.2f} s   rounds " + " ".join(f"{t:.2f}" for t in times[name]))
            print(f"  --stats / plain {entry['stats_over_plain']:.2f}x;  plain / --no-dA-prev "
                  f"{entry['plain_over_no_dA_prev']:.2f}x;  both / plain {entry['stats_no_dA_prev_over_plain']:.2f}x")
            plain_peak, stats_peak = entry["task_peak"]["plain"], entry["task_peak"]["stats"]
            print(f"  one task's peak: plain {plain_peak / 2**20:.1f} MiB (bound {entry['task_bound']['plain'] / 2**20:.1f}), "
                  f"--stats {stats_peak / 2**20:.1f} MiB (bound {entry['task_bound']['stats'] / 2**20:.1f}): "
                  f"{stats_peak / plain_peak:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def products(args: argparse.Namespace) -> None:
    """Whole jobs with --stats, --stats --dot (16 random query gradients) and --stats --sketch 32,32, interleaved."""
    import numpy as np

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dconv-bench-products-"))
    print(cpu_description())
    print(f"BLAS: {blas_info()}")
    print(f"m = {args.m}, float32, batch_chunk {args.batch_chunk}, {args.workers} workers x 1 thread, "
          f"{args.rounds} interleaved rounds (medians of the job time)")
    results: dict = {"cpu": cpu_info(), "m": args.m, "layers": {}}
    with connect(ClusterOptions(workers=args.workers), quiet=True) as client:
        for layer in args.layers:
            recipe = LAYERS[layer]
            path = str(workdir / f"in-{layer.split()[0]}.zarr")
            make_inputs(path, m=args.m, chunk=args.batch_chunk, dtype="float32", overwrite=True, seed=1, shared=0.5,
                        **recipe)
            k = recipe["kernel"]
            rng = np.random.default_rng(0)
            queries = str(workdir / f"q-{layer.split()[0]}.zarr")
            dconv.write_queries(queries, {None: (rng.standard_normal((16, k, k, recipe["in_channels"], recipe["out_channels"])),
                                                 rng.standard_normal((16, recipe["out_channels"])))}, overwrite=True)
            variants = {"stats": {"stats": True}, "dot16": {"stats": True, "dot": queries},
                        "sketch32": {"stats": True, "sketch": (32, 32)}}
            times: dict[str, list[float]] = {name: [] for name in variants}
            dconv.backward_job(path, workdir / "warm.zarr", client=client, batch_chunk=args.batch_chunk, overwrite=True)
            names = list(variants)
            for round_ in range(args.rounds):
                for name in names[round_ % 3:] + names[: round_ % 3]:
                    result = dconv.backward_job(path, workdir / f"out-{name}.zarr", client=client,
                                                batch_chunk=args.batch_chunk, overwrite=True, **variants[name])
                    times[name].append(result.seconds["compute"])
            median = {name: statistics.median(values) for name, values in times.items()}
            results["layers"][layer] = {"seconds": times, "median": median}
            print(f"{layer}: --stats {median['stats']:.2f} s; --dot 16 queries {median['dot16'] / median['stats']:.2f}x; "
                  f"--sketch 32,32 {median['sketch32'] / median['stats']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

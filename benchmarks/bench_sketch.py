"""What the per-sample inner products and sketches cost the kernel: one chunk's ``backward_kernel``, side by side.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command only::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sketch.py

For each of three layers (float32, one chunk of m = 256, as the job layer calls the kernel: one
thread, single-threaded BLAS, ``float64_sums=True``, with dA_prev), it times ``stats=True`` alone,
with 16 queries (and with 16 queries by a float64 GEMM per block of samples, the NumPy route, where the
compiled ``query_dots`` would run: :func:`dconv.kernel.dispatch.use_compiled_query_dots` replaced), and
with a 32 x 32 Gaussian sketch by the route :func:`dconv.kernel.sketch.sketch_route` picks, and by each
route forced. The variants are interleaved in each round, their order rotating from round to round;
each one's median counts. It prints the ratios to ``stats=True`` alone.

With ``--tasks``, it also estimates what the products would cost a ``--stats`` job: it writes a Zarr
input of ``--task-chunks`` chunks of m samples per layer, plans a ``stats=True`` job, and times whole
chunk tasks in this process (``JobPlan.run_chunk``: read, compute, write), their kernel call made to
compute the queries' inner products or the sketch as well (and drop them: the job layer does not store
them yet, so their writes, 8 * m * 16 and 8 * m * 32 * 32 bytes a chunk, are not in the figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import threadpoolctl

from bench_kernel import blas_info, cpu_description, cpu_info
from dconv.kernel import backward_kernel, dispatch
from dconv.kernel.sketch import gaussian_projections, sketch_route
from dconv.params import ConvParams, backward_geometry

LAYERS = {
    "32x32x16->32 3x3 s1": ((32, 32, 16), (3, 3, 16, 32), dict(stride=1, padding=1)),
    "16x16x64->128 3x3 s2": ((16, 16, 64), (3, 3, 64, 128), dict(stride=2, padding=1)),
    "8x8x128->128 1x1": ((8, 8, 128), (1, 1, 128, 128), dict(stride=1, padding=0)),
}


def layer_arrays(layer: str, m: int, seed: int = 0):
    """``(dZ, A_prev, W, geometry)`` of ``layer``, float32."""
    (height, width, c_prev), w_shape, kwargs = LAYERS[layer]
    params = ConvParams.parse(**kwargs)
    out_hw = params.resolve((height, width), w_shape[:2]).out_hw
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, height, width, c_prev), dtype=np.float32)
    w = rng.standard_normal(w_shape, dtype=np.float32)
    dz = rng.standard_normal((m, *out_hw, w_shape[3]), dtype=np.float32)
    return dz, a, w, backward_geometry(dz.shape, a.shape, w.shape, params)


GEMM_DOTS = "gemm_dots"
"""A variant's key (not a kernel argument): its inner products by the GEMM, not ``_flatconv.query_dots``."""


def call_kernel(dz, a, w, geometry, **kwargs):
    """``backward_kernel`` as the job layer calls it, with ``stats=True``; ``gemm_dots=True``: the GEMM route."""
    if not kwargs.pop(GEMM_DOTS, False):
        return backward_kernel(dz, a, w, geometry, 1, True, stats=True, **kwargs)
    compiled = dispatch.use_compiled_query_dots
    dispatch.use_compiled_query_dots = lambda: False
    try:
        return backward_kernel(dz, a, w, geometry, 1, True, stats=True, **kwargs)
    finally:
        dispatch.use_compiled_query_dots = compiled


def variants(w_shape, n_queries: int, k_in: int, k_out: int) -> dict[str, dict]:
    """The keyword arguments of each timed call, beside ``stats=True``."""
    k1, c_out = int(np.prod(w_shape[:3])) + 1, w_shape[3]
    queries = np.random.default_rng(1).standard_normal((n_queries, k1, c_out))
    proj = gaussian_projections(k_in, k_out, k1, c_out, seed=2, dtype=np.float32)
    return {
        "stats": {},
        f"+{n_queries} queries": {"queries": queries},
        f"+{n_queries} queries gemm": {"queries": queries, GEMM_DOTS: True},
        f"+sketch {k_in}x{k_out}": {"projections": proj},
        "+sketch gram": {"projections": proj._replace(route="gram")},
        "+sketch kronecker": {"projections": proj._replace(route="kronecker")},
    }


def run_tasks(args: argparse.Namespace, layer: str, workdir: Path) -> dict:
    """Median seconds of one chunk task of a ``stats=True`` job, per variant (see the module docstring)."""
    import dconv
    import dconv.graph
    from dconv.kernel import GradientsWithStats
    from dconv.store import make_inputs

    (height, width, c_prev), w_shape, kwargs = LAYERS[layer]
    path, out = str(workdir / f"in-{layer.split()[0]}.zarr"), str(workdir / "out.zarr")
    make_inputs(path, m=args.m * args.task_chunks, chunk=args.m, dtype="float32", overwrite=True, seed=1,
                height=height, width=width, in_channels=c_prev, out_channels=w_shape[3], kernel=w_shape[0], **kwargs)
    plan = dconv.plan_job(path, out, batch_chunk=args.m, overwrite=True, stats=True)
    plan.open_output()
    calls = variants(w_shape, args.queries, *args.k)
    names = ["stats", f"+{args.queries} queries", f"+sketch {args.k[0]}x{args.k[1]}"]
    kernel = dconv.graph.backward_kernel
    times: dict[str, list[float]] = {name: [] for name in names}
    products_made = []
    try:
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                def with_products(*call_args, **call_kwargs):
                    grads = kernel(*call_args, **call_kwargs, **calls[name])
                    products_made.append(len(grads) > 4)
                    return GradientsWithStats(*grads[:4]) if calls[name] else grads
                dconv.graph.backward_kernel = with_products
                index = round_ % args.task_chunks
                start = time.perf_counter()
                plan.run_chunk(index)
                times[name].append(time.perf_counter() - start)
    finally:
        dconv.graph.backward_kernel = kernel
    if sum(products_made) != 2 * args.rounds:
        raise RuntimeError(f"the chunk tasks did not call the patched kernel: {products_made}")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--k", type=int, nargs=2, default=(32, 32), metavar=("K_IN", "K_OUT"))
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=list(LAYERS), metavar="LAYER")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--tasks", action="store_true", help="also time whole chunk tasks of a --stats job")
    parser.add_argument("--task-chunks", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where --tasks writes its Zarr stores (default: a temp dir)")
    args = parser.parse_args()

    print(cpu_description())
    print(f"BLAS: {blas_info()}")
    print(f"float32, m = {args.m}, threads=1, single-threaded BLAS, float64_sums, with dA_prev; "
          f"{args.rounds} interleaved rounds (medians)")
    results: dict = {"cpu": cpu_info(), "blas": blas_info(), "m": args.m, "layers": {}}
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        for layer in args.layers:
            dz, a, w, geometry = layer_arrays(layer, args.m)
            calls = variants(w.shape, args.queries, *args.k)
            times: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for name in names:                                          # warm up
                call_kernel(dz, a, w, geometry, **calls[name])
            for round_ in range(args.rounds):
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    start = time.perf_counter()
                    call_kernel(dz, a, w, geometry, **calls[name])
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(values) for name, values in times.items()}
            route = sketch_route(geometry, w.shape, *args.k)
            results["layers"][layer] = {"seconds": times, "median": median, "route": route}
            print(f"\n{layer} (auto route: {route}):")
            for name in names:
                print(f"  {name:20s} median {1e3 * median[name]:8.2f} ms   {median[name] / median['stats']:.2f}x stats")
            if args.tasks:
                import tempfile

                workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dconv-bench-sketch-"))
                task = run_tasks(args, layer, workdir)
                results["layers"][layer]["task_median"] = task
                print("  whole chunk tasks of a --stats job (read, compute, write):")
                for name, seconds in task.items():
                    print(f"  {name:20s} median {1e3 * seconds:8.2f} ms   {seconds / task['stats']:.2f}x stats")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Where a small job's time goes on the embedded cluster: imports, plan, cluster start, output, compute, close.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command only::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_start.py [--m 64] [--rounds 3]

Each round, interleaved, times as whole commands (wall clock, imports included):

- ``bare``: a 2-worker ``distributed.LocalCluster`` that starts, runs one task and closes;
- ``embedded``: ``dconv backward`` of ``--m`` samples on the embedded cluster (2 workers);
- ``threads``: the same with ``--scheduler threads``;
- ``version``: ``dconv --version``;

then runs the embedded job once more in a child process that prints, for each step of
:func:`dconv.job.run_job`, when it started and ended, counted from the process's start.
The best round of each command is printed, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import distributed
if __name__ == "__main__":
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster) as client:
        client.submit(sum, [1, 2]).result()
"""

STEPS = {  # module, function: a step of a job, timed where it is called from
    "plan": ("dconv.plan", "plan_job"),
    "cluster start": ("dconv.cluster", "_local_client"),
    "  LocalCluster(): workers spawn and join": ("distributed", "LocalCluster.__init__"),
    "  Client()": ("distributed", "Client.__init__"),
    "  client.run (warm-up import; preflight)": ("distributed", "Client.run"),
    "preflight (client.run level_report)": ("dconv.job", "check_simd"),
    "open the output": ("dconv.plan", "JobPlan.open_output"),
    "graph": ("dconv.plan", "JobPlan.graph"),
    "compute": ("dconv.job", "compute_with_progress"),
    "finish the output": ("dconv.store.output", "OutputStore.finish"),
}


def timed_child(inputs: str, out: str, launched: float) -> None:
    """Run the embedded job here, printing each step's start and end (seconds since ``launched``, the
    ``time.time()`` at which the parent started this process)."""
    import contextlib
    import functools
    import importlib

    marks: list[tuple[str, float, float]] = []
    clock = lambda: time.time() - launched  # noqa: E731
    marks.append(("python start and imports up to dconv.job", 0.0, 0.0))
    import dconv.job  # noqa: F401

    marks[-1] = (marks[-1][0], 0.0, clock())
    start = clock()
    import distributed  # noqa: F401

    marks.append(("import distributed", start, clock()))

    def wrap(name, owner, attribute):
        original = getattr(owner, attribute)
        if name == "cluster start":
            @contextlib.contextmanager
            def timed(*args, **kwargs):
                start = clock()
                with original(*args, **kwargs) as value:
                    marks.append((name, start, clock()))
                    yield value
                    closing = clock()
                marks.append(("cluster close", closing, clock()))
        else:
            @functools.wraps(original)
            def timed(*args, **kwargs):
                start = clock()
                try:
                    return original(*args, **kwargs)
                finally:
                    marks.append((name, start, clock()))
        setattr(owner, attribute, timed)

    for name, (module, path) in STEPS.items():
        owner = importlib.import_module(module)
        *classes, attribute = path.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        wrap(name, owner, attribute)
    from dconv.cli import main

    start = clock()
    main(["backward", inputs, out, "--overwrite"])
    marks.append(("whole command in main()", start, clock()))
    marks.append(("exit", clock(), clock()))
    print(json.dumps(marks))


def wall(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        timed_child(args.child[0], args.child[1], float(args.child[2]))
        return
    work = tempfile.mkdtemp(prefix="bench_start-")
    try:
        dconv = [sys.executable, "-m", "dconv"]
        subprocess.run([*dconv, "make-inputs", "in.zarr", "--m", str(args.m), "--overwrite"], cwd=work, check=True,
                       capture_output=True)
        Path(work, "bare.py").write_text(BARE)
        commands = {
            "bare": [sys.executable, "bare.py"],
            "embedded": [*dconv, "backward", "in.zarr", "out.zarr", "--overwrite"],
            "threads": [*dconv, "backward", "in.zarr", "out.zarr", "--overwrite", "--scheduler", "threads"],
            "version": [*dconv, "--version"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(wall(command, work))
        best = {name: min(values) for name, values in times.items()}
        for name, seconds in best.items():
            every = ", ".join(f"{t:.2f}" for t in times[name])
            print(f"{name:9} {seconds:6.2f} s (best of {args.rounds}; all {every})")
        print(f"embedded / bare: {best['embedded'] / best['bare']:.2f}x; embedded / threads: "
              f"{best['embedded'] / best['threads']:.2f}x")
        child = subprocess.run([sys.executable, __file__, "--child", "in.zarr", "out.zarr", repr(time.time())],
                               cwd=work, check=True, capture_output=True, text=True)
        print("steps of one embedded job (seconds since its process was started):")
        for name, start, end in sorted(json.loads(child.stdout.strip().splitlines()[-1]), key=lambda mark: mark[1]):
            print(f"  {start:6.2f} -> {end:6.2f}  ({end - start:5.2f} s)  {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

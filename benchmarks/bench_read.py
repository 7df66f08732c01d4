"""Input reads: dconv's fast chunk reader against zarr's public read, side by side.

Run from the repository root, with the machine's OpenBLAS overrides unset for this
command only (see the README's benchmark section)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_read.py
    python benchmarks/bench_read.py --m 1024 --rounds 5     # quicker

It writes an input with ``make_inputs`` (by default m = 4096 in chunks of 256 samples,
A_prev 32x32x16 and dZ 32x32x32 float32, Blosc LZ4 with shuffle) to a local store, then
reads every chunk of A_prev and dZ with :func:`dconv.store.read_batch`, the fast reader
on (``DCONV_FAST_READ`` unset) and off (``DCONV_FAST_READ=0``: zarr's ``array[start:stop]``).
The two are interleaved chunk by chunk, the order alternating from round to round, so
both see the same page cache and the same noise from other processes. Figures are
medians over rounds: per chunk (the median over chunks of each chunk's median), and per
pass over the whole array (the median over rounds of the summed chunk times). Both reads
are checked to give the same bytes. Everything runs in one process; the chunk files
stay in the page cache (written just before), so this times decoding and copying, not
the disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time

import numcodecs
import numpy as np
import zarr

from dconv.store import fastread, make_inputs, open_inputs, read_batch

MODES = ("fast", "zarr")
"""``fast``: dconv's fast chunk reader; ``zarr``: zarr's public read (``DCONV_FAST_READ=0``)."""


def cpu_description() -> str:
    """The CPU model (lscpu), family/model numbers, and the SIMD features that matter here."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if ":" in line
        )
    except OSError:
        fields = {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("Flags", "").split())
    features = [f for f in ("avx512f", "avx2", "fma", "sse4_2", "asimd") if f in flags]
    return (
        f"CPU: {fields.get('Model name', platform.processor() or platform.machine())} "
        f"(family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')}; "
        f"{fields.get('CPU(s)', os.cpu_count())} CPUs; {platform.machine()}; ISA: {', '.join(features) or 'baseline'})"
    )


def read_chunk(array: zarr.Array, name: str, start: int, stop: int, mode: str) -> tuple[float, np.ndarray]:
    """Seconds to read ``array[start:stop]`` through ``read_batch`` with the fast reader on or off, and the rows."""
    if mode == "zarr":
        os.environ[fastread.FAST_READ_ENV] = "0"
    else:
        os.environ.pop(fastread.FAST_READ_ENV, None)
    began = time.perf_counter()
    rows = read_batch(array, name, start, stop)
    return time.perf_counter() - began, rows


def run(path: str, rounds: int) -> dict[str, dict[str, np.ndarray]]:
    """``{array: {mode: seconds[round, chunk]}}`` over interleaved rounds."""
    group = open_inputs(path)
    arrays = {"A_prev": group.A_prev, "dZ": group.dZ}
    times = {}
    for name, array in arrays.items():
        size, m = array.chunks[0], array.shape[0]
        starts = range(0, m, size)
        times[name] = {mode: np.empty((rounds, len(starts))) for mode in MODES}
        for r in range(rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for c, start in enumerate(starts):
                stop = min(start + size, m)
                rows = {}
                for mode in order:
                    times[name][mode][r, c], rows[mode] = read_chunk(array, name, start, stop, mode)
                if r == 0 and rows["fast"].tobytes() != rows["zarr"].tobytes():
                    raise SystemExit(f"{name}[{start}:{stop}]: the fast read and zarr's read differ")
    os.environ.pop(fastread.FAST_READ_ENV, None)
    return times


def report(times: dict[str, dict[str, np.ndarray]], arrays: dict[str, zarr.Array]) -> None:
    print(f"{'array':8} {'chunk':>18} {'read':5} {'per chunk':>10} {'per pass':>9}   zarr / fast")
    totals = {mode: 0.0 for mode in MODES}
    for name, by_mode in times.items():
        array = arrays[name]
        chunk_mib = array.chunks[0] * np.prod(array.shape[1:]) * np.dtype(array.dtype).itemsize / 2**20
        per_chunk = {mode: float(np.median(np.median(t, axis=0))) for mode, t in by_mode.items()}
        per_pass = {mode: float(np.median(t.sum(axis=1))) for mode, t in by_mode.items()}
        for mode in MODES:
            totals[mode] += per_pass[mode]
            ratio = (
                f"{per_chunk['zarr'] / per_chunk['fast']:.2f}x per chunk, "
                f"{per_pass['zarr'] / per_pass['fast']:.2f}x per pass"
                if mode == "zarr"
                else ""
            )
            print(
                f"{name:8} {f'{array.chunks[0]} ({chunk_mib:.0f} MiB)':>18} {mode:5} "
                f"{per_chunk[mode] * 1e3:8.1f} ms {per_pass[mode]:7.3f} s   {ratio}"
            )
    print(
        f"both arrays, one pass: fast {totals['fast']:.3f} s, zarr {totals['zarr']:.3f} s "
        f"(zarr / fast {totals['zarr'] / totals['fast']:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=4096, help="samples in the input (default 4096)")
    parser.add_argument("--chunk", type=int, default=256, help="samples per chunk (default 256)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--dir", default=None, help="where to write the input (default: a temporary directory)")
    args = parser.parse_args()

    print(cpu_description())
    print(
        f"numpy {np.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__} "
        f"(Blosc threads {numcodecs.blosc.get_nthreads()}); fast reader available: "
        f"{fastread._unavailable is None}"
    )
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", fastread.FAST_READ_ENV):
        if key in os.environ:
            print(f"note: {key}={os.environ[key]} is set")
    workdir = tempfile.mkdtemp(prefix="bench-read-", dir=args.dir)
    try:
        path = os.path.join(workdir, "in.zarr")
        began = time.perf_counter()
        make_inputs(path, m=args.m, chunk=args.chunk)
        print(f"input: m={args.m}, chunks of {args.chunk}, written in {time.perf_counter() - began:.1f} s; "
              f"{args.rounds} interleaved rounds, medians\n")
        group = open_inputs(path)
        report(run(path, args.rounds), {"A_prev": group.A_prev, "dZ": group.dZ})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Input reads: dconv's fast chunk reader against zarr's public read, codec by codec.

Run from the repository root, with the machine's OpenBLAS overrides unset for this
command only (see the README's benchmark section)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_read.py
    python benchmarks/bench_read.py --m 512 --rounds 3 --codecs zstd none     # quicker

For each codec chain (``--codecs``; default all of them) it writes one float32 array
of dZ's shape in the README's layer, (m, 32, 32, 32), m = 2048 by default, in chunks
of 256 samples (32 MiB) to a local store:

- ``zstd``: zarr-python 3's default codecs (bytes, then zstd level 0);
- ``none``: bytes only;
- ``blosc-lz4``: Blosc LZ4 with byte shuffle (what ``make_inputs`` writes);
- ``gzip``: gzip level 5 (zarr's default level);
- ``sharded+zstd``: shards of 1024 samples holding inner chunks of 256, bytes + zstd.

Then it reads every chunk with :func:`dconv.store.read_batch`, the fast reader on
(``DCONV_FAST_READ`` unset) and off (``DCONV_FAST_READ=0``: zarr's ``array[start:stop]``),
interleaved chunk by chunk, the order alternating from round to round, so both see the
same page cache and the same noise from other processes. Both are checked to give the
same bytes. Everything runs in one process, Blosc on one thread (``numcodecs.blosc.use_threads
= False``, as in a dconv worker's task thread); the chunk files stay in the page cache
(written just before), so this times decoding and copying, not the disk.

Figures are GB/s of decoded bytes (1 GB = 1e9 bytes): per core, the bytes over the CPU
seconds the process spent (all its threads: zarr decodes in a thread pool), and per
wall-clock second; each is the median over rounds of one pass over the array.
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
import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from dconv.store import fastread, read_batch

MODES = ("fast", "zarr")
"""``fast``: dconv's fast chunk reader; ``zarr``: zarr's public read (``DCONV_FAST_READ=0``)."""

CODECS = {
    "zstd": {},  # zarr-python 3's default: bytes + zstd
    "none": {"compressors": None},
    "blosc-lz4": {"compressors": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)},
    "gzip": {"compressors": GzipCodec(level=5)},
    "sharded+zstd": {"compressors": ZstdCodec(), "shards": "shard"},
}
"""Codec chain -> ``create_array`` arguments (``"shard"`` stands for the shard shape)."""


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


def write_array(path: str, codec: str, m: int, chunk: int, shard: int) -> zarr.Array:
    """The array of ``codec``: (m, 32, 32, 32) float32 standard normal noise, written ``chunk`` samples at a time."""
    options = dict(CODECS[codec])
    if options.get("shards") == "shard":
        options["shards"] = (shard, 32, 32, 32)
    array = zarr.open_group(path, mode="a").create_array(
        codec, shape=(m, 32, 32, 32), chunks=(chunk, 32, 32, 32), dtype="float32", **options
    )
    rng = np.random.default_rng(0)
    step = options.get("shards", (chunk,))[0]
    for start in range(0, m, step):
        stop = min(start + step, m)
        array[start:stop] = rng.standard_normal((stop - start, 32, 32, 32), dtype=np.float32)
    return array


def read_chunk(array: zarr.Array, start: int, stop: int, mode: str) -> tuple[float, float, np.ndarray]:
    """Wall and CPU seconds to read ``array[start:stop]`` through ``read_batch`` with the fast reader on or off."""
    if mode == "zarr":
        os.environ[fastread.FAST_READ_ENV] = "0"
    else:
        os.environ.pop(fastread.FAST_READ_ENV, None)
    wall, cpu = time.perf_counter(), time.process_time()
    rows = read_batch(array, array.basename, start, stop)
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def run(array: zarr.Array, rounds: int) -> dict[str, np.ndarray]:
    """``{mode: seconds[round, wall or cpu]}``: one pass over the array's chunks per round, interleaved."""
    size, m = array.chunks[0], array.shape[0]
    times = {mode: np.zeros((rounds, 2)) for mode in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for start in range(0, m, size):
            stop = min(start + size, m)
            rows = {}
            for mode in order:
                wall, cpu, rows[mode] = read_chunk(array, start, stop, mode)
                times[mode][r] += (wall, cpu)
            if r == 0 and rows["fast"].tobytes() != rows["zarr"].tobytes():
                raise SystemExit(f"{array.basename}[{start}:{stop}]: the fast read and zarr's read differ")
    os.environ.pop(fastread.FAST_READ_ENV, None)
    return times


def stored_bytes(path: str) -> int:
    """Bytes on disk of the chunks (or shards) stored under ``path``."""
    files = (os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    return sum(os.path.getsize(file) for file in files if os.path.basename(file) != "zarr.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=2048, help="samples in each array (default 2048)")
    parser.add_argument("--chunk", type=int, default=256, help="samples per chunk (default 256)")
    parser.add_argument("--shard", type=int, default=1024, help="samples per shard of sharded+zstd (default 1024)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS), help="default: all")
    parser.add_argument("--dir", default=None, help="where to write the arrays (default: a temporary directory)")
    args = parser.parse_args()

    numcodecs.blosc.use_threads = False  # one thread, as in a dconv worker's task
    print(cpu_description())
    print(
        f"numpy {np.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__} "
        f"(Blosc on one thread); fast reader available: {fastread._unavailable is None}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", fastread.FAST_READ_ENV):
        if key in os.environ:
            print(f"note: {key}={os.environ[key]} is set")
    chunk_mib = args.chunk * 32 * 32 * 32 * 4 / 2**20
    print(
        f"arrays (m={args.m}, 32, 32, 32) float32 in chunks of {args.chunk} samples ({chunk_mib:.0f} MiB), "
        f"standard normal noise; {args.rounds} interleaved rounds, medians of a pass\n"
    )
    header = f"{'codec':13} {'stored':>7} {'read':5} {'GB/s per core':>13} {'GB/s wall':>10} {'path':>22}"
    print(f"{header}   zarr / fast (CPU)")
    workdir = tempfile.mkdtemp(prefix="bench-read-", dir=args.dir)
    try:
        path = os.path.join(workdir, "in.zarr")
        for codec in args.codecs:
            array = write_array(path, codec, args.m, args.chunk, args.shard)
            nbytes = array.nbytes
            stored = stored_bytes(os.path.join(path, codec)) / nbytes
            times = run(array, args.rounds)
            wall = {mode: float(np.median(t[:, 0])) for mode, t in times.items()}
            cpu = {mode: float(np.median(t[:, 1])) for mode, t in times.items()}
            for mode in MODES:
                ratio = f"{cpu['zarr'] / cpu['fast']:.2f}x" if mode == "zarr" else ""
                where = (fastread.read_path(array) or "zarr") if mode == "fast" else "zarr"
                print(
                    f"{codec:13} {stored:7.3f} {mode:5} {nbytes / cpu[mode] / 1e9:13.2f} "
                    f"{nbytes / wall[mode] / 1e9:10.2f} {where:>22}   {ratio}"
                )
            shutil.rmtree(os.path.join(path, codec), ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

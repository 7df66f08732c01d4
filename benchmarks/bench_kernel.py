"""Benchmark the NumPy conv2d backward kernel against PyTorch and the loop reference.

A script, not a test. Run it with the OpenBLAS overrides of this machine
removed, so that OpenBLAS picks its native kernel::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py --quick
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py --dtype float32 --json out.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py --paths   # loops vs GEMMs, per layer
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py --stats   # statistics, no dA_prev

The SIMD level of dconv's compiled loops is ``DCONV_SIMD`` (or ``--level``). To
hold the others to the same instruction set, set their variables on the command
(before torch is imported), for example on an AVX-512 machine::

    DCONV_SIMD=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell \
        env -u OPENBLAS_L2_SIZE python benchmarks/bench_kernel.py

What is timed, per layer and dtype:

- ``dconv``: one call of :func:`dconv.conv2d_backward` on NHWC/HWIO arrays
  (validation included), returning ``(dA_prev, dW, db)``.
- ``torch``: one call of ``torch.ops.aten.convolution_backward`` (what CPU
  autograd runs for a conv) on NCHW-contiguous / OIHW tensors prepared outside
  the timed region, computing grad_input, grad_weight and grad_bias. Layers
  whose padding is asymmetric are zero-padded before the timed region and run
  with padding 0 (torch then also computes the gradient of the pad ring).
- ``loops``: :func:`dconv.reference.conv2d_backward_loops` on the first
  ``m_loops`` samples (1 or 2) only, scaled linearly to the layer's batch.

Each time is the minimum over ``repeats`` samples; a sample is the mean of
``number`` back-to-back calls. dconv and torch samples are interleaved so that
machine noise hits both alike. GF/s counts the two GEMMs of the backward
pass, ``2 * (2 * M * K * N)`` with ``M = m * n_H * n_W``,
``K = fh * fw * C_prev``, ``N = C``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import threadpoolctl

import dconv
from dconv import simd
from dconv.kernel import dispatch
from dconv.params import ConvParams, backward_geometry, forward_geometry
from dconv.reference import conv2d_backward_loops

try:  # torch is optional
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


@dataclass(frozen=True)
class Layer:
    """One conv layer of the suite: NHWC input (m, H, W, C_prev), HWIO kernel (fh, fw, C_prev, C)."""

    name: str
    m: int
    hw: tuple[int, int]
    c_prev: int
    c: int
    f: tuple[int, int]
    stride: int = 1
    padding: object = 0
    dilation: int = 1
    m_loops: int = 1
    large: bool = False
    quick: bool = False

    def params(self) -> ConvParams:
        return ConvParams.parse(self.stride, self.padding, self.dilation)

    def geometry(self):
        return forward_geometry((self.m, *self.hw, self.c_prev), (*self.f, self.c_prev, self.c), self.params())

    def flops(self) -> float:
        """FLOPs of the backward pass: two GEMMs of 2*M*K*N."""
        n_h, n_w = self.geometry().out_hw
        big_m, big_k, big_n = self.m * n_h * n_w, self.f[0] * self.f[1] * self.c_prev, self.c
        return 2.0 * (2.0 * big_m * big_k * big_n)

    def describe(self) -> str:
        text = f"m={self.m} {self.hw[0]}x{self.hw[1]}x{self.c_prev}->{self.c} f={self.f[0]}x{self.f[1]}"
        text += f" s{self.stride}"
        if self.dilation != 1:
            text += f" d{self.dilation}"
        pad = self.padding
        text += f" p{pad}" if isinstance(pad, int) else f" p={pad!r}"
        return text


SUITE = [
    Layer("first 5x5 c3", 32, (64, 64), 3, 32, (5, 5), 1, 2, quick=True),
    Layer("first 5x5 c1", 64, (28, 28), 1, 16, (5, 5), 1, 2),
    Layer("classic 3x3 c16", 64, (32, 32), 16, 32, (3, 3), 1, 1, m_loops=2, quick=True),
    Layer("3x3 c16 s1", 64, (32, 32), 16, 16, (3, 3), 1, 1),
    Layer("3x3 c32 s1", 32, (32, 32), 32, 32, (3, 3), 1, 1),
    Layer("3x3 c64 s1", 32, (16, 16), 64, 64, (3, 3), 1, 1, large=True, quick=True),
    Layer("3x3 c128 s1", 32, (16, 16), 128, 128, (3, 3), 1, 1, large=True),
    Layer("3x3 c32 s2", 64, (32, 32), 32, 64, (3, 3), 2, 1),
    Layer("3x3 c64 s2 same", 32, (32, 32), 64, 128, (3, 3), 2, "same", quick=True),
    Layer("3x3 c128 s2", 32, (16, 16), 128, 128, (3, 3), 2, 1, large=True),
    Layer("1x1 c64->128", 32, (16, 16), 64, 128, (1, 1), 1, 0, large=True, quick=True),
    Layer("1x1 c128->32 s2", 32, (32, 32), 128, 32, (1, 1), 2, 0),
    Layer("3x3 c32 dil2", 32, (32, 32), 32, 32, (3, 3), 1, 2, dilation=2, quick=True),
    Layer("3x5 c16 rect", 32, (32, 32), 16, 32, (3, 5), 1, ((1, 1), (2, 2))),
]

CLASSIC = Layer("classic (vs loops)", 64, (32, 32), 16, 32, (3, 3), 1, 1, m_loops=2)


# ----------------------------------------------------------------------------- timing


REST = 0.02
"""Seconds of sleep before each sample. After a call, PyTorch's OpenMP worker spins for about
5 ms (measured: 4-5 ms of CPU in a 20-50 ms sleep after one call), which took a core from
the first milliseconds of the dconv sample that followed it."""


def time_calls(fns, *, repeats: int, target: float) -> list[float]:
    """Per-call time of each zero-argument callable: min over interleaved samples.

    Each callable gets its own ``number`` of calls per sample, sized so that a
    sample lasts about ``target`` seconds. Each sample starts after :data:`REST`.
    """
    numbers = []
    for fn in fns:
        fn()  # warm up (allocations, BLAS buffers, torch's primitive cache)
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        numbers.append(max(1, min(1000, int(target / max(once, 1e-7)))))
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for index, (fn, number) in enumerate(zip(fns, numbers)):
            time.sleep(REST)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[index] = min(best[index], (time.perf_counter() - start) / number)
    return best


def chosen_layers(args: argparse.Namespace) -> list[Layer]:
    """The suite's layers ``--quick`` keeps, or all of them."""
    return [layer for layer in SUITE if layer.quick] if args.quick else list(SUITE)


def chosen_dtypes(args: argparse.Namespace) -> list[np.dtype]:
    """The dtypes ``--dtype`` names (``both``: float32, then float64)."""
    return [np.dtype(d) for d in (["float32", "float64"] if args.dtype == "both" else [args.dtype])]


def make_arrays(layer: Layer, dtype: np.dtype, m: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    m = layer.m if m is None else m
    geometry = layer.geometry()
    A_prev = rng.standard_normal((m, *layer.hw, layer.c_prev)).astype(dtype)
    W = rng.standard_normal((*layer.f, layer.c_prev, layer.c)).astype(dtype)
    dZ = rng.standard_normal((m, *geometry.out_hw, layer.c)).astype(dtype)
    return dZ, A_prev, W


def dconv_call(layer: Layer, arrays):
    dZ, A_prev, W = arrays
    kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    return lambda: dconv.conv2d_backward(dZ, A_prev, W, **kwargs)


def torch_call(layer: Layer, arrays):
    """A closure running aten.convolution_backward on NCHW tensors built here (not timed)."""
    dZ, A_prev, W = arrays
    geometry = layer.geometry()
    (top, bottom), (left, right) = geometry.pads
    x = torch.from_numpy(np.ascontiguousarray(A_prev.transpose(0, 3, 1, 2)))
    if top == bottom and left == right:
        padding = [top, left]
    else:  # torch pads symmetrically only: pad outside the timed region
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        padding = [0, 0]
    x = x.contiguous()
    w = torch.from_numpy(np.ascontiguousarray(W.transpose(3, 2, 0, 1)))
    gy = torch.from_numpy(np.ascontiguousarray(dZ.transpose(0, 3, 1, 2)))
    stride, dilation = list(geometry.stride), list(geometry.dilation)
    backward = torch.ops.aten.convolution_backward

    def call():
        return backward(gy, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0], 1, [True, True, True])

    return call


def check_torch_matches(layer: Layer, arrays) -> float:
    """Max relative difference between dconv's and torch's dW (a sanity check of the torch setup)."""
    dW = dconv_call(layer, arrays)()[1]
    grads = torch_call(layer, arrays)()
    dW_torch = grads[1].numpy().transpose(2, 3, 1, 0)
    return float(np.abs(dW - dW_torch).max() / np.abs(dW_torch).max())


def time_loops(layer: Layer, dtype: np.dtype) -> float:
    """Loop-reference time scaled to the layer's batch from ``layer.m_loops`` samples (one run)."""
    dZ, A_prev, W = make_arrays(layer, dtype, m=layer.m_loops)
    start = time.perf_counter()
    conv2d_backward_loops(dZ, A_prev, W, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    return (time.perf_counter() - start) / layer.m_loops * layer.m


def gemm_rate(dtype: np.dtype, n: int, repeats: int) -> float:
    """GF/s of ``np.matmul`` on two n-by-n matrices (best of ``repeats``)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    (seconds,) = time_calls([lambda: np.matmul(a, b, out=out)], repeats=repeats, target=0.2)
    return 2.0 * n**3 / seconds / 1e9


# ----------------------------------------------------------------------------- machine


def cpu_info() -> dict:
    """The CPU model, its SIMD features that matter here, and dconv's SIMD levels on it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    features = [f for f in ("avx512f", "avx2", "fma", "asimd") if f in flags]
    return dict(model=model, machine=platform.machine(), features=features, levels=simd.simd_levels(),
                level=simd.active_level())


def torch_isa() -> dict:
    """What holds PyTorch (and OpenBLAS) to an instruction set in this run, if anything."""
    keys = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
    info = {key: os.environ.get(key) for key in keys}
    if torch is not None:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def cpu_description() -> str:
    info, isa = cpu_info(), torch_isa()
    return (f"CPU: {info['model']} ({info['machine']}; {', '.join(info['features']) or 'no AVX2/AVX-512/ASIMD'}); "
            f"dconv SIMD level {info['level']} (this machine runs {', '.join(info['levels'] + ['numpy'])}); "
            f"torch CPU capability {isa.get('torch_cpu_capability', '-')}, "
            f"ONEDNN_MAX_CPU_ISA={isa['ONEDNN_MAX_CPU_ISA'] or 'unset'}, OPENBLAS_CORETYPE={isa['OPENBLAS_CORETYPE'] or 'unset'}")


# ----------------------------------------------------------------------------- paths


PAIRINGS = {"loops+loops": (True, True), "loops+GEMM": (True, False), "GEMM+loops": (False, True), "GEMM+GEMM": (False, False)}
"""dA_prev path + dW path."""


def run_paths(args: argparse.Namespace) -> dict:
    """Time each layer with the compiled loops on or off for dA_prev and for dW (medians of interleaved rounds).

    Each pairing runs in a process of its own (:func:`time_pairing`), as a program that runs one layer the
    same way call after call: timed in one process, a pairing that follows the GEMM+GEMM pairing (OpenBLAS
    on every thread) was slowed by it (on the Zen 4 at 2 threads, 3x3 c128 s2 float32 with the loops: median
    19.9 ms after GEMM+GEMM samples against 13.9 ms after loops+GEMM samples; alone in its process 16.7-19.6 ms,
    and 3x3 c32 s2 9.1-11.1 ms alone against 21.1 ms interleaved). A round runs the four processes in turn.

    Shows which pairing :data:`dconv.kernel.dispatch.COMPILED_RULES` picks at this level, and its time over the
    fastest pairing's: the rule must never pick one more than 1.1x the fastest.
    """
    threads = args.threads or os.cpu_count() or 1
    suite, dtypes = chosen_layers(args), chosen_dtypes(args)
    level = simd.active_level()
    print(cpu_description())
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        blas = ", ".join(f"{b['internal_api']} {b['architecture']}" for b in blas_info() if b["user_api"] == "blas")
    print(f"threads: {threads}; BLAS: {blas}")
    print(f"per layer: conv2d_backward time (median of {args.rounds} rounds; each pairing timed in a process of "
          f"its own, the four in turn, best of 3 samples after {PAIRING_WARMUP} s of calls) with dA_prev + dW by "
          f"the compiled loops or the NumPy GEMMs; * = the rule's pick; pick/best must stay <= 1.10", flush=True)
    child = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--dtype", args.dtype,
             "--level", level] + (["--quick"] if args.quick else [])
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name in PAIRINGS:
            done = subprocess.run(child + ["--pairing", name], capture_output=True, text=True, check=True)
            for key, seconds in json.loads(done.stdout.splitlines()[-1]).items():
                samples.setdefault(key, {}).setdefault(name, []).append(seconds)
    rows = []
    for dtype in dtypes:
        for layer in suite:
            dZ, A_prev, W = make_arrays(layer, dtype)
            geometry = backward_geometry(dZ.shape, A_prev.shape, W.shape, layer.params())
            picked = (dispatch.use_compiled_input_grad(dtype, layer.c_prev, layer.c),
                      dispatch.use_compiled_weight_grad(dtype, layer.c_prev, layer.c, geometry))
            medians = {name: float(np.median(values)) for name, values in samples[f"{layer.name}|{dtype.name}"].items()}
            pick = next(name for name, on in PAIRINGS.items() if on == picked)
            best = min(medians.values())
            rows.append(dict(layer=layer.name, dtype=dtype.name, level=level, medians=medians, pick=pick,
                             pick_over_best=medians[pick] / best))
            cells = "  ".join(f"{name}{'*' if name == pick else ' '}{fmt_time(t):>9s}" for name, t in medians.items())
            print(f"{layer.name:18s} {dtype.name:7s} {cells}  pick/best {medians[pick] / best:4.2f}", flush=True)
    worst = max(rows, key=lambda r: r["pick_over_best"])
    print(f"level {level}: worst pick/best {worst['pick_over_best']:.2f} ({worst['layer']} {worst['dtype']})")
    return dict(mode="paths", cpu=cpu_info(), level=level, threads=threads, blas=blas_info(), rounds=args.rounds,
                isolation="one process per pairing and round", rows=rows)


PAIRING_WARMUP = 0.2
"""Seconds each layer runs in a ``--pairing`` process before it is timed: the first calls of a fresh process
map and fault in their temporaries, and glibc's mmap threshold has not yet risen to their size."""


def time_pairing(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Every layer of the suite with the loops of pairing ``name`` forced on or off, in this process: run for
    :data:`PAIRING_WARMUP` seconds, then the best of 3 samples; by ``"<layer>|<dtype>"``, in seconds (what
    ``--pairing`` prints, for :func:`run_paths`)."""
    threadpoolctl.threadpool_limits(limits=args.threads or os.cpu_count() or 1, user_api="blas")
    loops_in, loops_w = PAIRINGS[name]
    dispatch.use_compiled_input_grad = lambda *a: loops_in and _eligible_in(*a)
    dispatch.use_compiled_weight_grad = lambda *a: loops_w and _eligible_w(*a)
    suite, dtypes = chosen_layers(args), chosen_dtypes(args)
    times = {}
    for dtype in dtypes:
        for layer in suite:
            call = dconv_call(layer, make_arrays(layer, dtype))
            warm_until = time.perf_counter() + PAIRING_WARMUP
            while time.perf_counter() < warm_until:
                call()
            times[f"{layer.name}|{dtype.name}"] = time_calls([call], repeats=3, target=0.03)[0]
    return times


# ----------------------------------------------------------------------------- statistics


STATS_SUITE = [
    Layer("32x32x16->32 3x3 s1", 256, (32, 32), 16, 32, (3, 3), 1, 1),
    Layer("16x16x64->128 3x3 s2", 256, (16, 16), 64, 128, (3, 3), 2, 1),
    Layer("8x8x128->128 1x1", 256, (8, 8), 128, 128, (1, 1), 1, 0),
]
"""The three layers of issue 16, at a batch of 256 (one chunk of a job)."""

STATS_VARIANTS = {"full": (False, True), "stats": (True, True), "no dA_prev": (False, False),
                  "stats, no dA_prev": (True, False)}
"""name -> (stats, dA_prev) of backward_kernel."""


def thread_seconds(call) -> float:
    """The CPU time of the calling thread over one ``call()``: on a shared machine, the time other processes
    take from the core is not counted (their pressure on caches and memory still is)."""
    time.sleep(REST)
    start = time.thread_time()
    call()
    return time.thread_time() - start


def run_stats(args: argparse.Namespace) -> dict:
    """Kernel time of a job's chunk task, ``backward_kernel(..., threads=1, float64_sums=True)``, with the
    per-sample statistics and without dA_prev against the full pass: the four variants interleaved,
    ``args.rounds`` rounds, the calling thread's CPU time (everything runs on it: BLAS on 1 thread),
    medians and minima."""
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    dtypes = chosen_dtypes(args)
    print(cpu_description())
    print(f"kernel = dconv.kernel.backward_kernel(dZ, A_prev, W, geometry, threads=1, float64_sums=True, stats=.., "
          f"dA_prev=..), BLAS on 1 thread; thread CPU time over {args.rounds} interleaved rounds; median (min)")
    rows = []
    for dtype in dtypes:
        for layer in STATS_SUITE:
            dZ, A_prev, W = make_arrays(layer, dtype)
            geometry = backward_geometry(dZ.shape, A_prev.shape, W.shape, layer.params())
            calls = {
                name: (lambda s=stats, d=dA_prev: dconv.kernel.backward_kernel(
                    dZ, A_prev, W, geometry, threads=1, float64_sums=True, stats=s, dA_prev=d))
                for name, (stats, dA_prev) in STATS_VARIANTS.items()
            }
            samples = {name: [] for name in calls}
            for call in calls.values():
                call()                                            # warm up
            for _ in range(args.rounds):
                for name, call in calls.items():
                    samples[name].append(thread_seconds(call))
            medians = {name: float(np.median(values)) for name, values in samples.items()}
            minima = {name: float(np.min(values)) for name, values in samples.items()}
            ratios = {"stats/full": medians["stats"] / medians["full"],
                      "full/no dA_prev": medians["full"] / medians["no dA_prev"],
                      "stats, no dA_prev/no dA_prev": medians["stats, no dA_prev"] / medians["no dA_prev"]}
            rows.append(dict(layer=layer.name, shape=layer.describe(), dtype=dtype.name, level=simd.active_level(),
                             medians=medians, minima=minima, ratios=ratios))
            cells = "  ".join(f"{name} {fmt_time(medians[name])} ({fmt_time(minima[name])})" for name in calls)
            print(f"{layer.name:22s} {dtype.name:7s} {cells}", flush=True)
            print(f"{'':22s} {'':7s} " + "  ".join(f"{name} {value:.2f}x" for name, value in ratios.items()), flush=True)
    return dict(mode="stats", cpu=cpu_info(), level=simd.active_level(), blas=blas_info(), rounds=args.rounds, rows=rows)


def _eligible_in(dtype, c_prev, c_out) -> bool:
    """Whether the compiled dA_prev loop can take this layer at all (every rule limit lifted)."""
    lanes = dispatch.COMPILED_LANES.get(np.dtype(dtype).itemsize)
    if dispatch.compiled_level() is None or lanes is None:
        return False
    return c_prev % lanes == 0 or (c_prev <= dispatch.COMPILED_NARROW and c_out % lanes == 0)


def _eligible_w(dtype, c_prev, c_out, geometry) -> bool:
    """Whether the compiled dW loop can take this layer at all."""
    lanes = dispatch.COMPILED_LANES.get(np.dtype(dtype).itemsize)
    return dispatch.compiled_level() is not None and lanes is not None and c_out % lanes == 0


# ----------------------------------------------------------------------------- report


def blas_info() -> list[dict]:
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer", "prefix")
    return [{k: info.get(k) for k in keys} for info in threadpoolctl.threadpool_info()]


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def run(args: argparse.Namespace) -> dict:
    threads = args.threads or os.cpu_count() or 1
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    if torch is not None:
        torch.set_num_threads(threads)
    repeats = args.repeats or (3 if args.quick else 7)
    target = 0.02 if args.quick else 0.05
    suite, dtypes = chosen_layers(args), chosen_dtypes(args)

    print(f"python {platform.python_version()}, numpy {np.__version__}, dconv {dconv.__version__}, "
          f"torch {torch.__version__ if torch is not None else 'not installed'}")
    print(cpu_description())
    print(f"threads: {threads} (numpy BLAS via threadpoolctl, torch.set_num_threads); "
          f"torch.get_num_threads() = {torch.get_num_threads() if torch is not None else '-'}")
    print("BLAS libraries loaded (threadpoolctl.threadpool_info()):")
    for info in blas_info():
        print(f"  {info['user_api']:6s} internal_api={info['internal_api']} version={info['version']} "
              f"architecture={info['architecture']} num_threads={info['num_threads']} ({info['prefix']})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average (1 min) at start: {load:.2f} on {os.cpu_count()} cores"
              + ("  WARNING: the machine is busy, times will be inflated" if load > 0.5 * (os.cpu_count() or 1) else ""))
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"  WARNING: {var}={os.environ[var]} is set; OpenBLAS may not use its native kernel")

    gemm_n = 1024 if args.quick else 2048
    peak = {dtype.name: gemm_rate(dtype, gemm_n, repeats=3) for dtype in dtypes}

    print()
    print("dconv = dconv.conv2d_backward (NHWC in, validation included); torch = aten.convolution_backward "
          "on NCHW-contiguous tensors made outside the timed region (grad input+weight+bias); "
          f"loops = dconv.reference.conv2d_backward_loops timed on m_loops samples (one run), scaled to m. "
          f"Times: min over {repeats} interleaved samples. %peak = dconv GF/s / np.matmul GF/s.")
    header = (f"{'layer':18s} {'shape':44s} {'dtype':7s} {'dconv':>9s} {'torch':>9s} {'loops':>9s} "
              f"{'dconv GF/s':>10s} {'torch GF/s':>10s} {'loop GF/s':>9s} {'%peak':>6s} "
              f"{'dconv/torch':>11s} {'loops/dconv':>11s}")
    rows = []
    for dtype in dtypes:
        for layer in suite:
            print(f"  measuring {layer.name} {dtype.name} ...", file=sys.stderr, flush=True)
            arrays = make_arrays(layer, dtype)
            fns = [dconv_call(layer, arrays)]
            if torch is not None:
                fns.append(torch_call(layer, arrays))
            times = time_calls(fns, repeats=repeats, target=target)
            t_dconv = times[0]
            t_torch = times[1] if torch is not None else None
            t_loops = None if args.no_loops else time_loops(layer, dtype)
            flops = layer.flops()
            row = dict(
                layer=layer.name, shape=layer.describe(), dtype=dtype.name, large=layer.large,
                t_dconv=t_dconv, t_torch=t_torch, t_loops=t_loops, m_loops=layer.m_loops, flops=flops,
                gfs_dconv=flops / t_dconv / 1e9,
                gfs_torch=None if t_torch is None else flops / t_torch / 1e9,
                gfs_loops=None if t_loops is None else flops / t_loops / 1e9,
                dconv_over_torch=None if t_torch is None else t_dconv / t_torch,
                loops_over_dconv=None if t_loops is None else t_loops / t_dconv,
            )
            if torch is not None and args.check:
                row["torch_dW_rel_diff"] = check_torch_matches(layer, arrays)
            rows.append(row)

    for dtype in dtypes:  # measured again after the suite: keep the better figure (the machine is shared)
        peak[dtype.name] = max(peak[dtype.name], gemm_rate(dtype, gemm_n, repeats=3))
        print(f"GEMM rate, np.matmul {'sgemm' if dtype == np.float32 else 'dgemm'} on {gemm_n}^2 squares "
              f"(best of before and after the suite): {peak[dtype.name]:.1f} GF/s")
    for row in rows:
        row["peak_fraction"] = row["gfs_dconv"] / peak[row["dtype"]]
    for dtype in dtypes:
        print()
        print(header)
        print("-" * len(header))
        for row in (r for r in rows if r["dtype"] == dtype.name):
            print(f"{row['layer']:18s} {row['shape']:44s} {row['dtype']:7s} {fmt_time(row['t_dconv']):>9s} "
                  f"{fmt_time(row['t_torch']):>9s} {fmt_time(row['t_loops']):>9s} {row['gfs_dconv']:10.1f} "
                  f"{fmt(row['gfs_torch'], '10.1f'):>10s} {fmt(row['gfs_loops'], '9.3f'):>9s} "
                  f"{row['peak_fraction']:6.0%} {fmt(row['dconv_over_torch'], '11.2f'):>11s} "
                  f"{fmt(row['loops_over_dconv'], '11.0f'):>11s}")

    print()
    if load is not None:
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
    summary = {}
    for dtype in dtypes:
        mine = [r for r in rows if r["dtype"] == dtype.name]
        ratio = geomean([r["dconv_over_torch"] for r in mine])
        not_1x1 = [r for r in mine if not r["layer"].startswith("1x1")]
        ratio_not_1x1 = geomean([r["dconv_over_torch"] for r in not_1x1])
        large = {r["layer"]: r["peak_fraction"] for r in mine if r["large"]}
        summary[dtype.name] = dict(geomean_dconv_over_torch=ratio, geomean_dconv_over_torch_without_1x1=ratio_not_1x1,
                                   large_layers_peak_fraction=large)
        print(f"{dtype.name}: geometric mean dconv/torch time ratio = {fmt(ratio, '.2f')} over {len(mine)} layers, "
              f"{fmt(ratio_not_1x1, '.2f')} over the {len(not_1x1)} that are not 1x1; large layers at "
              f"{', '.join(f'{f:.0%}' for f in large.values()) or '-'} of the np.matmul GEMM rate "
              f"({', '.join(large) or '-'})")

    classic = None
    if not args.no_loops and not args.quick or args.classic:
        dtype = np.dtype(np.float64)
        arrays = make_arrays(CLASSIC, dtype)
        t_dconv, t_loops = math.inf, math.inf
        for _ in range(3):  # interleaved, best of 3 each
            t_dconv = min(t_dconv, *time_calls([dconv_call(CLASSIC, arrays)], repeats=3, target=target))
            t_loops = min(t_loops, time_loops(CLASSIC, dtype))
        classic = dict(shape=CLASSIC.describe(), dtype="float64", t_dconv=t_dconv, t_loops=t_loops,
                       m_loops=CLASSIC.m_loops, speedup=t_loops / t_dconv)
        print(f"classic row, {CLASSIC.describe()} float64: dconv {fmt_time(t_dconv)}, loops "
              f"{fmt_time(t_loops)} (timed on m={CLASSIC.m_loops}, scaled to m={CLASSIC.m}; best of 3 interleaved rounds each): "
              f"speedup {t_loops / t_dconv:.0f}x ({'>=' if t_loops / t_dconv >= 500 else '<'} 500x)")

    return dict(
        python=platform.python_version(), numpy=np.__version__,
        torch=None if torch is None else torch.__version__, threads=threads, cpu=cpu_info(), simd_level=simd.active_level(),
        torch_isa=torch_isa(),
        torch_threads=None if torch is None else torch.get_num_threads(),
        blas=blas_info(), gemm_gflops=peak, repeats=repeats, rows=rows, summary=summary, classic=classic,
        timing=("min over interleaved samples; dconv = conv2d_backward; torch = aten.convolution_backward "
                "on NCHW-contiguous tensors; loops scaled per sample from m_loops"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes, few repeats")
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
    parser.add_argument("--repeats", type=int, help="timing samples per measurement (default 7, quick 3)")
    parser.add_argument("--threads", type=int, help="BLAS and torch threads (default: the core count)")
    parser.add_argument("--no-loops", action="store_true", help="skip the (slow) loop reference")
    parser.add_argument("--classic", action="store_true", help="run the classic row even with --quick")
    parser.add_argument("--check", action="store_true", help="also compare dW with torch's (setup sanity)")
    parser.add_argument("--level", choices=simd.CHOICES, default=None,
                        help="the SIMD level of dconv's compiled loops (default: DCONV_SIMD, else auto); "
                             "numpy: without them, as where they were not built")
    parser.add_argument("--paths", action="store_true",
                        help="instead: time the compiled loops and the GEMMs for dA_prev and dW of each layer, "
                             "all four pairings, and show the one the rule picks (COMPILED_RULES)")
    parser.add_argument("--stats", action="store_true",
                        help="instead: kernel time (threads=1) with the per-sample statistics and without dA_prev "
                             "against the full pass, on the three layers of issue 16 at m = 256")
    parser.add_argument("--rounds", type=int, default=7, help="--paths, --stats: interleaved rounds (median counts)")
    parser.add_argument("--pairing", choices=list(PAIRINGS), help=argparse.SUPPRESS)  # --paths' child processes
    args = parser.parse_args(argv)
    if args.level:
        simd.set_level(args.level)
    if args.pairing:
        print(json.dumps(time_pairing(args, args.pairing)))
        return 0
    results = run_paths(args) if args.paths else run_stats(args) if args.stats else run(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"results saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

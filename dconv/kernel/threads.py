"""One backward pass on several threads: the batch cut into slices, each with a single-threaded BLAS.

The stride-1 loops (per-sample GEMMs, or the compiled loops) each run on one
thread, so :func:`dconv.kernel.backward_kernel` cuts the batch into up to
``threads`` slices (:func:`batch_slices`) and runs each in a thread of its own,
the first on the calling thread, with BLAS held to one thread (threadpoolctl):
:func:`backward_threads`. Each slice writes its dA_prev in place; the slices' dW
and db are added in float64, in slice order. :func:`single_threaded` says which
layers are split: the im2col and pointwise layers run larger GEMMs, which BLAS
threads by itself, and im2col layers are split only where a compiled loop runs.
The graph layer passes ``threads=1``: there, Dask runs the batch chunks in
parallel.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import numpy as np

from dconv.kernel import dispatch
from dconv.kernel.sketch import concatenate_products
from dconv.kernel.stats import concatenate_stats
from dconv.kernel.strided import is_pointwise
from dconv.params import ConvGeometry

MIN_SLICE_FLOPS = 20e6
"""Smallest backward pass (in floating-point operations) worth a thread of its own."""


def batch_slices(m: int, threads: int, flops: float) -> list[slice]:
    """Cut ``range(m)`` into at most ``threads`` contiguous, near-equal slices.

    Fewer slices when there are fewer samples than threads, or when a slice
    would do less than :data:`MIN_SLICE_FLOPS` of the ``flops`` of the batch.
    """
    by_work = flops // MIN_SLICE_FLOPS if MIN_SLICE_FLOPS > 0 else m
    n_slices = int(max(1, min(threads, m, by_work)))
    bounds = [m * i // n_slices for i in range(n_slices + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@functools.cache
def _thread_pool(n_threads: int) -> ThreadPoolExecutor:
    """A pool of ``n_threads`` threads, made on first use and kept: starting threads on every call costs time."""
    return ThreadPoolExecutor(n_threads, thread_name_prefix="dconv-kernel")


def blas_threads() -> int:
    """How many threads the BLAS that NumPy uses may run (``OPENBLAS_NUM_THREADS`` and the like)."""
    counts = [lib.num_threads for lib in _blas_controller().select(user_api="blas").lib_controllers]
    return max(counts, default=os.cpu_count() or 1)


def single_threaded(geometry: ConvGeometry, dtype: np.dtype, c_prev: int, c_out: int) -> bool:
    """Whether this layer's loops run on one thread (the compiled loops, per-sample GEMMs), so the batch is worth splitting."""
    if is_pointwise(geometry):      # two large GEMMs, which BLAS threads
        return False
    compiled = dispatch.use_compiled_input_grad(dtype, c_prev, c_out) or dispatch.use_compiled_weight_grad(
        dtype, c_prev, c_out, geometry
    )
    if geometry.stride != (1, 1):   # im2col's GEMMs are threaded by BLAS; the compiled loops are not
        return compiled
    return compiled or geometry.kernel_hw != (1, 1)


def backward_threads(backward_one: Callable, dZ, A_prev, W, geometry: ConvGeometry, slices: list[slice], **options):
    """``backward_one`` on each slice of the batch in a thread of its own, BLAS held to one thread each.

    The calling thread runs the first slice, so the call needs
    ``len(slices) - 1`` pool threads. Each slice writes its dA_prev in place;
    the slices' dW and db are added in float64, in slice order, and so are
    their statistics, if any (:func:`dconv.kernel.stats.concatenate_stats`); their
    per-sample products are concatenated in slice order
    (:func:`dconv.kernel.sketch.concatenate_products`).
    If a slice raises, the call waits for the others before the error propagates.

    Parameters
    ----------
    backward_one : callable
        ``backward_one(dZ, A_prev, W, geometry, out=dA_prev, **options) -> (dA_prev, dW, db, stats, products)`` on
        one slice, writing its dA_prev into ``out``: :func:`dconv.kernel._backward_one`.
    dZ : ndarray, shape (m, n_H, n_W, C), C-contiguous
    A_prev : ndarray, shape (m, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
    slices : list of slice
        From :func:`batch_slices`, at least two.
    **options
        Passed on to ``backward_one`` (``stats``, ``input_grad``, ``products``). With ``input_grad=False``
        there is no dA_prev: ``out`` is None.

    Returns
    -------
    dA_prev : ndarray, shape (m, H, W, C_prev), C-contiguous; None without dA_prev
    dW : ndarray, float64, shape (fh, fw, C_prev, C)
    db : ndarray, float64, shape (C,)
    stats : GradientStats or None
    products : SampleProducts or None
    """
    dA_prev = np.empty(A_prev.shape, dtype=A_prev.dtype) if options.get("input_grad", True) else None

    def run(batch: slice):
        out = None if dA_prev is None else dA_prev[batch]
        with np.errstate(invalid="ignore", over="ignore"):
            return backward_one(dZ[batch], A_prev[batch], W, geometry, out=out, **options)[1:]

    with _blas_controller().limit(limits=1, user_api="blas"):
        others = [_thread_pool(len(slices) - 1).submit(run, batch) for batch in slices[1:]]
        try:
            parts = [run(slices[0])]
        finally:
            wait(others)                          # no slice runs on once this call returns or raises
        parts += [future.result() for future in others]
    dW = np.sum([part[0] for part in parts], axis=0, dtype=np.float64)
    db = np.sum([part[1] for part in parts], axis=0)
    stats = [part[2] for part in parts if part[2] is not None]
    products = [part[3] for part in parts if part[3] is not None]
    return dA_prev, dW, db, (concatenate_stats(stats) if stats else None), (concatenate_products(products) if products else None)

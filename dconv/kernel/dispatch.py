"""The compiled loops: when they run instead of NumPy's GEMMs, and thin wrappers over ``dconv._flatconv``.

``dconv/_flatconv.c`` is built as ``dconv._flatconv`` at install when a C compiler
is there; without one, ``_flatconv`` is None and the NumPy paths run. It holds
four loops. The first three are compiled once per SIMD level in the one
extension, and run at the level of :mod:`dconv.simd` (``DCONV_SIMD``); their
register blocks are sized per level (the table in ``_flatconv.c``), their
arithmetic is the same at every level.

* ``input_grad`` (:func:`input_grad_compiled`) keeps a block of neighbouring
  pixels x 16 float32 (8 float64) input channels in vector registers (6 pixels
  on AVX2, 12 pixels x 2 vectors on AVX-512) and adds every tap and channel into
  them before one store: no pass over memory per tap. In a variant whose vectors
  run over C, it takes C_prev of at most 4 (a first layer) with C a multiple of
  the width. Other strides run it once per phase of the input, each phase
  writing its pixels straight into dA_prev
  (:func:`dconv.kernel.strided.input_grad_phases`).
* ``weight_grad`` (:func:`weight_grad_compiled`) keeps a block of input channels
  x output vectors in registers over about 128 output pixels of one sample, and
  adds each such sum into a float64 dW. It reads dZ and the padded input in
  place, at any stride, so the im2col path skips its copy too. Below 8 input
  channels, the taps of a kernel row count as rows of the block. With the
  per-sample statistics it also sums each sample's dW on its own, one sample at
  a time, and squares it (:mod:`dconv.kernel.stats`). For the per-sample inner
  products alone, ``weight_grad_dots`` runs it a tap at a time over a block of
  samples and hands each tap's sums to ``query_dots`` (the same bits of dW and
  the statistics).
* ``query_dots`` (:func:`query_dots_compiled`), float64 only: each sample's ``dW_i`` against the query gradients
  (:mod:`dconv.kernel.sketch`), a span of the queries serving a block of
  samples before the next span, so that the queries are read once per block.
* ``column_sums`` (:func:`column_sums_compiled`) adds float32 db in float64, in
  one pass over dZ (plain C).

Each register block is a C function of its own per size, so that its
accumulators stay in registers; a row of pixels, or of input channels, is cut
into near-equal blocks. The loops need no NumPy headers (the buffer protocol)
and release the GIL.

Where each loop runs, the other path being the GEMMs, is :data:`COMPILED_RULES`,
applied by :func:`use_compiled_input_grad` and :func:`use_compiled_weight_grad`.
The other kernel modules call every function here through this module
(``dispatch.use_compiled_input_grad(...)``), so replacing one here, in a test or
a benchmark, reaches every caller.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dconv import simd
from dconv.kernel.layout import FlatGrid, flat_grid
from dconv.kernel.stats import WeightStats
from dconv.params import ConvGeometry
from dconv.simd import _flatconv  # the compiled loops, or None


def compiled_level() -> str | None:
    """The SIMD level the compiled loops run at in this process, or None for the NumPy path only.

    :func:`dconv.simd.active_level`: ``DCONV_SIMD``, or :func:`dconv.simd.set_level`.
    """
    level = simd.active_level()
    return None if level == "numpy" else level


COMPILED_LANES = {4: 16, 8: 8}
"""Item size -> channels per logical vector of the compiled loops (16 float32 or 8 float64 at every level:
one zmm on AVX-512, two ymm on AVX2, four xmm or q registers on SSE2 and NEON)."""

COMPILED_NARROW = 4
"""The largest C_prev (not a multiple of the vector width) of the compiled loop's narrow variant."""

COMPILED_NARROW_WEIGHT = 8
"""Below this many input channels, the compiled dW loop merges each kernel row's taps (:func:`weight_grad_compiled`)."""


class CompiledRule(NamedTuple):
    """Where one SIMD level's compiled loops beat NumPy's GEMMs, by C_prev: the largest C_prev that takes them.

    One limit serves float32 and float64: the two dtypes change sides at the
    same channel counts. Layers with C_prev of at most :data:`COMPILED_NARROW`
    (dA_prev) or below :data:`COMPILED_NARROW_WEIGHT` (dW), the first layers,
    take the compiled loops at every level: GEMMs that narrow run far below
    the BLAS rate.
    """

    input_grad: int
    """dA_prev, C_prev a multiple of the vector width, any stride."""
    weight_grad: int
    """dW at stride 1."""
    weight_grad_strided: int
    """dW at other strides (im2col's GEMM is the other path)."""


ANY = 1 << 30
COMPILED_RULES = {
    # The loops are faster on every layer of the suite.
    "avx512": CompiledRule(input_grad=128, weight_grad=ANY, weight_grad_strided=ANY),
    # The loops win or tie dW of every stride-2 layer of the suite up to C_prev 128, each pairing timed in a
    # process of its own (AMD EPYC Zen 4 at level avx2, 1 and 2 threads: 3x3 c128 s2 0.96-1.03x the GEMM's
    # time, 1x1 c128->32 s2 1.29-1.51x faster), as they do at stride 1. The Zen 3 runs behind
    # the earlier limit of 64 at stride 2 (the GEMMs up to 1.8x faster from C_prev 128) timed the pairings
    # interleaved in one process, where a pairing that follows the GEMM+GEMM one is slowed by OpenBLAS's
    # threads: the same method gave 1.82x on the Zen 4 (avx512, 2 threads, 3x3 c128 s2 float32), a process per
    # pairing 1.05-1.18x.
    # The loops give the per-sample statistics in the same pass (a --stats chunk 1.06-1.17x a plain one,
    # against 1.05-1.66x with a second, per-sample pass beside the GEMM), and the bits of avx512's dW.
    "avx2": CompiledRule(input_grad=128, weight_grad=128, weight_grad_strided=128),
    # Not measured: the avx2 rule. NEON has as many registers as AVX-512.
    "neon": CompiledRule(input_grad=128, weight_grad=128, weight_grad_strided=128),
    # SSE2 loops against OpenBLAS's SSE kernels: the GEMMs are faster for dW at stride 2, and at stride 1
    # from 64 channels.
    "baseline": CompiledRule(input_grad=128, weight_grad=32, weight_grad_strided=0),
}
"""The rule of each SIMD level (:mod:`dconv.simd`), from interleaved timings of both paths per layer
(``benchmarks/bench_kernel.py --paths``; machines and results: benchmarks/README.md)."""


def use_compiled_input_grad(dtype: np.dtype, c_prev: int, c_out: int) -> bool:
    """Whether dA_prev comes from the compiled loop at this process's level, for this dtype, C_prev and C."""
    level, lanes = compiled_level(), COMPILED_LANES.get(np.dtype(dtype).itemsize)
    if level is None or lanes is None:
        return False
    if c_prev % lanes == 0:
        return c_prev <= COMPILED_RULES[level].input_grad
    return c_prev <= COMPILED_NARROW and c_out % lanes == 0


def use_compiled_weight_grad(dtype: np.dtype, c_prev: int, c_out: int, geometry: ConvGeometry) -> bool:
    """Whether dW comes from the compiled loop (:func:`weight_grad_compiled`) at this process's level.

    C must be a multiple of the vector width; then :data:`COMPILED_RULES` decides by C_prev and stride.
    """
    level, lanes = compiled_level(), COMPILED_LANES.get(np.dtype(dtype).itemsize)
    if level is None or lanes is None or c_out % lanes != 0:
        return False
    if c_prev < COMPILED_NARROW_WEIGHT:
        return True
    rule = COMPILED_RULES[level]
    limit = rule.weight_grad if geometry.stride == (1, 1) else rule.weight_grad_strided
    return c_prev <= limit


def use_compiled_weight_stats(dtype: np.dtype, c_out: int) -> bool:
    """Whether the per-sample statistics of a layer whose dW comes from a GEMM (im2col, 1x1) come from
    the compiled dW loop, run for the statistics only: wherever it can take the layer (C a multiple of
    the vector width). One GEMM per sample (:func:`dconv.kernel.stats.add_sample_products`, squares in C)
    was no faster overall: on AVX2 (AMD EPYC Zen 3), m = 256, one thread, medians of 7, 8x8x128->128 1x1
    took 18.4 ms against the loop's 15.3 (float32) and 29.7 against 30.0 (float64); 16x16x128->128 3x3
    stride 2 128.9 against 133.5 and 221.8 against 264.7."""
    level, lanes = compiled_level(), COMPILED_LANES.get(np.dtype(dtype).itemsize)
    return level is not None and lanes is not None and c_out % lanes == 0


def input_grad_compiled(D, w_taps, offsets, base, sample, cols, out, size=None, first=(0, 0), step=(1, 1)) -> None:
    """``out[n, y0 + y * sy, x0 + x * sx] = sum_k D[base - offsets[k] + n * sample + y * cols + x] @ w_taps[k].T``
    by the compiled loop, for ``y, x`` below ``size`` (default: every pixel of ``out``).

    Parameters
    ----------
    D : ndarray, shape (rows, C)
    w_taps : ndarray, shape (K, C_prev, C)
        The taps' weights, in the order of ``offsets`` (ascending).
    out : ndarray, shape (m, H, W, C_prev), C-contiguous, written
    size, first, step : pairs of int
        ``(height, width)`` of the pixels computed, ``(y0, x0)`` and ``(sy, sx)``.
    """
    m, height, width, c_prev = out.shape
    c_out = w_taps.shape[2]
    narrow = c_prev % COMPILED_LANES[D.itemsize] != 0       # the narrow variant takes (K, C_prev, C)
    weights = np.ascontiguousarray(w_taps if narrow else w_taps.transpose(0, 2, 1))
    offsets = np.asarray(offsets, dtype=np.intp)
    (n_y, n_x), (y0, x0), (sy, sx) = size or (height, width), first, step
    layout = ((y0 * width + x0) * c_prev, height * width * c_prev, sy * width * c_prev, sx * c_prev)
    _flatconv.input_grad(compiled_level(), D, weights, offsets, D.shape[0], base, m, sample, n_y, n_x, cols, c_out, c_prev, out, layout)


def weight_grad_compiled(
    P: np.ndarray, dZ: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape, stats: WeightStats | None = None,
    sums: bool = True,
) -> np.ndarray | None:
    """dW by the compiled loop, any stride: output pixel ``(n, i, j)`` meets the padded input at
    row ``n * Hp * Wp + i * sh * Wp + j * sw + offsets[k]`` of ``P`` (see :func:`use_compiled_weight_grad`).

    Below :data:`COMPILED_NARROW_WEIGHT` input channels (and with no dilation
    along the width), the taps of each kernel row count as rows of one tap:
    their values lie side by side in ``P``, so the loop's register blocks
    fill up with (tap, channel) pairs instead of 1-3 channels.

    Parameters
    ----------
    P : ndarray, shape (m * Hp * Wp, C_prev)
        The padded input, one row per padded pixel.
    dZ : ndarray, shape (m, n_H, n_W, C), C-contiguous
    grid : FlatGrid
        From :func:`dconv.kernel.layout.flat_grid`.
    w_shape : tuple of int
        ``(fh, fw, C_prev, C)``.
    stats : WeightStats, optional
        Filled with each sample's ``|dW_i|^2`` and ``sum_i dW_i * dW_i``, ``dW_i``
        the float64 sum of sample ``i``'s tiles; dW gets the same bits as without.
        With ``stats.sink``, the loop runs on blocks of samples
        (:meth:`dconv.kernel.sketch.ProductSink.block_samples`), leaves each
        block's ``dW_i`` in a buffer, and hands it to the sink: the same additions, in the
        same order, so dW and the statistics keep their bits.
    sums : bool
        False: the statistics only (``stats`` required), no dW.

    Returns
    -------
    ndarray, float64, shape (fh, fw, C_prev, C); None when not ``sums``
    """
    fh, fw, c_prev, c_out = w_shape
    (sh, sw), (n_h, n_w), cols = geometry.stride, geometry.out_hw, grid.cols
    merged = c_prev < COMPILED_NARROW_WEIGHT and geometry.dilation[1] == 1
    if merged:                                                   # (kh, kw * C_prev + c) rows
        offsets, rows = grid.offsets[::fw], fw * c_prev
    else:
        offsets, rows = grid.offsets, c_prev
    dW = np.zeros((len(offsets), rows, c_out), dtype=np.float64) if sums else None
    offsets = np.asarray(offsets, dtype=np.intp)
    m = dZ.shape[0]
    args = (compiled_level(), P, dZ, offsets, P.shape[0], m, grid.rows * cols, sh * cols, sw, n_h, n_w, c_prev, rows, c_out, dW)
    if stats is None:
        _flatconv.weight_grad(*args)
    elif stats.sink is None:                                     # dW_sq has the layout of dW: (K', rows, C)
        _flatconv.weight_grad(*args, stats.dW_sq, stats.norm2)
    else:
        _weight_grad_samples(args, stats)
    return None if dW is None else dW.reshape(w_shape)


def _weight_grad_samples(args: tuple, stats: WeightStats) -> None:
    """The compiled loop with ``args`` (as :func:`weight_grad_compiled` builds them) on blocks of
    :meth:`~dconv.kernel.sketch.ProductSink.block_samples` samples, each block's float64 ``dW_i`` left in a buffer
    and given to ``stats.sink``; or, when the sink wants the inner products alone
    (:attr:`~dconv.kernel.sketch.ProductSink.dots_in_loop`), with them written into ``stats.sink.sample_dot``, a
    tap at a time, and no buffer. A block's samples start at row ``first * sample`` of ``P``: every
    row a sample's output pixels read lies inside that sample's padded image."""
    level, P, dZ, offsets, _, m, sample, *steps, dW = args
    per_sample = int(stats.dW_sq.size)
    step = stats.sink.block_samples(per_sample)
    if stats.sink.dots_in_loop:                                  # the inner products alone: no buffer of dW_i
        queries = stats.sink.queries
        n_q, k1, c_out = queries.shape
        for first in range(0, m, step):
            last = min(m, first + step)
            rows = P[first * sample :]
            _flatconv.weight_grad_dots(level, rows, dZ[first:last], offsets, rows.shape[0], last - first, sample,
                                       *steps, dW, stats.dW_sq, stats.norm2[first:last], queries, k1 * c_out, n_q,
                                       stats.sink.sample_dot[first:last])
        return
    buffer = np.empty((min(step, m), per_sample))
    for first in range(0, m, step):
        last = min(m, first + step)
        block, rows = buffer[: last - first], P[first * sample :]
        _flatconv.weight_grad(level, rows, dZ[first:last], offsets, rows.shape[0], last - first, sample, *steps, dW,
                              stats.dW_sq, stats.norm2[first:last], block)
        stats.sink.add(block, first)


def weight_stats_compiled(padded: np.ndarray, dZ: np.ndarray, w_shape, geometry: ConvGeometry, stats: WeightStats) -> None:
    """The per-sample statistics of dW by the compiled loop, without dW: for layers whose dW comes from a GEMM
    (see :func:`use_compiled_weight_stats`).

    Parameters
    ----------
    padded : ndarray, shape (m, Hp, Wp, C_prev)
        The zero-padded input (copied if not C-contiguous).
    dZ : ndarray, shape (m, n_H, n_W, C), C-contiguous
    w_shape : tuple of int
        ``(fh, fw, C_prev, C)``.
    stats : WeightStats
        Filled for every sample.
    """
    P = np.ascontiguousarray(padded).reshape(-1, padded.shape[3])
    weight_grad_compiled(P, dZ, flat_grid(dZ.shape[0], geometry), geometry, w_shape, stats, sums=False)


def use_compiled_query_dots() -> bool:
    """Whether the per-sample inner products with the queries come from the compiled loops
    (:func:`query_dots_compiled`) at this process's level, rather than a float64 GEMM per block."""
    return compiled_level() is not None


def query_dots_compiled(rows: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    """``out[s, j] = <rows[s], Q_j>`` over the weight rows of each query, in float64, by the compiled loop: one pass
    over the queries for all ``g`` rows (a span of values at a time), not one per row as a GEMV per sample.

    Parameters
    ----------
    rows : ndarray, float64, shape (g, K * C), C-contiguous
    queries : ndarray, float64, shape (n_q, K + 1, C), C-contiguous
        The weight rows of query ``j`` are ``queries[j, :K]``, read in place.
    out : ndarray, float64, shape (g, n_q), C-contiguous, written
    """
    n_q, k1, c_out = queries.shape
    _flatconv.query_dots(compiled_level(), rows, rows.shape[0], rows.shape[1], queries, k1 * c_out, n_q, out)


def column_sums_compiled(rows: np.ndarray) -> np.ndarray:
    """``rows`` (N, C) summed over N in float64 by the compiled loop, with no float64 temporaries.

    Returns
    -------
    ndarray, float64, shape (C,)
    """
    db = np.zeros(rows.shape[1])
    _flatconv.column_sums(np.ascontiguousarray(rows), rows.shape[0], rows.shape[1], db)
    return db

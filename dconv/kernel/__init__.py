"""The NumPy conv2d kernel: forward and backward for one in-memory batch.

NumPy, with optional compiled loops (below). This module never imports Dask
and does no I/O; the graph layer calls it once per batch chunk.

Shapes (NHWC activations, HWIO weights, cross-correlation, zero padding)::

    A_prev  (m, H, W, C_prev)        W   (fh, fw, C_prev, C)      b  (1, 1, 1, C)
    Z, dZ   (m, n_H, n_W, C)         cols (m * n_H * n_W, fh * fw * C_prev)

The backward pass is GEMMs plus data movement, in one of three ways.

1x1 kernel, stride 1, no padding: two plain GEMMs over every pixel, :func:`backward_pointwise`.

Stride 1 (any padding, dilation, kernel): flat implicit GEMM, :func:`backward_flat`.
    ``A_prev`` is zero-padded into ``P`` (one row per padded pixel, ``m * Hp * Wp``
    rows) and ``dZ`` is laid on the same grid in ``D``. A kernel tap then is a
    constant row shift, so with no im2col copy::

        dW[k]   = P[shift_k : shift_k + L].T @ D[front : front + L]     # "lp,lc->pc", per tap
        dA_prev = sum_k D[base - shift_k : ... + L_A] @ W[k].T          # "qc,cp->qp", per tap

    (dA_prev is the correlation of the padded dZ with the flipped kernel; no
    scatter-add.) Rows at wrap-around positions are computed on zeros and
    dropped. Each of these GEMMs is cut per sample (for dW, per group of
    samples when the kernel is large next to the image), and one
    ``np.matmul`` call on strided views runs them all: a sample's rows stay
    in cache from tap to tap, and GEMMs this small run on OpenBLAS's fast
    single-threaded small-matrix kernels. If W or dW holds NaN or inf, the
    im2col path is used instead, so that non-finite values land exactly
    where the loop reference puts them.

Other strides: im2col, :func:`backward_im2col`::

    dW      = cols.T @ dZ            # "mk,mc->kc"  (or the compiled dW loop, with no cols copy)
    dA_prev = col2im(dZ @ W.T)       # "mc,kc->mk", then scatter-add per kernel offset

With the compiled loops, dA_prev is instead one stride-1 correlation per phase
of the padded input (:func:`input_grad_phases`), and nothing is scattered.

In both, ``db`` is dZ summed over m, n_H, n_W in float64.

Compiled helper
---------------
``dconv/_flatconv.c`` holds three loops in C, built at install when a C compiler
is there (optional: without one, the NumPy code above runs). The first two are
compiled once per SIMD level in the one extension, and run at the level of
:mod:`dconv.simd` (``DCONV_SIMD``); their register blocks are sized per level
(the table in ``_flatconv.c``), their arithmetic is the same at every level.

* ``input_grad`` keeps a block of neighbouring pixels x 16 float32 (8 float64)
  input channels in vector registers (6 pixels on AVX2, 12 pixels x 2 vectors on
  AVX-512) and adds every tap and channel into them before one store: no pass
  over memory per tap. In a variant whose vectors run over C, it takes C_prev of
  at most 4 (a first layer) with C a multiple of the width. Other strides run
  it once per phase of the input, each phase writing its pixels straight into
  dA_prev (:func:`input_grad_phases`).
* ``weight_grad`` keeps a block of input channels x output vectors in registers
  over about 128 output pixels of one sample, and adds each such sum into a
  float64 dW. It reads dZ and the padded input in place, at any stride, so the
  im2col path skips its copy too. Below 8 input channels, the taps of a kernel
  row count as rows of the block.
* ``column_sums`` adds float32 db in float64, in one pass over dZ (plain C).

Where each runs, the other path being the GEMMs, is :data:`COMPILED_RULES`, one
rule per level from interleaved timings of both (``bench_kernel.py --paths``):
:func:`use_compiled_input_grad`, :func:`use_compiled_weight_grad`.

Each register block is a C function of its own per size, so that its
accumulators stay in registers; a row of pixels, or of input channels, is cut
into near-equal blocks. The loops need no NumPy headers (the buffer protocol)
and release the GIL.

Threads
-------
The stride-1 loops (per-sample GEMMs, or the compiled loops) each run on one
thread, so :func:`backward_kernel` cuts the batch into ``threads`` slices and
runs each in a thread of its own, the first on the calling thread, with BLAS
held to one thread (threadpoolctl). The compiled loops write each slice's
dA_prev in place; the slices' dW and db are added in float64, in slice order
(:func:`single_threaded` says when). The im2col layers run larger GEMMs that
BLAS threads by itself; they are split too when a compiled loop runs (the 1x1
stride-2 layer of the benchmark suite: 1.2x faster in float32, 1.1x in float64).
The graph layer passes ``threads=1``: there, Dask runs the batch chunks in
parallel.

Memory
------
Peak bytes allocated by one :func:`backward_kernel` call, including its three
outputs but not its inputs (add ``itemsize * (N_in * C_prev + N_out * C + K * C_prev * C)``
for those, and ``itemsize * N_out * C`` more if ``dZ`` is not C-contiguous)::

    N_in = m * H * W      N_pad = (m + 1) * Hp * Wp      N_out = m * n_H * n_W      K = fh * fw
    Hp, Wp = H + top + bottom, W + left + right

    stride 1:  itemsize * (N_pad * C + 2 * N_pad * C_prev + N_in * C_prev + 4 * K * C_prev * C)
    otherwise: itemsize * (2 * N_pad * C_prev + max(N_out * K * C_prev, N_grid * C)
                           + N_in * C_prev + 4 * K * C_prev * C)
    N_grid = (m + 1) * (e_h + max(n_H, ceil(Hp / sh))) * (e_w + max(n_W, ceil(Wp / sw))),  e_h = (fh-1)*dh // sh

(the second term of the max is the dZ grid of :func:`input_grad_phases`, whose phases write into dA_prev).

plus a few KiB. The NaN/inf fallback of a stride-1 call needs the "otherwise"
figure. (The dZ grid ``D`` carries ``(fh-1)*dh*Wp + (fw-1)*dw`` extra rows at
most: the extra sample in ``N_pad`` covers them.) A call split across ``t``
threads needs ``m + t`` in place of ``m + 1`` in ``N_pad``, and
``itemsize * N_in * C_prev`` more for the slices' dA_prev (the compiled loops
write it in place; the bound keeps the term for the NumPy paths, which copy).
:func:`backward_working_set` evaluates this bound.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dconv.errors import InputError

from dconv import simd
from dconv.simd import _flatconv  # the compiled loops, or None: optional, see "Compiled helper" above
from dconv.params import (
    ConvGeometry,
    ConvParams,
    backward_geometry,
    check_float_dtype,
    forward_geometry,
    result_dtype,
)

__all__ = ["Gradients", "conv2d_forward", "conv2d_backward", "backward_kernel", "backward_working_set"]


class Gradients(NamedTuple):
    """The gradients of a conv layer, each shaped like the array it is the gradient of.

    Attributes
    ----------
    dA_prev : ndarray, shape (m, H, W, C_prev)
    dW : ndarray, shape (fh, fw, C_prev, C)
    db : ndarray, shape (1, 1, 1, C)
    """

    dA_prev: np.ndarray
    dW: np.ndarray
    db: np.ndarray


def as_float_array(name: str, value: Any) -> np.ndarray:
    """``np.asarray(value)``, refusing anything but float32/float64 with InputDtypeError."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        array = np.asarray(value)
    check_float_dtype(name, array.dtype)
    return array


def pad_input(A_prev: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Zero-pad the two spatial axes of ``A_prev`` (m, H, W, C) by ``((top, bottom), (left, right))``."""
    if pads == ((0, 0), (0, 0)):
        return A_prev
    (top, bottom), (left, right) = pads
    m, height, width, channels = A_prev.shape
    padded = np.empty((m, top + height + bottom, left + width + right, channels), dtype=A_prev.dtype)
    pad_into(A_prev, padded, top, left)
    return padded


def window_view(padded: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """A read-only strided view of every receptive field, no copy.

    Parameters
    ----------
    padded : ndarray, shape (m, Hp, Wp, C_prev)
        The zero-padded input.

    Returns
    -------
    ndarray, shape (m, n_H, n_W, fh, fw, C_prev)
        ``view[n, i, j, kh, kw, c] == padded[n, i*sh + kh*dh, j*sw + kw*dw, c]``.
    """
    m, _, _, channels = padded.shape
    (n_h, n_w), (fh, fw) = geometry.out_hw, geometry.kernel_hw
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    s_m, s_h, s_w, s_c = padded.strides
    return as_strided(
        padded,
        shape=(m, n_h, n_w, fh, fw, channels),
        strides=(s_m, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c),
        writeable=False,
    )


def im2col(padded: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Copy every receptive field of ``padded`` into the rows of a matrix.

    Returns
    -------
    ndarray, shape (m * n_H * n_W, fh * fw * C_prev)
        Columns ordered (kh, kw, c), matching ``W.reshape(fh * fw * C_prev, C)``.
    """
    windows = window_view(padded, geometry)
    m, n_h, n_w, fh, fw, channels = windows.shape
    return np.ascontiguousarray(windows).reshape(m * n_h * n_w, fh * fw * channels)


def col2im(dcols: np.ndarray, geometry: ConvGeometry, padded_shape: tuple[int, ...]) -> np.ndarray:
    """Scatter-add the rows of ``dcols`` back onto the padded input grid (adjoint of im2col).

    Parameters
    ----------
    dcols : ndarray, shape (m * n_H * n_W, fh * fw * C_prev)
    padded_shape : tuple of int
        ``(m, Hp, Wp, C_prev)``.

    Returns
    -------
    ndarray, shape (m, Hp, Wp, C_prev)
    """
    m, _, _, channels = padded_shape
    (n_h, n_w), (fh, fw) = geometry.out_hw, geometry.kernel_hw
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    dcols = dcols.reshape(m, n_h, n_w, fh, fw, channels)
    dpadded = np.zeros(padded_shape, dtype=dcols.dtype)
    for kh in range(fh):
        rows = slice(kh * dh, kh * dh + (n_h - 1) * sh + 1, sh)
        for kw in range(fw):
            columns = slice(kw * dw, kw * dw + (n_w - 1) * sw + 1, sw)
            dpadded[:, rows, columns, :] += dcols[:, :, :, kh, kw, :]
    return dpadded


def unpad(padded: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Drop the padding added by :func:`pad_input` (works for zero pads too)."""
    (top, bottom), (left, right) = pads
    height, width = padded.shape[1], padded.shape[2]
    return padded[:, top : height - bottom, left : width - right, :]


# --------------------------------------------------------------------------- stride 1: flat implicit GEMM


class FlatGrid(NamedTuple):
    """Where everything sits when a stride-1 convolution is done on flattened, padded images.

    Each sample is zero-padded to ``rows x cols`` (``Hp x Wp``) pixels and the
    batch is flattened to one matrix with a row per padded pixel, so that the
    pixel ``(n, y, x)`` is row ``n * rows * cols + y * cols + x``. A kernel tap
    ``(kh, kw)`` then shifts every pixel by the same number of rows,
    ``offsets[k] = kh * dh * cols + kw * dw``, and the convolution becomes one
    GEMM per tap on contiguous row ranges: no im2col copy. Output pixel
    ``(n, i, j)`` is row ``n * rows * cols + i * cols + j``; rows with
    ``i >= n_H`` or ``j >= n_W`` ("wrap-around" rows) are computed on zeros
    and dropped.

    Attributes
    ----------
    rows, cols : int
        ``Hp, Wp``: the padded sample size, shared by the input and dZ grids.
    offsets : tuple of int
        Row shift of each kernel tap, in ``W.reshape(fh * fw, ...)`` order.
    n_in : int
        ``L_A``: rows from the first to the last unpadded input pixel, counted from
        the pixel ``(0, top, left)``.
    front : int
        Zero rows in front of the first sample in the dZ buffer.
    total : int
        Rows of the dZ buffer (``front`` + the batch + trailing zeros).
    origin : int
        Row of the unpadded pixel ``(0, 0)`` in the padded grid, ``top * cols + left``.
    """

    rows: int
    cols: int
    offsets: tuple[int, ...]
    n_in: int
    front: int
    total: int
    origin: int


def flat_grid(m: int, geometry: ConvGeometry) -> FlatGrid:
    """The :class:`FlatGrid` of a convolution on a batch of ``m`` samples."""
    height, width = geometry.in_hw
    (fh, fw), (dh, dw) = geometry.kernel_hw, geometry.dilation
    (top, _), (left, _) = geometry.pads
    rows, cols = geometry.padded_hw
    offsets = tuple(kh * dh * cols + kw * dw for kh in range(fh) for kw in range(fw))
    sample = rows * cols
    n_in = (m - 1) * sample + (height - 1) * cols + width
    origin = top * cols + left
    # dA_prev row q reads dZ buffer row front + origin - offsets[k] + q: keep every read in bounds.
    front = max(0, offsets[-1] - origin)
    total = max(front + m * sample, front + origin + n_in)
    return FlatGrid(rows, cols, offsets, n_in, front, total, origin)


def embed_input(A_prev: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``A_prev`` zero-padded and flattened to one row per padded pixel.

    Returns
    -------
    ndarray, shape (m * Hp * Wp, C_prev)
        A view of ``A_prev`` when there is no padding and it is C-contiguous, else a copy.
    """
    return np.ascontiguousarray(pad_input(A_prev, geometry.pads)).reshape(-1, A_prev.shape[3])


def embed_grad(dZ: np.ndarray, grid: FlatGrid) -> np.ndarray:
    """``dZ`` on the padded grid: pixel ``(n, i, j)`` at row ``front + n * Hp * Wp + i * Wp + j``, zeros elsewhere.

    Returns
    -------
    ndarray, shape (total, C), a new array (a 1x1 kernel without padding, whose grids
    would coincide, takes :func:`backward_pointwise` instead)
    """
    m, n_h, n_w, channels = dZ.shape
    sample = grid.rows * grid.cols
    buffer = np.empty((grid.total, channels), dtype=dZ.dtype)
    buffer[: grid.front] = 0
    buffer[grid.front + m * sample :] = 0
    pad_into(dZ, buffer[grid.front : grid.front + m * sample].reshape(m, grid.rows, grid.cols, channels), 0, 0)
    return buffer


def pad_into(values: np.ndarray, grids: np.ndarray, top: int, left: int) -> None:
    """``grids[:, top:top + h, left:left + w] = values``, and zeros in the rest of ``grids``.

    Writes each element once: 25-30% faster than zeroing all of ``grids`` first
    (measured on dZ grids of the benchmark suite's layers).

    Parameters
    ----------
    values : ndarray, shape (m, h, w, C)
    grids : ndarray, shape (m, rows, cols, C), written
    """
    h, w = values.shape[1:3]
    grids[:, :top] = 0
    grids[:, top + h :] = 0
    grids[:, top : top + h, :left] = 0
    grids[:, top : top + h, left + w :] = 0
    grids[:, top : top + h, left : left + w] = values


def sample_groups(m: int, per_group: int) -> list[tuple[int, int, int]]:
    """``(first sample, number of groups, samples per group)`` of a batch cut into equal groups.

    One entry for the groups of ``per_group`` samples, and a second for the
    samples left over, if any.
    """
    n_full, left_over = divmod(m, per_group)
    groups = [(0, n_full, per_group)] if n_full else []
    return groups + ([(n_full * per_group, 1, left_over)] if left_over else [])


def row_groups(matrix: np.ndarray, first_row: int, n_groups: int, step: int, n_rows: int) -> np.ndarray:
    """A view ``view[g, r, c] == matrix[first_row + g * step + r, c]``, shape (n_groups, n_rows, C), no copy."""
    row, item = matrix.strides
    return as_strided(matrix[first_row:], shape=(n_groups, n_rows, matrix.shape[1]), strides=(step * row, row, item))


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

    One limit serves float32 and float64 (measured: the two dtypes changed
    sides at the same channel counts). Layers with C_prev of at most
    :data:`COMPILED_NARROW` (dA_prev) or below :data:`COMPILED_NARROW_WEIGHT`
    (dW), the first layers, take the compiled loops at every level: GEMMs
    that narrow run far below the BLAS rate.
    """

    input_grad: int
    """dA_prev, C_prev a multiple of the vector width, any stride."""
    weight_grad: int
    """dW at stride 1."""
    weight_grad_strided: int
    """dW at other strides (im2col's GEMM is the other path)."""


ANY = 1 << 30
COMPILED_RULES = {
    # AVX-512 Xeon (earlier landings): the loops won on every layer of the suite.
    "avx512": CompiledRule(input_grad=128, weight_grad=ANY, weight_grad_strided=ANY),
    # AMD EPYC Zen 3 (benchmarks/results/paths-avx2.txt): the GEMMs won dW at stride 2 from
    # C_prev 64 (by up to 1.8x); the loops won or tied everything else.
    "avx2": CompiledRule(input_grad=128, weight_grad=128, weight_grad_strided=32),
    # Not measured (no aarch64 machine here): the avx2 rule; NEON has as many registers as AVX-512.
    "neon": CompiledRule(input_grad=128, weight_grad=128, weight_grad_strided=32),
    # SSE2 loops against OpenBLAS's SSE kernels (Nehalem) on the same Zen 3
    # (benchmarks/results/paths-baseline.txt): the GEMMs won dW at stride 2, and at stride 1 from 64 channels.
    "baseline": CompiledRule(input_grad=128, weight_grad=32, weight_grad_strided=0),
}
"""The rule of each SIMD level (:mod:`dconv.simd`), from interleaved timings of both paths per layer."""


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


def weight_grad_flat(P: np.ndarray, D: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape) -> np.ndarray:
    """dW of a stride-1 convolution from the flat grids: small GEMMs per sample (or group of samples) and tap.

    ``dW[k] = P[shift_k : shift_k + L].T @ D[front : front + L]`` summed over
    the rows ``L`` of every output pixel. One ``np.matmul`` runs this GEMM
    for every (group, tap) on strided views, no copy, and the partial sums
    are then added. A group is one sample, or as many as keep the partial
    sums (``taps * C_prev * C`` per group) within the memory of the padded
    input. On one thread these ran 1.0-2.8x faster than the kernel-row GEMMs
    they replaced (stride-1 layers of the ``benchmarks/bench_kernel.py``
    suite, OpenBLAS on AVX-512): a sample's rows stay in cache from one tap
    to the next, and the speed jumps when a GEMM drops under 100**3
    multiply-adds, where OpenBLAS switches to its small-matrix kernels.

    Parameters
    ----------
    P : ndarray, shape (m * Hp * Wp, C_prev)
        From :func:`embed_input`.
    D : ndarray, shape (total, C)
        From :func:`embed_grad`.
    w_shape : tuple of int
        ``(fh, fw, C_prev, C)``.

    Returns
    -------
    ndarray, shape (fh, fw, C_prev, C)
    """
    fh, fw, c_prev, c_out = w_shape
    (dh, dw), (n_h, n_w), cols = geometry.dilation, geometry.out_hw, grid.cols
    sample = grid.rows * cols
    m = P.shape[0] // sample
    per_sample = (n_h - 1) * cols + n_w                          # first to last output pixel of a sample
    per_group = min(m, -(-fh * fw * c_out // sample))               # ceil(taps * C / sample)
    dW = np.zeros((fh, fw, c_prev, c_out), dtype=P.dtype)
    for first, n_groups, size in sample_groups(m, per_group):
        n_rows = (size - 1) * sample + per_sample
        grads = row_groups(D, grid.front + first * sample, n_groups, size * sample, n_rows)     # (g, L, C)
        rows = row_groups(P, first * sample, n_groups, size * sample, n_rows)                   # (g, L, C_prev)
        row, item = rows.strides[1:]
        taps = as_strided(                                        # (g, kh, kw, C_prev, L): each tap's rows, transposed
            rows,
            shape=(n_groups, fh, fw, c_prev, n_rows),
            strides=(rows.strides[0], dh * cols * row, dw * row, item, row),
            writeable=False,
        )
        dW += np.matmul(taps, grads[:, None, None]).sum(axis=0)   # "gkpl,glc->kpc"
    return dW


def input_grad_flat(
    D: np.ndarray, W: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, m: int, out: np.ndarray | None = None
) -> np.ndarray:
    """dA_prev of a stride-1 convolution: a correlation of the zero-padded dZ with the flipped kernel.

    ``dA_prev[q] = sum_k D[front + origin - offsets[k] + q] @ W[k].T`` on the
    flat grid. With the compiled helper (:func:`use_compiled_input_grad`), one C loop
    sums every tap into registers and writes ``dA_prev`` once. Otherwise, per
    kernel tap, one ``np.matmul`` runs a small GEMM per sample (faster than
    one large GEMM, as in :func:`weight_grad_flat`) and the result is added
    into ``dA_prev``; then the padding rows and columns are dropped.

    Parameters
    ----------
    D : ndarray, shape (total, C)
        From :func:`embed_grad`.
    W : ndarray, shape (fh, fw, C_prev, C)
    out : ndarray, shape (m, H, W, C_prev), C-contiguous, optional
        Where to write dA_prev (a new array if None).

    Returns
    -------
    ndarray, shape (m, H, W, C_prev), C-contiguous: ``out`` if given
    """
    fh, fw, c_prev, c_out = W.shape
    height, width = geometry.in_hw
    rows, cols = grid.rows, grid.cols
    sample = rows * cols
    base = grid.front + grid.origin                          # D row read by q = 0 at tap (0, 0)
    per_sample = (height - 1) * cols + width                  # first to last input pixel of a sample
    if use_compiled_input_grad(D.dtype, c_prev, c_out):
        dA_prev = np.empty((m, height, width, c_prev), dtype=D.dtype) if out is None else out
        _compiled_input_grad(D, W.reshape(fh * fw, c_prev, c_out), grid.offsets, base, sample, cols, dA_prev)
        return dA_prev
    w_taps = np.ascontiguousarray(W.reshape(fh * fw, c_prev, c_out).transpose(0, 2, 1))  # (K, C, C_prev)
    on_grid = np.empty((m * sample, c_prev), dtype=D.dtype)
    acc = row_groups(on_grid, 0, m, sample, per_sample)                # (m, L_A, C_prev)
    scratch = np.empty(acc.shape, dtype=D.dtype) if fh * fw > 1 else None
    for k, shift in enumerate(grid.offsets):
        grads = row_groups(D, base - shift, m, sample, per_sample)     # (m, L_A, C)
        if k == 0:
            np.matmul(grads, w_taps[k], out=acc)                       # "nqc,cp->nqp"
        else:
            np.matmul(grads, w_taps[k], out=scratch)
            acc += scratch
    dA_prev = on_grid.reshape(m, rows, cols, c_prev)[:, :height, :width]
    if out is not None:
        out[...] = dA_prev
        return out
    return dA_prev if (rows, cols) == (height, width) else np.ascontiguousarray(dA_prev)


def _compiled_input_grad(D, w_taps, offsets, base, sample, cols, out, size=None, first=(0, 0), step=(1, 1)) -> None:
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


def input_grad_phases(dZ: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out: np.ndarray | None = None) -> np.ndarray:
    """dA_prev at any stride by the compiled loop, one stride-1 correlation per phase of the padded input.

    The padded input pixels ``(ry + a * sh, rx + b * sw)`` of one phase ``(ry, rx)``
    are reached by the taps ``(kh, kw)`` with ``kh * dh = ry + e_h * sh`` and
    ``kw * dw = rx + e_w * sw`` (``e_h, e_w`` whole), from ``dZ[a - e_h, b - e_w]``:
    a stride-1 correlation of dZ with those taps, with no product on the zeros
    that an upsampled dZ would hold. ``dZ`` is laid once on a grid padded by the
    largest ``e``, and each phase writes the pixels of it that lie inside the
    unpadded input straight into ``dA_prev`` (``out`` if given, C-contiguous).

    Returns
    -------
    ndarray, shape (m, H, W, C_prev), C-contiguous: ``out`` if given
    """
    m, n_h, n_w, c_out = dZ.shape
    fh, fw, c_prev, _ = W.shape
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    (top, _), (left, _) = geometry.pads
    (height, width), (rows, cols) = geometry.in_hw, geometry.padded_hw
    e_h, e_w = (fh - 1) * dh // sh, (fw - 1) * dw // sw              # the largest shifts
    grid_h, grid_w = e_h + max(n_h, -(-rows // sh)), e_w + max(n_w, -(-cols // sw))
    D = np.empty((m, grid_h, grid_w, c_out), dtype=dZ.dtype)
    pad_into(dZ, D, e_h, e_w)
    D = D.reshape(-1, c_out)
    phases = [(ry, rx) for ry in range(sh) for rx in range(sw)]
    taps_of = {
        (ry, rx): [(kh, kw) for kh in range(fh) for kw in range(fw) if (kh * dh - ry) % sh == 0 and (kw * dw - rx) % sw == 0]
        for ry, rx in phases
    }
    everywhere = all(taps_of.values())                    # else the phases no tap reaches stay 0
    if out is None:                                       # np.zeros: fresh zero pages, faster than a memset
        dA_prev = (np.empty if everywhere else np.zeros)((m, height, width, c_prev), dtype=dZ.dtype)
    else:
        dA_prev = out
        if not everywhere:
            dA_prev[...] = 0
    for ry, rx in phases:
        a0, b0 = max(0, -(-(top - ry) // sh)), max(0, -(-(left - rx) // sw))           # first phase pixel inside
        n_a, n_b = -(-(top + height - ry) // sh) - a0, -(-(left + width - rx) // sw) - b0
        taps = taps_of[(ry, rx)]
        if not taps or n_a <= 0 or n_b <= 0:
            continue
        shifts = [((kh * dh - ry) // sh) * grid_w + (kw * dw - rx) // sw for kh, kw in taps]
        order = np.argsort(shifts, kind="stable")
        w_taps = np.stack([W[taps[i]] for i in order])                                  # (K', C_prev, C)
        base = (e_h + a0) * grid_w + e_w + b0
        _compiled_input_grad(
            D, w_taps, [shifts[i] for i in order], base, grid_h * grid_w, grid_w, dA_prev,
            size=(n_a, n_b), first=(ry + a0 * sh - top, rx + b0 * sw - left), step=(sh, sw),
        )
    return dA_prev


def weight_grad_compiled(P: np.ndarray, dZ: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape) -> np.ndarray:
    """dW by the compiled loop, any stride: output pixel ``(n, i, j)`` meets the padded input at
    row ``n * Hp * Wp + i * sh * Wp + j * sw + offsets[k]`` of ``P`` (see :func:`use_compiled_weight_grad`).

    Below :data:`COMPILED_NARROW_WEIGHT` input channels (and with no dilation
    along the width), the taps of each kernel row count as rows of one tap:
    their values lie side by side in ``P``, so the loop's register blocks
    fill up with (tap, channel) pairs instead of 1-3 channels.

    Returns
    -------
    ndarray, float64, shape (fh, fw, C_prev, C)
    """
    fh, fw, c_prev, c_out = w_shape
    (sh, sw), (n_h, n_w), cols = geometry.stride, geometry.out_hw, grid.cols
    merged = c_prev < COMPILED_NARROW_WEIGHT and geometry.dilation[1] == 1
    if merged:                                                   # (kh, kw * C_prev + c) rows
        offsets, rows = grid.offsets[::fw], fw * c_prev
    else:
        offsets, rows = grid.offsets, c_prev
    dW = np.zeros((len(offsets), rows, c_out), dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.intp)
    m = dZ.shape[0]
    _flatconv.weight_grad(compiled_level(), P, dZ, offsets, P.shape[0], m, grid.rows * cols, sh * cols, sw, n_h, n_w, c_prev, rows, c_out, dW)
    return dW.reshape(w_shape)


def backward_flat(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None):
    """``(dA_prev, dW)`` of a stride-1 convolution on the flat grids, or None; dA_prev into ``out`` if given.

    None means the result would differ from the reference in where NaN and
    inf land (the wrap-around rows multiply zeros by non-finite values): the
    caller then uses the im2col path.
    """
    if not np.isfinite(W).all():
        return None
    m, c_out = A_prev.shape[0], W.shape[3]
    grid = flat_grid(m, geometry)
    D = embed_grad(dZ, grid)
    if use_compiled_weight_grad(dZ.dtype, A_prev.shape[3], c_out, geometry):
        dW = weight_grad_compiled(embed_input(A_prev, geometry), dZ, grid, geometry, W.shape)
    else:
        dW = weight_grad_flat(embed_input(A_prev, geometry), D, grid, geometry, W.shape)
    if not np.isfinite(dW).all():
        return None
    return input_grad_flat(D, W, grid, geometry, m, out), dW


def is_pointwise(geometry: ConvGeometry) -> bool:
    """Whether the layer is a 1x1 kernel at stride 1 with no padding (:func:`backward_pointwise`)."""
    return geometry.kernel_hw == (1, 1) and geometry.stride == (1, 1) and geometry.pads == ((0, 0), (0, 0))


def backward_pointwise(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray):
    """``(dA_prev, dW)`` of a 1x1 convolution at stride 1 with no padding: two GEMMs over every pixel.

    With ``L = m * H * W`` pixel rows, ``dW = A_prev.T @ dZ`` ("lp,lc->pc") and
    ``dA_prev = dZ @ W.T`` ("lc,pc->lp"). BLAS threads both itself. On the
    1x1 64->128 layer of the benchmark suite (2 threads) this ran 1.5x
    (float32) and 1.6x (float64) faster than the flat path's per-sample loops.

    Returns
    -------
    dA_prev : ndarray, shape (m, H, W, C_prev), C-contiguous
    dW : ndarray, shape (1, 1, C_prev, C)
    """
    c_prev, c_out = W.shape[2:]
    pixels, grads, weights = A_prev.reshape(-1, c_prev), dZ.reshape(-1, c_out), W.reshape(c_prev, c_out)
    return (grads @ weights.T).reshape(A_prev.shape), (pixels.T @ grads).reshape(W.shape)


# --------------------------------------------------------------------------- any stride: im2col


def backward_im2col(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None):
    """``(dA_prev, dW)`` for any stride: im2col, two GEMMs, col2im. The compiled dA_prev loop writes into ``out``
    if given; the caller copies the other paths' dA_prev there.

    When the compiled dW loop applies (:func:`use_compiled_weight_grad`), it
    reads the padded input in place and there is no im2col copy; when the
    compiled dA_prev loop applies and W is finite, :func:`input_grad_phases`
    replaces the second GEMM and col2im.
    """
    n_channels = W.shape[3]
    padded = pad_input(A_prev, geometry.pads)
    dZ_2d = dZ.reshape(-1, n_channels)                        # (M, C)
    W_2d = W.reshape(-1, n_channels)                          # (K, C)
    if use_compiled_weight_grad(dZ.dtype, W.shape[2], n_channels, geometry):
        P = np.ascontiguousarray(padded).reshape(-1, padded.shape[3])
        dW = weight_grad_compiled(P, dZ, flat_grid(dZ.shape[0], geometry), geometry, W.shape)
        del P
    else:
        cols = im2col(padded, geometry)                       # (M, K)
        dW = (cols.T @ dZ_2d).reshape(W.shape)                # "mk,mc->kc"
        del cols
    padded_shape = padded.shape
    del padded
    if use_compiled_input_grad(dZ.dtype, W.shape[2], n_channels) and np.isfinite(W).all():
        return input_grad_phases(dZ, W, geometry, out), dW        # finite W: the zeros around dZ add nothing
    dcols = dZ_2d @ W_2d.T                                    # "mc,kc->mk"
    dA_prev = unpad(col2im(dcols, geometry, padded_shape), geometry.pads)
    return np.ascontiguousarray(dA_prev), dW


def bias_grad(dZ: np.ndarray) -> np.ndarray:
    """db in float64, shape (C,): dZ summed over m, n_H, n_W with float64 accumulation.

    float64 dZ goes through BLAS (a GEMV with a ones vector, the fastest sum
    here); float32 dZ is summed in float64 (by the compiled helper, or NumPy),
    because a float32 BLAS sum loses digits when the terms cancel.
    """
    rows = dZ.reshape(-1, dZ.shape[3])
    if dZ.dtype == np.float64:
        return np.ones(rows.shape[0]) @ rows                                    # "m,mc->c"
    if compiled_level() is not None:  # the same float64 sums, 3-7x faster (no float64 temporaries)
        db = np.zeros(rows.shape[1])
        _flatconv.column_sums(np.ascontiguousarray(rows), rows.shape[0], rows.shape[1], db)
        return db
    return rows.sum(axis=0, dtype=np.float64)


def backward_working_set(m: int, geometry: ConvGeometry, c_prev: int, c_out: int, itemsize: int, threads: int = 1) -> int:
    """Upper bound, in bytes, of what one :func:`backward_kernel` call allocates (outputs included, inputs not).

    See the module docstring for the formula. ``itemsize`` is 4 for float32, 8 for float64.
    """
    (height, width), (rows, cols) = geometry.in_hw, geometry.padded_hw
    (n_h, n_w), (fh, fw) = geometry.out_hw, geometry.kernel_hw
    taps = fh * fw
    n_in, n_pad, n_out = m * height * width, (m + threads) * rows * cols, m * n_h * n_w
    weights = 4 * taps * c_prev * c_out
    split = n_in * c_prev if threads > 1 else 0
    if geometry.stride == (1, 1):
        elements = n_pad * c_out + 2 * n_pad * c_prev + n_in * c_prev + weights
    else:
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        grid = ((fh - 1) * dh // sh + max(n_h, -(-rows // sh))) * ((fw - 1) * dw // sw + max(n_w, -(-cols // sw)))
        dA_work = max(n_out * taps * c_prev, (m + threads) * grid * c_out)   # col2im, or the phases' dZ grid
        elements = 2 * n_pad * c_prev + dA_work + n_in * c_prev + weights
    return itemsize * (elements + split)


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
    """A pool of ``n_threads`` threads, made on first use and kept (starting threads per call cost 4-8%)."""
    return ThreadPoolExecutor(n_threads, thread_name_prefix="dconv-kernel")


def blas_threads() -> int:
    """How many threads the BLAS that NumPy uses may run (``OPENBLAS_NUM_THREADS`` and the like)."""
    counts = [lib.num_threads for lib in _blas_controller().select(user_api="blas").lib_controllers]
    return max(counts, default=os.cpu_count() or 1)


def single_threaded(geometry: ConvGeometry, dtype: np.dtype, c_prev: int, c_out: int) -> bool:
    """Whether this layer's loops run on one thread (the compiled loops, per-sample GEMMs), so the batch is worth splitting."""
    if is_pointwise(geometry):      # two large GEMMs, which BLAS threads
        return False
    compiled = use_compiled_input_grad(dtype, c_prev, c_out) or use_compiled_weight_grad(dtype, c_prev, c_out, geometry)
    if geometry.stride != (1, 1):   # im2col's GEMMs are threaded by BLAS; the compiled loops are not
        return compiled
    return compiled or geometry.kernel_hw != (1, 1)


def _backward_one(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None):
    """``(dA_prev, dW, db)`` of one batch on the calling thread; db in float64, shape (C,), and dW in
    float64 where the compiled loop summed it.

    dA_prev is ``out`` when given (C-contiguous, shaped like A_prev): the compiled loops write it there.
    """
    if is_pointwise(geometry):
        result = backward_pointwise(dZ, A_prev, W)
    elif geometry.stride == (1, 1):
        result = backward_flat(dZ, A_prev, W, geometry, out)     # None: non-finite values, see its docstring
    else:
        result = None
    dA_prev, dW = result if result is not None else backward_im2col(dZ, A_prev, W, geometry, out)
    if out is not None and dA_prev is not out:
        out[...] = dA_prev
        dA_prev = out
    return dA_prev, dW, bias_grad(dZ)


def _backward_threads(dZ, A_prev, W, geometry, slices: list[slice]):
    """:func:`_backward_one` on each slice of the batch in a thread of its own, BLAS held to one thread each.

    The calling thread runs the first slice (waking a pool thread for it took
    0.1 ms). The slices write their dA_prev in place; their dW and db are
    added in float64, in slice order.
    """
    dA_prev = np.empty(A_prev.shape, dtype=A_prev.dtype)

    def run(batch: slice):
        with np.errstate(invalid="ignore", over="ignore"):
            _, dW_part, db_part = _backward_one(dZ[batch], A_prev[batch], W, geometry, out=dA_prev[batch])
        return dW_part, db_part

    with _blas_controller().limit(limits=1, user_api="blas"):
        others = [_thread_pool(len(slices) - 1).submit(run, batch) for batch in slices[1:]]
        try:
            parts = [run(slices[0])]
        finally:
            wait(others)                          # no slice runs on once this call returns or raises
        parts += [future.result() for future in others]
    dW = np.sum([part[0] for part in parts], axis=0, dtype=np.float64)
    db = np.sum([part[1] for part in parts], axis=0)
    return dA_prev, dW, db


def backward_kernel(
    dZ: np.ndarray,
    A_prev: np.ndarray,
    W: np.ndarray,
    geometry: ConvGeometry,
    threads: int = 1,
    float64_sums: bool = False,
) -> Gradients:
    """The backward pass on already-validated arrays of one dtype.

    The graph layer calls this once per batch chunk, with ``threads=1``. Use
    :func:`conv2d_backward` from user code: it validates first.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)
    A_prev : ndarray, shape (m, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
    geometry : ConvGeometry
        From :func:`dconv.params.backward_geometry` on these shapes.
    threads : int
        For layers whose loops run on one thread (:func:`single_threaded`:
        the compiled loops, and the per-sample GEMMs of stride 1), cut the
        batch into up to this many slices (:func:`batch_slices`) and run
        them in parallel, each with a single-threaded BLAS. Other layers run
        larger GEMMs, and BLAS threads those itself (measured: splitting
        them was no faster, or slower). With 1, everything runs on the
        calling thread.
    float64_sums : bool
        Return ``dW`` and ``db`` as the float64 sums they were accumulated in
        (the compiled dW loop, db, the slices' total), not rounded to the
        dtype of the inputs. The graph layer adds the chunks' partials in
        float64 this way.

    Returns
    -------
    Gradients
        C-contiguous ``dA_prev``, ``dW``, ``db`` in the dtype of the inputs
        (``dW`` and ``db`` in float64 with ``float64_sums``). For a given
        ``threads`` and shapes the result is the same bit for bit on every
        call; different ``threads`` round differently.
    """
    dZ = np.ascontiguousarray(dZ)
    n_h, n_w = geometry.out_hw
    fh, fw, c_prev, c_out = W.shape
    flops = 4.0 * dZ.shape[0] * n_h * n_w * fh * fw * c_prev * c_out
    slices = batch_slices(dZ.shape[0], threads if single_threaded(geometry, dZ.dtype, c_prev, c_out) else 1, flops)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate silently, as IEEE says
        if len(slices) == 1:
            dA_prev, dW, db = _backward_one(dZ, A_prev, W, geometry)
        else:
            dA_prev, dW, db = _backward_threads(dZ, A_prev, W, geometry, slices)
    sums = np.float64 if float64_sums else dZ.dtype
    return Gradients(dA_prev, dW.astype(sums, copy=False), db.astype(sums, copy=False).reshape(1, 1, 1, c_out))


def conv2d_forward(
    A_prev: Any,
    W: Any,
    b: Any = None,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
) -> np.ndarray:
    """2-D cross-correlation of a batch, NHWC input and HWIO kernel.

    Parameters
    ----------
    A_prev : array_like, shape (m, H, W, C_prev)
    W : array_like, shape (fh, fw, C_prev, C)
    b : array_like, shape (1, 1, 1, C) or (C,), optional
    stride, dilation : int or (int, int)
    padding : int, (ph, pw), ((top, bottom), (left, right)), "same" or "valid"

    Returns
    -------
    Z : ndarray, shape (m, n_H, n_W, C)
        In the promoted dtype of the inputs (float32 only if all are float32).
    """
    params = ConvParams.parse(stride, padding, dilation)
    A_prev = as_float_array("A_prev", A_prev)
    W = as_float_array("W", W)
    geometry = forward_geometry(A_prev.shape, W.shape, params)
    arrays = [A_prev, W]
    if b is not None:
        b = as_float_array("b", b)
        if b.size != W.shape[3]:
            raise InputError(
                f"b must have shape (1, 1, 1, {W.shape[3]}) to match W {W.shape}; got {b.shape} instead."
            )
        arrays.append(b)
    dtype = result_dtype(*arrays)
    A_prev, W = A_prev.astype(dtype, copy=False), W.astype(dtype, copy=False)

    m, n_channels = A_prev.shape[0], W.shape[3]
    cols = im2col(pad_input(A_prev, geometry.pads), geometry)
    Z = (cols @ W.reshape(-1, n_channels)).reshape(m, *geometry.out_hw, n_channels)  # "mk,kc->mc"
    if b is not None:
        Z += b.reshape(n_channels).astype(dtype, copy=False)
    return Z


def conv2d_backward(
    dZ: Any,
    A_prev: Any,
    W: Any,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    threads: int | None = None,
) -> Gradients:
    """Gradients of :func:`conv2d_forward` with respect to ``A_prev``, ``W`` and ``b``.

    Parameters
    ----------
    dZ : array_like, shape (m, n_H, n_W, C)
        Gradient of the loss with respect to the layer output ``Z``.
    A_prev : array_like, shape (m, H, W, C_prev)
    W : array_like, shape (fh, fw, C_prev, C)
    stride, dilation : int or (int, int)
    padding : int, (ph, pw), ((top, bottom), (left, right)), "same" or "valid"
        ``"same"`` follows TensorFlow: ``n_H = ceil(H / sh)``, the odd padding
        row or column goes at the bottom or right. It works with any stride.
    threads : int, optional
        Run up to this many slices of the batch in parallel. Default: as many
        threads as NumPy's BLAS may use (``OPENBLAS_NUM_THREADS`` and the like
        set it). Pass 1 when you already run several calls in parallel.

    Returns
    -------
    Gradients
        ``(dA_prev, dW, db)`` with shapes ``(m, H, W, C_prev)``,
        ``(fh, fw, C_prev, C)`` and ``(1, 1, 1, C)``. All three have the
        promoted dtype of the inputs: float32 if every input is float32,
        float64 otherwise.

    Raises
    ------
    InputDtypeError
        An input is not float32 or float64 (a ``TypeError``).
    InputError
        A shape or a hyperparameter is invalid (a ``ValueError``).
    """
    params = ConvParams.parse(stride, padding, dilation)
    dZ = as_float_array("dZ", dZ)
    A_prev = as_float_array("A_prev", A_prev)
    W = as_float_array("W", W)
    geometry = backward_geometry(dZ.shape, A_prev.shape, W.shape, params)
    dtype = result_dtype(dZ, A_prev, W)
    if threads is None:
        threads = blas_threads()
    elif isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads must be a positive int or None; got {threads!r} instead.")
    return backward_kernel(
        dZ.astype(dtype, copy=False),
        A_prev.astype(dtype, copy=False),
        W.astype(dtype, copy=False),
        geometry,
        threads=int(threads),
    )

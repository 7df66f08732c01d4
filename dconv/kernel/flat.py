"""The stride-1 backward path: flat implicit GEMM, for any padding, dilation and kernel.

``A_prev`` (m, H, W, C_prev) is zero-padded into ``P`` (one row per padded pixel,
``m * Hp * Wp`` rows) and ``dZ`` (m, n_H, n_W, C) is laid on the same grid in ``D``
(:class:`dconv.kernel.layout.FlatGrid`). A kernel tap then is a constant row
shift, so with no im2col copy::

    dW[k]   = P[shift_k : shift_k + L].T @ D[front : front + L]     # "lp,lc->pc", per tap
    dA_prev = sum_k D[base - shift_k : ... + L_A] @ W[k].T          # "qc,cp->qp", per tap

dA_prev is the correlation of the padded dZ with the flipped kernel; nothing
is scattered. Rows at wrap-around positions are computed on zeros and dropped.
Each of these GEMMs is cut per sample (for dW, per group of samples when the
kernel is large next to the image), and one ``np.matmul`` call on strided views
runs them all: a sample's rows stay in cache from tap to tap, and GEMMs this
small run on OpenBLAS's single-threaded small-matrix kernels. Where the rules of
:mod:`dconv.kernel.dispatch` say so, the compiled loops take dW or dA_prev
instead. If W or dW holds NaN or inf, :func:`backward_flat` returns None and
the caller takes the im2col path, so that non-finite values land exactly where
the loop reference puts them.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dconv.kernel import dispatch
from dconv.kernel.layout import FlatGrid, flat_grid, pad_input, pad_into
from dconv.kernel.stats import WeightStats, add_sample_squares
from dconv.params import ConvGeometry


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
    would coincide, takes :func:`dconv.kernel.strided.backward_pointwise` instead)
    """
    m, n_h, n_w, channels = dZ.shape
    sample = grid.rows * grid.cols
    buffer = np.empty((grid.total, channels), dtype=dZ.dtype)
    buffer[: grid.front] = 0
    buffer[grid.front + m * sample :] = 0
    pad_into(dZ, buffer[grid.front : grid.front + m * sample].reshape(m, grid.rows, grid.cols, channels), 0, 0)
    return buffer


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


def tap_products(P: np.ndarray, D: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape, first: int, n_groups: int, size: int):
    """``products[g] = sum over the samples of group g of their dW``, for ``n_groups`` groups of ``size`` samples from ``first``.

    One ``np.matmul`` of every (group, tap) GEMM ``P[shift_k : shift_k + L].T @ D[front : front + L]``
    on strided views, no copy.

    Returns
    -------
    ndarray, shape (n_groups, fh, fw, C_prev, C), in the dtype of ``P``
    """
    fh, fw, c_prev, c_out = w_shape
    (dh, dw), (n_h, n_w), cols = geometry.dilation, geometry.out_hw, grid.cols
    sample = grid.rows * cols
    per_sample = (n_h - 1) * cols + n_w                          # first to last output pixel of a sample
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
    return np.matmul(taps, grads[:, None, None])              # "gkpl,glc->gkpc"


def weight_grad_flat(
    P: np.ndarray, D: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape, stats: WeightStats | None = None
) -> np.ndarray:
    """dW of a stride-1 convolution from the flat grids: small GEMMs per sample (or group of samples) and tap.

    ``dW[k] = P[shift_k : shift_k + L].T @ D[front : front + L]`` summed over
    the rows ``L`` of every output pixel. One ``np.matmul`` runs this GEMM
    for every (group, tap) on strided views, no copy (:func:`tap_products`),
    and the partial sums are then added. A group is one sample, or as many as
    keep the partial sums (``taps * C_prev * C`` per group) within the memory
    of the padded input. Per sample, the rows stay in cache from one tap to
    the next, and a GEMM under about 100**3 multiply-adds runs on OpenBLAS's
    small-matrix kernels.

    Parameters
    ----------
    P : ndarray, shape (m * Hp * Wp, C_prev)
        From :func:`embed_input`.
    D : ndarray, shape (total, C)
        From :func:`embed_grad`.
    w_shape : tuple of int
        ``(fh, fw, C_prev, C)``.
    stats : WeightStats, optional
        Filled from the per-sample partial sums where a group is one sample; where groups hold
        several samples, from per-sample GEMMs run for it, :data:`dconv.kernel.stats.BLOCK_BYTES`
        of them at a time. dW is the same either way.

    Returns
    -------
    ndarray, shape (fh, fw, C_prev, C)
    """
    fh, fw, c_prev, c_out = w_shape
    sample = grid.rows * grid.cols
    m = P.shape[0] // sample
    per_group = min(m, -(-fh * fw * c_out // sample))               # ceil(taps * C / sample)
    dW = np.zeros((fh, fw, c_prev, c_out), dtype=P.dtype)
    for first, n_groups, size in sample_groups(m, per_group):
        products = tap_products(P, D, grid, geometry, w_shape, first, n_groups, size)
        dW += products.sum(axis=0)
        if stats is not None and per_group == 1:
            add_sample_squares(products, stats, first)
        del products
    if stats is not None and per_group > 1:
        step = max(1, m // per_group)                             # as many products as the groups held
        for first in range(0, m, step):
            add_sample_squares(tap_products(P, D, grid, geometry, w_shape, first, min(step, m - first), 1), stats, first)
    return dW


def input_grad_flat(
    D: np.ndarray, W: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, m: int, out: np.ndarray | None = None
) -> np.ndarray:
    """dA_prev of a stride-1 convolution: a correlation of the zero-padded dZ with the flipped kernel.

    ``dA_prev[q] = sum_k D[front + origin - offsets[k] + q] @ W[k].T`` on the
    flat grid. With the compiled loop (:func:`dconv.kernel.dispatch.use_compiled_input_grad`),
    one C loop sums every tap into registers and writes ``dA_prev`` once.
    Otherwise, per kernel tap, one ``np.matmul`` runs a small GEMM per sample
    (faster than one large GEMM, as in :func:`weight_grad_flat`) and the
    result is added into ``dA_prev``; then the padding rows and columns are
    dropped.

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
    if dispatch.use_compiled_input_grad(D.dtype, c_prev, c_out):
        dA_prev = np.empty((m, height, width, c_prev), dtype=D.dtype) if out is None else out
        dispatch.input_grad_compiled(D, W.reshape(fh * fw, c_prev, c_out), grid.offsets, base, sample, cols, dA_prev)
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


def backward_flat(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None,
    stats: WeightStats | None = None, input_grad: bool = True,
):
    """``(dA_prev, dW)`` of a stride-1 convolution on the flat grids, or None; dA_prev into ``out`` if given.

    None means the result would differ from the reference in where NaN and
    inf land (the wrap-around rows multiply zeros by non-finite values): the
    caller then uses the im2col path. The check on W holds without dA_prev
    too, so that dW takes the same path, and gets the same bits, either way.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)
    A_prev : ndarray, shape (m, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
    out : ndarray, shape (m, H, W, C_prev), C-contiguous, optional
    stats : WeightStats, optional
        Filled with the per-sample statistics of dW (:mod:`dconv.kernel.stats`).
    input_grad : bool
        False: skip dA_prev (returned as None).

    Returns
    -------
    dA_prev : ndarray, shape (m, H, W, C_prev), C-contiguous; None without ``input_grad``
    dW : ndarray, shape (fh, fw, C_prev, C), float64 where the compiled loop summed it
    """
    if not np.isfinite(W).all():
        return None
    m, c_out = A_prev.shape[0], W.shape[3]
    grid = flat_grid(m, geometry)
    compiled_weight = dispatch.use_compiled_weight_grad(dZ.dtype, A_prev.shape[3], c_out, geometry)
    D = embed_grad(dZ, grid) if input_grad or not compiled_weight else None
    if compiled_weight:
        dW = dispatch.weight_grad_compiled(embed_input(A_prev, geometry), dZ, grid, geometry, W.shape, stats)
    else:
        dW = weight_grad_flat(embed_input(A_prev, geometry), D, grid, geometry, W.shape, stats)
    if not np.isfinite(dW).all():
        return None
    return (input_grad_flat(D, W, grid, geometry, m, out) if input_grad else None), dW

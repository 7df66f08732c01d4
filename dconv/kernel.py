"""The NumPy conv2d kernel: forward and backward for one in-memory batch.

Pure NumPy. This module never imports Dask and does no I/O; the graph layer
calls it once per batch chunk.

Shapes (NHWC activations, HWIO weights, cross-correlation, zero padding)::

    A_prev  (m, H, W, C_prev)        W   (fh, fw, C_prev, C)      b  (1, 1, 1, C)
    Z, dZ   (m, n_H, n_W, C)         cols (m * n_H * n_W, fh * fw * C_prev)

The backward pass is GEMMs plus data movement, in one of two ways.

Stride 1 (any padding, dilation, kernel): flat implicit GEMM, :func:`backward_flat`.
    ``A_prev`` is zero-padded into ``P`` (one row per padded pixel, ``m * Hp * Wp``
    rows) and ``dZ`` is laid on the same grid in ``D``. A kernel tap then is a
    constant row shift, so with no im2col copy::

        dW[k]   = P[shift_k : shift_k + L].T @ D[front : front + L]     # "lp,lc->pc", per tap
        dA_prev = sum_k D[base - shift_k : ... + L_A] @ W[k].T          # "qc,cp->qp", per tap

    (dA_prev is the correlation of the padded dZ with the flipped kernel; no
    scatter-add.) Rows at wrap-around positions are computed on zeros and
    dropped. For dW, the taps of a kernel row (or of the whole kernel, when
    ``fw * C_prev`` is small) are copied side by side first, so BLAS gets a
    wider GEMM. If W or the result holds NaN or inf, the im2col path is used
    instead, so that non-finite values land exactly where the loop reference
    puts them.

Other strides: im2col, :func:`backward_im2col`::

    dW      = cols.T @ dZ            # "mk,mc->kc"
    dA_prev = col2im(dZ @ W.T)       # "mc,kc->mk", then scatter-add per kernel offset

In both, ``db`` is dZ summed over m, n_H, n_W in float64.

Memory
------
Peak bytes allocated by one :func:`backward_kernel` call, including its three
outputs but not its inputs (add ``itemsize * (N_in * C_prev + N_out * C + K * C_prev * C)``
for those, and ``itemsize * N_out * C`` more if ``dZ`` is not C-contiguous)::

    N_in = m * H * W      N_pad = m * Hp * Wp      N_out = m * n_H * n_W      K = fh * fw
    Hp, Wp = H + top + bottom, W + left + right

    stride 1:  itemsize * (N_pad * C + N_pad * C_prev * max(3, 1 + t) + N_in * C_prev + 2 * K * C_prev * C)
               t = fw (kernel-row copy, the usual case), K (when fw * C_prev < 32), 0 (1x1 kernel)
    otherwise: itemsize * (2 * N_pad * C_prev + N_out * K * C_prev + N_in * C_prev + 2 * K * C_prev * C)

plus a few KiB. The NaN/inf fallback of a stride-1 call needs the "otherwise" figure. (The dZ grid ``D`` also carries ``(fh-1)*dh*Wp + (fw-1)*dw`` extra
rows at most, which is included in rounding ``N_pad`` up by one sample.)
:func:`backward_working_set` evaluates this bound.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dconv.errors import InputError
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
    return np.pad(A_prev, ((0, 0), pads[0], pads[1], (0, 0)))


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
    n_out : int
        ``L``: rows from the first to the last output pixel of the batch.
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
    n_out: int
    n_in: int
    front: int
    total: int
    origin: int


def flat_grid(m: int, geometry: ConvGeometry) -> FlatGrid:
    """The :class:`FlatGrid` of a stride-1 convolution on a batch of ``m`` samples."""
    (height, width), (n_h, n_w) = geometry.in_hw, geometry.out_hw
    (fh, fw), (dh, dw) = geometry.kernel_hw, geometry.dilation
    (top, _), (left, _) = geometry.pads
    rows, cols = geometry.padded_hw
    offsets = tuple(kh * dh * cols + kw * dw for kh in range(fh) for kw in range(fw))
    sample = rows * cols
    n_out = (m - 1) * sample + (n_h - 1) * cols + n_w
    n_in = (m - 1) * sample + (height - 1) * cols + width
    origin = top * cols + left
    # dA_prev row q reads dZ buffer row front + origin - offsets[k] + q: keep every read in bounds.
    front = max(0, offsets[-1] - origin)
    total = max(front + m * sample, front + origin + n_in)
    return FlatGrid(rows, cols, offsets, n_out, n_in, front, total, origin)


def embed_input(A_prev: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``A_prev`` zero-padded and flattened to one row per padded pixel.

    Returns
    -------
    ndarray, shape (m * Hp * Wp, C_prev)
        A view of ``A_prev`` when there is no padding and it is C-contiguous, else a copy.
    """
    m, height, width, channels = A_prev.shape
    (top, _), (left, _) = geometry.pads
    rows, cols = geometry.padded_hw
    if (rows, cols) == (height, width):
        return np.ascontiguousarray(A_prev).reshape(m * rows * cols, channels)
    padded = np.zeros((m, rows, cols, channels), dtype=A_prev.dtype)
    padded[:, top : top + height, left : left + width] = A_prev
    return padded.reshape(m * rows * cols, channels)


def embed_grad(dZ: np.ndarray, grid: FlatGrid) -> np.ndarray:
    """``dZ`` on the padded grid: pixel ``(n, i, j)`` at row ``front + n * Hp * Wp + i * Wp + j``, zeros elsewhere.

    Returns
    -------
    ndarray, shape (total, C)
        A view of ``dZ`` when the grids coincide (1x1 kernel, no padding), else a copy.
    """
    m, n_h, n_w, channels = dZ.shape
    sample = grid.rows * grid.cols
    if (n_h, n_w) == (grid.rows, grid.cols) and grid.total == m * sample:
        return np.ascontiguousarray(dZ).reshape(m * sample, channels)
    buffer = np.zeros((grid.total, channels), dtype=dZ.dtype)
    grids = buffer[grid.front : grid.front + m * sample].reshape(m, grid.rows, grid.cols, channels)
    grids[:, :n_h, :n_w] = dZ
    return buffer


def _tap_rows(matrix: np.ndarray, n_rows: int, shape: tuple[int, ...], row_steps: tuple[int, ...]) -> np.ndarray:
    """A read-only view ``view[r, a, b, ..., c] == matrix[r + sum(steps * (a, b, ...)), c]``, no copy."""
    row, item = matrix.strides
    return as_strided(
        matrix,
        shape=(n_rows, *shape, matrix.shape[1]),
        strides=(row, *(step * row for step in row_steps), item),
        writeable=False,
    )


def weight_grad_flat(P: np.ndarray, D: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, w_shape, mode: str) -> np.ndarray:
    """dW of a stride-1 convolution from the flat grids.

    Parameters
    ----------
    P : ndarray, shape (m * Hp * Wp, C_prev)
        From :func:`embed_input`.
    D : ndarray, shape (total, C)
        From :func:`embed_grad`.
    mode : {"taps", "rows", "full"}
        ``"taps"``: one GEMM per kernel tap on row ranges of ``P`` (no copy).
        ``"rows"``: copy the ``fw`` taps of a kernel row side by side
        (``fw * P`` bytes), then one GEMM per kernel row, ``K = fw * C_prev``.
        ``"full"``: im2col of every tap (``fh * fw * P`` bytes), one GEMM.

    Returns
    -------
    ndarray, shape (fh, fw, C_prev, C)
    """
    fh, fw, c_prev, c_out = w_shape
    (dh, dw), cols = geometry.dilation, grid.cols
    n_out = grid.n_out
    dz_rows = D[grid.front : grid.front + n_out]                              # (L, C)
    if mode == "full":
        taps = np.ascontiguousarray(_tap_rows(P, n_out, (fh, fw), (dh * cols, dw)))
        return (taps.reshape(n_out, -1).T @ dz_rows).reshape(w_shape)        # "lk,lc->kc", k = (kh, kw, c_prev)
    if mode == "rows":
        n_rows = n_out + (fh - 1) * dh * cols
        taps = np.ascontiguousarray(_tap_rows(P, n_rows, (fw,), (dw,))).reshape(n_rows, fw * c_prev)
        dW = np.empty((fh, fw * c_prev, c_out), dtype=P.dtype)
        for kh in range(fh):
            shift = kh * dh * cols
            np.matmul(taps[shift : shift + n_out].T, dz_rows, out=dW[kh])  # "lk,lc->kc", k = (kw, c_prev)
        return dW.reshape(w_shape)
    dW = np.empty((fh * fw, c_prev, c_out), dtype=P.dtype)
    for k, shift in enumerate(grid.offsets):
        np.matmul(P[shift : shift + n_out].T, dz_rows, out=dW[k])          # "lp,lc->pc"
    return dW.reshape(w_shape)


def input_grad_flat(D: np.ndarray, W: np.ndarray, grid: FlatGrid, geometry: ConvGeometry, m: int, mode: str) -> np.ndarray:
    """dA_prev of a stride-1 convolution: a correlation of the zero-padded dZ with the flipped kernel.

    ``dA_prev[q] = sum_k D[front + origin - offsets[k] + q] @ W[k].T`` on the flat
    grid, then the padding rows and columns are dropped.

    Parameters
    ----------
    D : ndarray, shape (total, C)
        From :func:`embed_grad`.
    W : ndarray, shape (fh, fw, C_prev, C)
    mode : {"taps", "rows"}
        As in :func:`weight_grad_flat`, with copies of ``D`` instead of ``P``;
        every GEMM but the first is followed by an add into the result.

    Returns
    -------
    ndarray, shape (m, H, W, C_prev), C-contiguous
    """
    fh, fw, c_prev, c_out = W.shape
    (height, width), (dh, dw) = geometry.in_hw, geometry.dilation
    rows, cols, n_in = grid.rows, grid.cols, grid.n_in
    base = grid.front + grid.origin                          # D row read by q = 0 at tap (0, 0)
    out = np.empty((m * rows * cols, c_prev), dtype=D.dtype)
    acc = out[:n_in]
    if mode == "rows":
        lo = base - grid.offsets[-1]
        n_rows = n_in + (fh - 1) * dh * cols
        taps = np.ascontiguousarray(_tap_rows(D[lo:], n_rows, (fw,), (dw,))).reshape(n_rows, fw * c_out)
        w_rows = W[:, ::-1].transpose(0, 1, 3, 2).reshape(fh, fw * c_out, c_prev)
        scratch = np.empty_like(acc)
        for kh in range(fh):
            start = (fh - 1 - kh) * dh * cols
            target = acc if kh == 0 else scratch
            np.matmul(taps[start : start + n_in], w_rows[kh], out=target)   # "qk,kp->qp", k = flipped kw x C
            if kh:
                acc += scratch
    else:
        w_taps = np.ascontiguousarray(W.reshape(fh * fw, c_prev, c_out).transpose(0, 2, 1))  # (K, C, C_prev)
        scratch = np.empty_like(acc)
        for k, shift in enumerate(grid.offsets):
            start = base - shift
            target = acc if k == 0 else scratch
            np.matmul(D[start : start + n_in], w_taps[k], out=target)        # "qc,cp->qp"
            if k:
                acc += scratch
    dA_prev = out.reshape(m, rows, cols, c_prev)[:, :height, :width]
    return dA_prev if (rows, cols) == (height, width) else np.ascontiguousarray(dA_prev)


FLAT_MODES = {"dW": None, "dA": None}   # benchmark override; None = choose per shape


def choose_modes(m: int, c_prev: int, c_out: int, geometry: ConvGeometry) -> tuple[str, str]:
    """Pick the dW and dA strategies of :func:`weight_grad_flat` and :func:`input_grad_flat`."""
    fh, fw = geometry.kernel_hw
    if fh * fw == 1:
        dW_mode = "taps"
    elif fw * c_prev < 32:   # a kernel row of taps is too thin a GEMM: copy them all
        dW_mode = "full"
    else:
        dW_mode = "rows"
    dW_mode = FLAT_MODES["dW"] or dW_mode
    dA_mode = FLAT_MODES["dA"] or "taps"
    return dW_mode, dA_mode


def backward_flat(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry):
    """``(dA_prev, dW)`` of a stride-1 convolution by flat implicit GEMM, or None.

    None means the result would differ from the reference in where NaN and
    inf land (the wrap-around rows multiply zeros by non-finite values): the
    caller then uses the im2col path.
    """
    if not np.isfinite(W).all():
        return None
    m, c_prev, c_out = A_prev.shape[0], W.shape[2], W.shape[3]
    grid = flat_grid(m, geometry)
    dW_mode, dA_mode = choose_modes(m, c_prev, c_out, geometry)
    D = embed_grad(dZ, grid)
    dW = weight_grad_flat(embed_input(A_prev, geometry), D, grid, geometry, W.shape, dW_mode)
    if not np.isfinite(dW).all():
        return None
    return input_grad_flat(D, W, grid, geometry, m, dA_mode), dW


# --------------------------------------------------------------------------- any stride: im2col


def backward_im2col(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry):
    """``(dA_prev, dW)`` for any stride: im2col, two GEMMs, col2im."""
    n_channels = W.shape[3]
    padded = pad_input(A_prev, geometry.pads)
    cols = im2col(padded, geometry)                           # (M, K)
    dZ_2d = dZ.reshape(-1, n_channels)                        # (M, C)
    W_2d = W.reshape(-1, n_channels)                          # (K, C)
    dW = (cols.T @ dZ_2d).reshape(W.shape)                    # "mk,mc->kc"
    padded_shape = padded.shape
    del cols, padded
    dcols = dZ_2d @ W_2d.T                                    # "mc,kc->mk"
    dA_prev = unpad(col2im(dcols, geometry, padded_shape), geometry.pads)
    return np.ascontiguousarray(dA_prev), dW


def bias_grad(dZ: np.ndarray) -> np.ndarray:
    """db, shape (1, 1, 1, C): dZ summed over m, n_H, n_W with float64 accumulation.

    float64 dZ goes through BLAS (a GEMV with a ones vector, the fastest sum
    here); float32 dZ is summed by NumPy in float64, because a float32 BLAS
    sum loses digits when the terms cancel.
    """
    n_channels = dZ.shape[3]
    rows = dZ.reshape(-1, n_channels)
    if dZ.dtype == np.float64:
        db = np.ones(rows.shape[0]) @ rows                                      # "m,mc->c"
    else:
        db = rows.sum(axis=0, dtype=np.float64)
    return db.astype(dZ.dtype).reshape(1, 1, 1, n_channels)


def backward_working_set(m: int, geometry: ConvGeometry, c_prev: int, c_out: int, itemsize: int) -> int:
    """Upper bound, in bytes, of what one :func:`backward_kernel` call allocates (outputs included, inputs not).

    See the module docstring for the formula. ``itemsize`` is 4 for float32, 8 for float64.
    """
    (height, width), (rows, cols) = geometry.in_hw, geometry.padded_hw
    (n_h, n_w), (fh, fw) = geometry.out_hw, geometry.kernel_hw
    taps = fh * fw
    n_in, n_pad, n_out = m * height * width, (m + 1) * rows * cols, m * n_h * n_w
    weights = 2 * taps * c_prev * c_out
    if geometry.stride == (1, 1):
        copies = 0 if taps == 1 else (taps if fw * c_prev < 32 else fw)
        elements = n_pad * c_out + n_pad * c_prev * max(3, 1 + copies) + n_in * c_prev + weights
    else:
        elements = 2 * n_pad * c_prev + n_out * taps * c_prev + n_in * c_prev + weights
    return itemsize * elements


def backward_kernel(dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry) -> Gradients:
    """The backward pass on already-validated arrays of one dtype.

    The graph layer calls this once per batch chunk. Use :func:`conv2d_backward`
    from user code: it validates first.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)
    A_prev : ndarray, shape (m, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
    geometry : ConvGeometry
        From :func:`dconv.params.backward_geometry` on these shapes.

    Returns
    -------
    Gradients
        C-contiguous ``dA_prev``, ``dW``, ``db`` in the dtype of the inputs.
    """
    dZ = np.ascontiguousarray(dZ)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate silently, as IEEE says
        result = backward_flat(dZ, A_prev, W, geometry) if geometry.stride == (1, 1) else None
        if result is None:
            result = backward_im2col(dZ, A_prev, W, geometry)
        dA_prev, dW = result
        return Gradients(dA_prev, dW, bias_grad(dZ))


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
    return backward_kernel(
        dZ.astype(dtype, copy=False),
        A_prev.astype(dtype, copy=False),
        W.astype(dtype, copy=False),
        geometry,
    )

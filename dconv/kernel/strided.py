"""The backward paths that do not use the flat grid: pointwise 1x1, and im2col for any stride.

A 1x1 kernel at stride 1 with no padding is two plain GEMMs over every pixel
(:func:`backward_pointwise`). Other strides take im2col (:func:`backward_im2col`)::

    dW      = cols.T @ dZ            # "mk,mc->kc"  (or the compiled dW loop, with no cols copy)
    dA_prev = col2im(dZ @ W.T)       # "mc,kc->mk", then scatter-add per kernel offset

with ``cols`` (m * n_H * n_W, fh * fw * C_prev) from :func:`im2col`. Where the
compiled loop takes dA_prev, it is instead one stride-1 correlation per phase of
the padded input (:func:`input_grad_phases`), and nothing is scattered. The
stride-1 path hands layers with NaN or inf in W or dW to :func:`backward_im2col`
too.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dconv.kernel import dispatch
from dconv.kernel.layout import flat_grid, pad_input, pad_into, unpad
from dconv.kernel.stats import WeightStats, add_sample_products
from dconv.params import ConvGeometry


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


def is_pointwise(geometry: ConvGeometry) -> bool:
    """Whether the layer is a 1x1 kernel at stride 1 with no padding (:func:`backward_pointwise`)."""
    return geometry.kernel_hw == (1, 1) and geometry.stride == (1, 1) and geometry.pads == ((0, 0), (0, 0))


def backward_pointwise(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, stats: WeightStats | None = None, input_grad: bool = True
):
    """``(dA_prev, dW)`` of a 1x1 convolution at stride 1 with no padding: two GEMMs over every pixel.

    With ``L = m * H * W`` pixel rows, ``dW = A_prev.T @ dZ`` ("lp,lc->pc") and
    ``dA_prev = dZ @ W.T`` ("lc,pc->lp"): two large GEMMs, which BLAS threads
    itself, in place of the flat path's per-sample ones. The statistics
    (``stats``) come from the compiled loop run for them alone
    (:func:`dconv.kernel.dispatch.weight_stats_compiled`), or one GEMM per
    sample (:func:`dconv.kernel.stats.add_sample_products`); without
    ``input_grad``, dA_prev is None.

    Returns
    -------
    dA_prev : ndarray, shape (m, H, W, C_prev), C-contiguous; None without ``input_grad``
    dW : ndarray, shape (1, 1, C_prev, C)
    """
    c_prev, c_out = W.shape[2:]
    pixels, grads, weights = A_prev.reshape(-1, c_prev), dZ.reshape(-1, c_out), W.reshape(c_prev, c_out)
    dW = (pixels.T @ grads).reshape(W.shape)
    if stats is not None and dispatch.use_compiled_weight_stats(dZ.dtype, c_out):
        dispatch.weight_stats_compiled(A_prev, dZ, W.shape, pointwise_geometry(A_prev.shape), stats)
    elif stats is not None:
        m = A_prev.shape[0]
        add_sample_products(pixels.reshape(m, -1, c_prev), grads.reshape(m, -1, c_out), stats)
    return ((grads @ weights.T).reshape(A_prev.shape) if input_grad else None), dW


def backward_im2col(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None,
    stats: WeightStats | None = None, input_grad: bool = True,
):
    """``(dA_prev, dW)`` for any stride: im2col, two GEMMs, col2im. The compiled dA_prev loop writes into ``out``
    if given; the caller copies the other paths' dA_prev there.

    When the compiled dW loop applies (:func:`dconv.kernel.dispatch.use_compiled_weight_grad`),
    it reads the padded input in place and there is no im2col copy; when the
    compiled dA_prev loop applies and W is finite, :func:`input_grad_phases`
    replaces the second GEMM and col2im.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)
    A_prev : ndarray, shape (m, H, W, C_prev)
    W : ndarray, shape (fh, fw, C_prev, C)
    out : ndarray, shape (m, H, W, C_prev), C-contiguous, optional
    stats : WeightStats, optional
        Filled with the per-sample statistics of dW: by the compiled loop that computes dW;
        beside im2col's GEMM, by the compiled loop run for them alone
        (:func:`dconv.kernel.dispatch.weight_stats_compiled`) or one GEMM per sample on the
        columns (:func:`dconv.kernel.stats.add_sample_products`).
    input_grad : bool
        False: skip dA_prev (returned as None).

    Returns
    -------
    dA_prev : ndarray, shape (m, H, W, C_prev), C-contiguous; None without ``input_grad``
    dW : ndarray, shape (fh, fw, C_prev, C), float64 where the compiled loop summed it
    """
    m, n_channels = dZ.shape[0], W.shape[3]
    padded = pad_input(A_prev, geometry.pads)
    dZ_2d = dZ.reshape(-1, n_channels)                        # (M, C)
    W_2d = W.reshape(-1, n_channels)                          # (K, C)
    if dispatch.use_compiled_weight_grad(dZ.dtype, W.shape[2], n_channels, geometry):
        P = np.ascontiguousarray(padded).reshape(-1, padded.shape[3])
        dW = dispatch.weight_grad_compiled(P, dZ, flat_grid(m, geometry), geometry, W.shape, stats)
        del P
    else:
        cols = im2col(padded, geometry)                       # (M, K)
        dW = (cols.T @ dZ_2d).reshape(W.shape)                # "mk,mc->kc"
        if stats is not None and not dispatch.use_compiled_weight_stats(dZ.dtype, n_channels):
            add_sample_products(cols.reshape(m, -1, cols.shape[1]), dZ_2d.reshape(m, -1, n_channels), stats)
        del cols
        if stats is not None and dispatch.use_compiled_weight_stats(dZ.dtype, n_channels):
            dispatch.weight_stats_compiled(padded, dZ, W.shape, geometry, stats)
    padded_shape = padded.shape
    del padded
    if not input_grad:
        return None, dW
    if dispatch.use_compiled_input_grad(dZ.dtype, W.shape[2], n_channels) and np.isfinite(W).all():
        return input_grad_phases(dZ, W, geometry, out), dW        # finite W: the zeros around dZ add nothing
    dcols = dZ_2d @ W_2d.T                                    # "mc,kc->mk"
    dA_prev = unpad(col2im(dcols, geometry, padded_shape), geometry.pads)
    return np.ascontiguousarray(dA_prev), dW


def pointwise_geometry(a_shape: tuple[int, ...]) -> ConvGeometry:
    """The geometry of a 1x1 convolution at stride 1 with no padding, on inputs of shape ``a_shape`` (m, H, W, C_prev)."""
    height, width = a_shape[1:3]
    return ConvGeometry(in_hw=(height, width), kernel_hw=(1, 1), out_hw=(height, width), stride=(1, 1),
                        dilation=(1, 1), pads=((0, 0), (0, 0)))


def input_grad_phases(dZ: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out: np.ndarray | None = None) -> np.ndarray:
    """dA_prev at any stride by the compiled loop, one stride-1 correlation per phase of the padded input.

    The padded input pixels ``(ry + a * sh, rx + b * sw)`` of one phase ``(ry, rx)``
    are reached by the taps ``(kh, kw)`` with ``kh * dh = ry + e_h * sh`` and
    ``kw * dw = rx + e_w * sw`` (``e_h, e_w`` whole), from ``dZ[a - e_h, b - e_w]``:
    a stride-1 correlation of dZ with those taps, with no product on the zeros
    that an upsampled dZ would hold. ``dZ`` is laid once on a grid padded by the
    largest ``e``, and each phase writes the pixels of it that lie inside the
    unpadded input straight into ``dA_prev`` (``out`` if given, C-contiguous).

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)
    W : ndarray, shape (fh, fw, C_prev, C), finite

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
        dispatch.input_grad_compiled(
            D, w_taps, [shifts[i] for i in order], base, grid_h * grid_w, grid_w, dA_prev,
            size=(n_a, n_b), first=(ry + a0 * sh - top, rx + b0 * sw - left), step=(sh, sw),
        )
    return dA_prev

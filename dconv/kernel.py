"""The NumPy conv2d kernel: forward and backward for one in-memory batch.

Pure NumPy. This module never imports Dask and does no I/O; the graph layer
calls it once per batch chunk.

Shapes (NHWC activations, HWIO weights, cross-correlation, zero padding)::

    A_prev  (m, H, W, C_prev)        W   (fh, fw, C_prev, C)      b  (1, 1, 1, C)
    Z, dZ   (m, n_H, n_W, C)         cols (m * n_H * n_W, fh * fw * C_prev)

The backward pass is three GEMM-shaped lines on the im2col matrix ``cols``::

    dW      = cols.T @ dZ            # "mk,mc->kc"
    db      = sum of dZ over m, n_H, n_W
    dA_prev = col2im(dZ @ W.T)       # "mc,kc->mk", then scatter-add per kernel offset
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

__all__ = ["Gradients", "conv2d_forward", "conv2d_backward", "backward_kernel"]


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
    """
    n_channels = W.shape[3]
    padded = pad_input(A_prev, geometry.pads)
    cols = im2col(padded, geometry)                      # (M, K)
    dZ_2d = np.ascontiguousarray(dZ).reshape(-1, n_channels)  # (M, C)
    W_2d = W.reshape(-1, n_channels)                     # (K, C)

    dW = (cols.T @ dZ_2d).reshape(W.shape)                # "mk,mc->kc"
    del cols
    db = dZ_2d.sum(axis=0, dtype=np.float64).astype(dZ.dtype).reshape(1, 1, 1, n_channels)
    dcols = dZ_2d @ W_2d.T                                # "mc,kc->mk"
    dA_prev = unpad(col2im(dcols, geometry, padded.shape), geometry.pads)
    return Gradients(np.ascontiguousarray(dA_prev), dW, db)


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

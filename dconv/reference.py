"""A small loop-based conv2d, written for reading, used as the test oracle.

It is the classic teaching implementation generalised to every padding form,
stride and dilation: plain Python loops over the batch, the output positions
and the output channels, about a million times slower than :mod:`dconv.kernel`.
Use it on tiny arrays only (tests, and the benchmark's baseline).
"""

from __future__ import annotations

import numpy as np

from dconv.kernel import Gradients
from dconv.params import ConvParams, backward_geometry, forward_geometry

__all__ = ["conv2d_forward_loops", "conv2d_backward_loops"]


def pad_input(A_prev, pads):
    """Zero-pad the spatial axes; kept separate from the kernel's so the oracle shares no code with it."""
    (top, bottom), (left, right) = pads
    m, height, width, channels = A_prev.shape
    padded = np.zeros((m, top + height + bottom, left + width + right, channels), dtype=A_prev.dtype)
    padded[:, top : top + height, left : left + width, :] = A_prev
    return padded


def unpad(padded, pads):
    """Inverse of :func:`pad_input`."""
    (top, bottom), (left, right) = pads
    return padded[:, top : padded.shape[1] - bottom, left : padded.shape[2] - right, :]


def _window(geometry, i: int, j: int) -> tuple[slice, slice]:
    """The (rows, columns) slices of the padded input that output pixel (i, j) reads."""
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    fh, fw = geometry.kernel_hw
    rows = slice(i * sh, i * sh + (fh - 1) * dh + 1, dh)
    columns = slice(j * sw, j * sw + (fw - 1) * dw + 1, dw)
    return rows, columns


def conv2d_forward_loops(A_prev, W, b=None, *, stride=1, padding=0, dilation=1) -> np.ndarray:
    """Loop version of :func:`dconv.conv2d_forward`; same arguments, same result."""
    params = ConvParams.parse(stride, padding, dilation)
    geometry = forward_geometry(A_prev.shape, W.shape, params)
    padded = pad_input(A_prev, geometry.pads)
    m, (n_h, n_w), n_c = A_prev.shape[0], geometry.out_hw, W.shape[3]
    dtype = np.result_type(A_prev, W) if b is None else np.result_type(A_prev, W, b)
    Z = np.zeros((m, n_h, n_w, n_c), dtype=dtype)
    for n in range(m):
        for i in range(n_h):
            for j in range(n_w):
                rows, columns = _window(geometry, i, j)
                for c in range(n_c):
                    Z[n, i, j, c] = np.sum(padded[n, rows, columns, :] * W[:, :, :, c])
                    if b is not None:
                        Z[n, i, j, c] += np.ravel(b)[c]
    return Z


def conv2d_backward_loops(dZ, A_prev, W, *, stride=1, padding=0, dilation=1) -> Gradients:
    """Loop version of :func:`dconv.conv2d_backward`; same arguments, same result."""
    params = ConvParams.parse(stride, padding, dilation)
    geometry = backward_geometry(dZ.shape, A_prev.shape, W.shape, params)
    padded = pad_input(A_prev, geometry.pads)
    dpadded = np.zeros_like(padded, dtype=np.result_type(dZ, A_prev, W))
    dW = np.zeros(W.shape, dtype=dpadded.dtype)
    db = np.zeros((1, 1, 1, W.shape[3]), dtype=dpadded.dtype)
    m, (n_h, n_w), n_c = A_prev.shape[0], geometry.out_hw, W.shape[3]
    for n in range(m):
        for i in range(n_h):
            for j in range(n_w):
                rows, columns = _window(geometry, i, j)
                for c in range(n_c):
                    dpadded[n, rows, columns, :] += W[:, :, :, c] * dZ[n, i, j, c]
                    dW[:, :, :, c] += padded[n, rows, columns, :] * dZ[n, i, j, c]
                    db[:, :, :, c] += dZ[n, i, j, c]
    return Gradients(unpad(dpadded, geometry.pads), dW, db)

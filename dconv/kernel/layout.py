"""Where the pixels sit: zero padding, and the flat grid that the stride-1 path and the compiled loops index.

Shapes as in :mod:`dconv.kernel`: NHWC activations, ``pads = ((top, bottom), (left, right))``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dconv.params import ConvGeometry


def pad_input(A_prev: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Zero-pad the two spatial axes of ``A_prev`` (m, H, W, C) by ``((top, bottom), (left, right))``."""
    if pads == ((0, 0), (0, 0)):
        return A_prev
    (top, bottom), (left, right) = pads
    m, height, width, channels = A_prev.shape
    padded = np.empty((m, top + height + bottom, left + width + right, channels), dtype=A_prev.dtype)
    pad_into(A_prev, padded, top, left)
    return padded


def pad_into(values: np.ndarray, grids: np.ndarray, top: int, left: int) -> None:
    """``grids[:, top:top + h, left:left + w] = values``, and zeros in the rest of ``grids``.

    Writes each element once, instead of zeroing all of ``grids`` first.

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


def unpad(padded: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Drop the padding added by :func:`pad_input` (works for zero pads too)."""
    (top, bottom), (left, right) = pads
    height, width = padded.shape[1], padded.shape[2]
    return padded[:, top : height - bottom, left : width - right, :]


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

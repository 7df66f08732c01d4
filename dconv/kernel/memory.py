"""The memory model of one backward pass: an upper bound on what :func:`dconv.kernel.backward_kernel` allocates.

Peak bytes allocated by one call, including its three outputs but not its
inputs (add ``itemsize * (N_in * C_prev + N_out * C + K * C_prev * C)`` for
those, and ``itemsize * N_out * C`` more if ``dZ`` is not C-contiguous)::

    N_in = m * H * W      N_pad = (m + 1) * Hp * Wp      N_out = m * n_H * n_W      K = fh * fw
    Hp, Wp = H + top + bottom, W + left + right

    stride 1:  itemsize * (N_pad * C + 2 * N_pad * C_prev + N_in * C_prev + 4 * K * C_prev * C)
    otherwise: itemsize * (2 * N_pad * C_prev + max(N_out * K * C_prev, N_grid * C)
                           + N_in * C_prev + 4 * K * C_prev * C)
    N_grid = (m + 1) * (e_h + max(n_H, ceil(Hp / sh))) * (e_w + max(n_W, ceil(Wp / sw))),  e_h = (fh-1)*dh // sh

plus a few KiB. The max is over col2im's ``dcols`` and the dZ grid of
:func:`dconv.kernel.strided.input_grad_phases`, whose phases write into
dA_prev. The NaN/inf fallback of a stride-1 call needs the "otherwise" figure.
(The dZ grid ``D`` of the stride-1 path carries ``(fh-1)*dh*Wp + (fw-1)*dw``
extra rows at most: the extra sample in ``N_pad`` covers them.) A call split
across ``t`` threads needs ``m + t`` in place of ``m + 1`` in ``N_pad``, and
``itemsize * N_in * C_prev`` more for the slices' dA_prev (the compiled loops
write it in place; the bound keeps the term for the NumPy paths, which copy).

With the per-sample statistics (``stats=True``, :mod:`dconv.kernel.stats`), add::

    t * (8 * 4 * K * C_prev * C + 2 * BLOCK_BYTES) + 8 * (2 * m * C + 6 * m)

per thread the statistics' ``dW_sq``, one sample's float64 dW (the compiled loop's
scratch), and the per-sample products and their float64 squares (at most
:data:`~dconv.kernel.stats.BLOCK_BYTES` each, or one sample's); for the batch, each
sample's float64 ``db_i`` and its squares, and the norms. (The stride-1 NumPy path's
grouped layers redo the per-sample products after the grouped ones are freed, in
the same room.) Without dA_prev the bound still holds: less is allocated.
"""

from __future__ import annotations

from dconv.kernel.stats import BLOCK_BYTES
from dconv.params import ConvGeometry


def backward_working_set(
    m: int, geometry: ConvGeometry, c_prev: int, c_out: int, itemsize: int, threads: int = 1, stats: bool = False
) -> int:
    """Upper bound, in bytes, of what one :func:`dconv.kernel.backward_kernel` call allocates (outputs included, inputs not).

    See the module docstring for the formula. ``itemsize`` is 4 for float32, 8 for float64;
    ``stats``: the call computes the per-sample statistics.
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
    extra = threads * (8 * 4 * taps * c_prev * c_out + 2 * BLOCK_BYTES) + 8 * (2 * m * c_out + 6 * m) if stats else 0
    return itemsize * (elements + split) + extra

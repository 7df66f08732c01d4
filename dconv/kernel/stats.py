"""Per-sample gradient statistics: what each sample's own gradient ``g_i = (dW_i, db_i)`` adds up to.

``dW = sum_i dW_i`` and ``db = sum_i db_i``, with ``dW_i`` and ``db_i`` the gradients
from sample ``i`` alone. :func:`dconv.kernel.backward_kernel` with ``stats=True``
returns, beside them, a :class:`GradientStats`::

    sample_grad_norm2[i] = |dW_i|^2 + |db_i|^2        (m,)                  float64
    dW_sq                = sum_i dW_i * dW_i           (fh, fw, C_prev, C)   float64, elementwise
    db_sq                = sum_i db_i * db_i           (1, 1, 1, C)          float64, elementwise

Each path builds ``dW_i`` a few samples at a time, never the whole batch's:

* the compiled dW loop sums each sample on its own and squares it in C, one sample's
  float64 ``dW_i`` at a time (:func:`dconv.kernel.dispatch.weight_grad_compiled`);
* the stride-1 NumPy path's per-sample GEMMs already hold ``dW_i`` (one sample per
  group); where it groups samples it runs the per-sample GEMMs again for the statistics;
* the im2col and 1x1 paths run one large GEMM for dW, and the statistics run the compiled
  loop beside it, for the statistics only, where it can take the layer
  (:func:`dconv.kernel.dispatch.use_compiled_weight_stats`), else per-sample GEMMs
  (:func:`add_sample_products`), :data:`BLOCK_BYTES` of products at a time, squared in C
  (``_flatconv.square_sums``) where the compiled helpers run.

dW itself is computed exactly as without the statistics, so its bits do not change.
``dW_i`` is rounded to the input dtype where a NumPy GEMM computed it (float32 GEMMs
for float32 inputs) and is float64 where the compiled loop summed it; its squares
are taken and summed in float64 everywhere. ``db_i`` is dZ summed over one sample's
pixels in float64 (:func:`bias_stats`), an array of ``m * C`` float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dconv import simd
from dconv.simd import _flatconv  # the compiled loops, or None

BLOCK_BYTES = 1 << 20
"""At most this many bytes of per-sample products (``dW_i``, or their float64 squares) at once."""


def _compiled() -> bool:
    """Whether the compiled helpers may run: built, and this process's level is not ``numpy``."""
    return _flatconv is not None and simd.active_level() != "numpy"


class GradientStats(NamedTuple):
    """Per-sample statistics of one batch's gradients (see :mod:`dconv.kernel.stats`).

    Attributes
    ----------
    sample_grad_norm2 : ndarray, float64, shape (m,)
        ``|dW_i|^2 + |db_i|^2`` for each sample ``i``.
    dW_sq : ndarray, float64, shape (fh, fw, C_prev, C)
        ``sum_i dW_i * dW_i``, elementwise.
    db_sq : ndarray, float64, shape (1, 1, 1, C)
        ``sum_i db_i * db_i``, elementwise.
    """

    sample_grad_norm2: np.ndarray
    dW_sq: np.ndarray
    db_sq: np.ndarray


class WeightStats(NamedTuple):
    """The dW half of the statistics while a path fills it in, in place.

    Attributes
    ----------
    norm2 : ndarray, float64, shape (m,)
        ``|dW_i|^2``.
    dW_sq : ndarray, float64, shape (fh, fw, C_prev, C)
        ``sum_i dW_i * dW_i``.
    sink : ProductSink, optional
        Also given each block of ``dW_i`` (:meth:`dconv.kernel.sketch.ProductSink.add`), for the
        per-sample inner products and sketches; None: the squares only.
    """

    norm2: np.ndarray
    dW_sq: np.ndarray
    sink: Any = None


def new_weight_stats(m: int, w_shape: tuple[int, int, int, int], sink: Any = None) -> WeightStats:
    """Zeroed :class:`WeightStats` for ``m`` samples and weights of shape ``w_shape``, feeding ``sink`` if given."""
    return WeightStats(np.zeros(m), np.zeros(w_shape), sink)


def add_sample_squares(per_sample: np.ndarray, stats: WeightStats, first: int) -> None:
    """Add the squares of ``per_sample[j] = dW_(first + j)`` into ``stats``, in float64.

    Parameters
    ----------
    per_sample : ndarray, shape (g, ...) with ``prod(...) = fh * fw * C_prev * C``
        The dW of each of ``g`` consecutive samples, in the order of ``stats.dW_sq``.
    stats : WeightStats
        ``norm2[first : first + g]`` is written, ``dW_sq`` added to; ``stats.sink``, if any, is given
        the rows too.
    """
    rows = per_sample.reshape(per_sample.shape[0], -1)
    if stats.sink is not None:
        stats.sink.add(rows, first)
    dW_sq = stats.dW_sq.reshape(-1)
    if _compiled() and rows.flags.c_contiguous:  # in C: no float64 temporaries
        _flatconv.square_sums(rows, rows.shape[0], rows.shape[1], dW_sq, stats.norm2[first : first + rows.shape[0]])
        return
    step = max(1, BLOCK_BYTES // (8 * rows.shape[1]))
    for lo in range(0, rows.shape[0], step):
        squares = np.square(rows[lo : lo + step], dtype=np.float64)      # exact for float32 values
        stats.norm2[first + lo : first + lo + squares.shape[0]] = squares.sum(axis=1)
        dW_sq += squares.sum(axis=0)


def add_sample_products(columns: np.ndarray, grads: np.ndarray, stats: WeightStats) -> None:
    """The dW of each sample by its own GEMM, ``dW_i = columns[i].T @ grads[i]``, squared into ``stats``.

    Parameters
    ----------
    columns : ndarray, shape (m, L, K)
        Each sample's rows of the GEMM's left operand (im2col's columns, or the 1x1 path's pixels),
        ``K = fh * fw * C_prev``.
    grads : ndarray, shape (m, L, C)
        Each sample's dZ rows.
    stats : WeightStats
        Filled for all ``m`` samples.
    """
    m, _, k = columns.shape
    c_out = grads.shape[2]
    step = max(1, BLOCK_BYTES // (columns.itemsize * k * c_out))
    products = np.empty((min(step, m), k, c_out), dtype=np.result_type(columns, grads))
    for lo in range(0, m, step):
        group = products[: min(step, m - lo)]
        for j in range(group.shape[0]):                  # one GEMM per sample: faster here than a stacked matmul
            np.matmul(columns[lo + j].T, grads[lo + j], out=group[j])                 # "lk,lc->kc"
        add_sample_squares(group, stats, lo)


def sample_bias_grads(dZ: np.ndarray) -> np.ndarray:
    """Each sample's ``db_i``: dZ (m, n_H, n_W, C) of sample ``i`` summed over its pixels in float64.

    Returns
    -------
    ndarray, float64, shape (m, C)
    """
    m, c_out = dZ.shape[0], dZ.shape[3]
    grads = dZ.reshape(m, -1, c_out)
    if dZ.dtype == np.float64:
        return np.matmul(np.ones(grads.shape[1]), grads)                   # "l,mlc->mc", BLAS
    if _compiled() and dZ.flags.c_contiguous:
        db_each = np.zeros((m, c_out))                                     # float32 summed in float64, in C
        for i in range(m):
            _flatconv.column_sums(grads[i], grads.shape[1], c_out, db_each[i])
        return db_each
    return grads.sum(axis=1, dtype=np.float64)


def bias_stats(dZ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(|db_i|^2 per sample, sum_i db_i * db_i)`` with ``db_i`` dZ of sample ``i`` summed in float64.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, C)

    Returns
    -------
    norm2 : ndarray, float64, shape (m,)
    db_sq : ndarray, float64, shape (C,)
    """
    db_each = sample_bias_grads(dZ)
    squares = db_each * db_each
    return squares.sum(axis=1), squares.sum(axis=0)


def gradient_stats(weight: WeightStats, dZ: np.ndarray, bias: bool = True) -> GradientStats:
    """The finished :class:`GradientStats`: the dW half from a path, the db half from ``dZ`` (m, n_H, n_W, C).

    Without a ``bias`` a sample's gradient is ``dW_i`` alone: no db half (``db_sq`` zero).
    """
    if not bias:
        return GradientStats(weight.norm2, weight.dW_sq, np.zeros((1, 1, 1, dZ.shape[3])))
    db_norm2, db_sq = bias_stats(dZ)
    return GradientStats(weight.norm2 + db_norm2, weight.dW_sq, db_sq.reshape(1, 1, 1, -1))


def concatenate_stats(parts: list[GradientStats]) -> GradientStats:
    """The statistics of consecutive slices of a batch as one: the norms in slice order, the squares added in slice order."""
    return GradientStats(
        np.concatenate([part.sample_grad_norm2 for part in parts]),
        np.sum([part.dW_sq for part in parts], axis=0),
        np.sum([part.db_sq for part in parts], axis=0),
    )

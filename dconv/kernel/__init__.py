"""The NumPy conv2d kernel: forward and backward for one in-memory batch.

Pure NumPy, with optional compiled loops; it never imports Dask and does no I/O.
The graph layer calls :func:`backward_kernel` once per batch chunk.

Shapes (NHWC activations, HWIO weights, cross-correlation, zero padding)::

    A_prev  (m, H, W, C_prev)        W   (fh, fw, C_prev, C)      b  (1, 1, 1, C)
    Z, dZ   (m, n_H, n_W, C)         cols (m * n_H * n_W, fh * fw * C_prev)

Modules::

    __init__   the public API (conv2d_forward, conv2d_backward, Gradients, GradientsWithStats) and
               backward_kernel, which picks the path of a layer
    flat       stride 1: flat implicit GEMM on the zero-padded, flattened batch
    strided    the 1x1 pointwise GEMMs; im2col/col2im for any stride; dA_prev per phase
    layout     zero padding, and the flat grid that the flat path and the compiled loops index
    dispatch   the compiled loops (dconv._flatconv): where they run (COMPILED_RULES), and wrappers
    threads    the batch cut into slices, each on a thread of its own with a single-threaded BLAS
    memory     backward_working_set: the bound on what one backward_kernel call allocates
    stats      the per-sample statistics (GradientStats): |g_i|^2, sum_i dW_i^2, sum_i db_i^2
    sketch     per-sample inner products <G_i, Q_j> and sketches P_in G_i P_out^T (ProductSink), projections

The backward pass is GEMMs plus data movement. :func:`backward_kernel` takes,
per layer: two GEMMs for a 1x1 kernel at stride 1 with no padding
(:func:`~dconv.kernel.strided.backward_pointwise`); the flat path for other
stride-1 layers (:func:`~dconv.kernel.flat.backward_flat`), or im2col when W or
dW holds NaN or inf; im2col for other strides
(:func:`~dconv.kernel.strided.backward_im2col`). db is dZ summed over m, n_H,
n_W in float64 (:func:`bias_grad`). With ``stats=True`` every path also gives
the per-sample statistics (:mod:`dconv.kernel.stats`), dW and db keeping their
bits; with ``dA_prev=False`` the input-gradient half is skipped. With ``queries`` or
``projections``, the per-sample inner products and sketches (:mod:`dconv.kernel.sketch`)
come beside them, dW, db, dA_prev and the statistics again keeping their bits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dconv.errors import InputError
from dconv.kernel import dispatch
from dconv.kernel.flat import backward_flat
from dconv.kernel.layout import pad_input
from dconv.kernel.memory import backward_working_set
from dconv.kernel.sketch import ProductSink, Projections, parse_products
from dconv.kernel.stats import GradientStats, gradient_stats, new_weight_stats
from dconv.kernel.strided import backward_im2col, backward_pointwise, im2col, is_pointwise
from dconv.kernel.threads import backward_threads, batch_slices, blas_threads, single_threaded
from dconv.params import (
    ConvGeometry,
    ConvParams,
    backward_geometry,
    check_float_dtype,
    forward_geometry,
    result_dtype,
)

__all__ = [
    "GradientStats",
    "Gradients",
    "GradientsWithProducts",
    "GradientsWithStats",
    "Projections",
    "as_float_array",
    "backward_kernel",
    "backward_working_set",
    "conv2d_backward",
    "conv2d_forward",
]


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


class GradientsWithStats(NamedTuple):
    """:class:`Gradients` and the per-sample statistics of the same batch: what ``stats=True`` returns.

    Attributes
    ----------
    dA_prev : ndarray, shape (m, H, W, C_prev), or None when dA_prev was skipped
    dW : ndarray, shape (fh, fw, C_prev, C)
    db : ndarray, shape (1, 1, 1, C)
    stats : GradientStats
        ``sample_grad_norm2`` (m,), ``dW_sq`` (fh, fw, C_prev, C), ``db_sq`` (1, 1, 1, C), float64.
    """

    dA_prev: np.ndarray | None
    dW: np.ndarray
    db: np.ndarray
    stats: GradientStats


class GradientsWithProducts(NamedTuple):
    """What ``queries`` or ``projections`` make :func:`backward_kernel` return (:mod:`dconv.kernel.sketch`).

    Attributes
    ----------
    dA_prev : ndarray, shape (m, H, W, C_prev), or None when dA_prev was skipped
    dW : ndarray, shape (fh, fw, C_prev, C)
    db : ndarray, shape (1, 1, 1, C)
    stats : GradientStats, or None without ``stats``
    sample_dot : ndarray, float64, shape (m, n_q), or None without ``queries``
        ``<G_i, Q_j>``.
    sketch : ndarray, float64, shape (m, k_in, k_out), or None without ``projections``
        ``P_in @ G_i @ P_out.T``.
    """

    dA_prev: np.ndarray | None
    dW: np.ndarray
    db: np.ndarray
    stats: GradientStats | None
    sample_dot: np.ndarray | None
    sketch: np.ndarray | None


def as_float_array(name: str, value: Any) -> np.ndarray:
    """``np.asarray(value)``, refusing anything but float32/float64 with InputDtypeError."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        array = np.asarray(value)
    check_float_dtype(name, array.dtype)
    return array


def bias_grad(dZ: np.ndarray) -> np.ndarray:
    """db in float64, shape (C,): dZ (m, n_H, n_W, C) summed over m, n_H, n_W with float64 accumulation.

    float64 dZ goes through BLAS (a GEMV with a ones vector, the fastest sum
    here); float32 dZ is summed in float64 (by the compiled loop, or NumPy),
    because a float32 BLAS sum loses digits when the terms cancel.
    """
    rows = dZ.reshape(-1, dZ.shape[3])
    if dZ.dtype == np.float64:
        return np.ones(rows.shape[0]) @ rows                                    # "m,mc->c"
    if dispatch.compiled_level() is not None:
        return dispatch.column_sums_compiled(rows)
    return rows.sum(axis=0, dtype=np.float64)


def _backward_one(
    dZ: np.ndarray, A_prev: np.ndarray, W: np.ndarray, geometry: ConvGeometry, out=None, stats: bool = False,
    input_grad: bool = True, products: tuple | None = None, bias: bool = True,
):
    """``(dA_prev, dW, db, stats, products)`` of one batch on the calling thread; db in float64, shape (C,),
    and dW in float64 where the compiled loop summed it.

    dA_prev is ``out`` when given (C-contiguous, shaped like A_prev): the compiled loops write it there;
    None without ``input_grad``. ``stats`` is a :class:`GradientStats` with ``stats=True``, else None.
    ``products``: ``(queries, projections)`` from :func:`~dconv.kernel.sketch.parse_products`, whose
    :class:`~dconv.kernel.sketch.SampleProducts` come back as ``products`` (else None). Where they need
    each ``dW_i``, the statistics' machinery runs to hand it over, whether or not ``stats`` asks for them.
    """
    sink = None if products is None else ProductSink(*products, dZ.shape[0], geometry, W.shape)
    feed = sink if sink is not None and sink.needs_samples else None
    squares = stats or feed is not None               # the statistics' machinery hands each dW_i to the sink
    weight_stats = new_weight_stats(dZ.shape[0], W.shape, feed) if squares else None
    if is_pointwise(geometry):
        result = backward_pointwise(dZ, A_prev, W, weight_stats, input_grad)
    elif geometry.stride == (1, 1):
        result = backward_flat(dZ, A_prev, W, geometry, out, weight_stats, input_grad)  # None: non-finite values
    else:
        result = None
    if result is None:
        weight_stats = new_weight_stats(dZ.shape[0], W.shape, feed) if squares else None   # the flat path may have begun it
        result = backward_im2col(dZ, A_prev, W, geometry, out, weight_stats, input_grad)
    dA_prev, dW = result
    if out is not None and dA_prev is not None and dA_prev is not out:
        out[...] = dA_prev
        dA_prev = out
    sample_stats = gradient_stats(weight_stats, dZ, bias) if stats else None
    return dA_prev, dW, bias_grad(dZ), sample_stats, (sink.finish(A_prev, dZ) if sink is not None else None)


def backward_kernel(
    dZ: np.ndarray,
    A_prev: np.ndarray,
    W: np.ndarray,
    geometry: ConvGeometry,
    threads: int = 1,
    float64_sums: bool = False,
    *,
    stats: bool = False,
    dA_prev: bool = True,
    queries: np.ndarray | None = None,
    projections: Projections | tuple | None = None,
    bias: bool = True,
) -> Gradients | GradientsWithStats | GradientsWithProducts:
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
        For layers whose loops run on one thread
        (:func:`~dconv.kernel.threads.single_threaded`: the compiled loops,
        and the per-sample GEMMs of stride 1), cut the batch into up to this
        many slices (:func:`~dconv.kernel.threads.batch_slices`) and run them
        in parallel, each with a single-threaded BLAS. Other layers run larger
        GEMMs, which BLAS threads itself, and are not split. With 1,
        everything runs on the calling thread.
    float64_sums : bool
        Return ``dW`` and ``db`` as the float64 sums they were accumulated in
        (the compiled dW loop, db, the slices' total), not rounded to the
        dtype of the inputs. The graph layer adds the chunks' partials in
        float64 this way.
    stats : bool
        Also compute the per-sample statistics (:class:`GradientStats`,
        :mod:`dconv.kernel.stats`) and return a :class:`GradientsWithStats`.
        ``dW`` and ``db`` are the same bit for bit with or without them.
    dA_prev : bool
        False: skip the input gradient; ``dA_prev`` is None, ``dW`` and ``db``
        are the same bit for bit.
    queries : array_like, shape (n_q, K + 1, C), optional
        ``Q_j``, ``K = fh * fw * C_prev``: rows ``(kh, kw, c_prev)`` of a weight
        gradient, then a bias gradient (:func:`dconv.kernel.sketch.stack_queries`).
        Also return ``sample_dot[i, j] = <G_i, Q_j>`` (m, n_q), float64.
    projections : Projections or (P_in, P_out), optional
        ``P_in`` (k_in, K + 1), ``P_out`` (k_out, C): also return
        ``sketch[i] = P_in @ G_i @ P_out.T`` (m, k_in, k_out), float64.
        With either, the result is a :class:`GradientsWithProducts`; ``dA_prev``,
        ``dW``, ``db`` and the statistics are the same bit for bit as without.
    bias : bool
        The layer has a bias. False: the statistics take ``g_i = dW_i`` (``db_sq`` is zero);
        ``db`` is returned all the same.

    Returns
    -------
    Gradients, GradientsWithStats with ``stats``, or GradientsWithProducts with ``queries`` or ``projections``
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
    wanted = queries is not None or projections is not None
    options = {} if not stats and dA_prev else {"stats": bool(stats), "input_grad": bool(dA_prev)}
    if wanted:
        options["products"] = parse_products(queries, projections, W.shape)
    if not bias:
        options["bias"] = False
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate silently, as IEEE says
        if len(slices) == 1:
            dA, dW, db, sample_stats, products = _backward_one(dZ, A_prev, W, geometry, **options)
        else:
            dA, dW, db, sample_stats, products = backward_threads(_backward_one, dZ, A_prev, W, geometry, slices, **options)
    sums = np.float64 if float64_sums else dZ.dtype
    grads = Gradients(dA, dW.astype(sums, copy=False), db.astype(sums, copy=False).reshape(1, 1, 1, c_out))
    if wanted:
        return GradientsWithProducts(*grads, sample_stats, *products)
    return GradientsWithStats(*grads, sample_stats) if stats else grads


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
    stats: bool = False,
    queries: Any = None,
    projections: Any = None,
) -> Gradients | GradientsWithStats | GradientsWithProducts:
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
    stats : bool
        Also return the per-sample gradient statistics, with ``g_i`` the
        gradient ``(dW_i, db_i)`` from sample ``i`` alone (per-example
        gradients when dZ comes from a summed loss and nothing couples the
        samples in the forward pass): a :class:`GradientStats` of
        ``sample_grad_norm2`` (m,) ``= |dW_i|^2 + |db_i|^2``, ``dW_sq``
        (fh, fw, C_prev, C) ``= sum_i dW_i * dW_i`` and ``db_sq`` (1, 1, 1, C)
        ``= sum_i db_i * db_i``, all float64. dA_prev, dW and db do not change.
        With dZ from a loss averaged over ``M`` samples, each statistic is
        ``1 / M**2`` times that of the per-example gradients.
    queries, projections : optional
        Per-sample inner products ``<G_i, Q_j>`` and sketches ``P_in G_i P_out^T``
        of ``G_i = [dW_i.reshape(K, C); db_i]``, as for :func:`backward_kernel`
        (:mod:`dconv.kernel.sketch`).

    Returns
    -------
    Gradients
        ``(dA_prev, dW, db)`` with shapes ``(m, H, W, C_prev)``,
        ``(fh, fw, C_prev, C)`` and ``(1, 1, 1, C)``. All three have the
        promoted dtype of the inputs: float32 if every input is float32,
        float64 otherwise. With ``stats=True``, a :class:`GradientsWithStats`:
        ``(dA_prev, dW, db, stats)``. With ``queries`` or ``projections``, a
        :class:`GradientsWithProducts`: ``(dA_prev, dW, db, stats, sample_dot, sketch)``.

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
    if not isinstance(stats, (bool, np.bool_)):
        raise InputError(f"stats must be True or False; got {stats!r} instead.")
    return backward_kernel(
        dZ.astype(dtype, copy=False),
        A_prev.astype(dtype, copy=False),
        W.astype(dtype, copy=False),
        geometry,
        threads=int(threads),
        stats=bool(stats),
        queries=queries,
        projections=projections,
    )

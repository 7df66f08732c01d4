"""Per-sample gradient inner products and sketches: what each sample's own gradient says against fixed matrices.

For one layer, sample ``i``'s gradient is the matrix ``G_i`` (K + 1, C), ``K = fh * fw * C_prev``::

    G_i = [ dW_i.reshape(K, C) ]        dW_i = cols_i.T @ dZ_i      cols_i  (L, K): im2col rows of sample i
          [ db_i               ]        db_i = 1.T @ dZ_i           dZ_i    (L, C), L = n_H * n_W

:func:`dconv.kernel.backward_kernel` returns, beside dA_prev, dW and db (whose bits do not change)::

    sample_dot[i, j] = <G_i, Q_j>              (m, n_q)          queries Q (n_q, K + 1, C)
    sketch[i]        = P_in @ G_i @ P_out.T    (m, k_in, k_out)  projections P_in (k_in, K + 1), P_out (k_out, C)

both float64. Two ways to a sketch:

* ``"gram"``: form ``G_i`` and multiply, ``(dW_i @ P_out.T)`` then ``P_in[:, :K] @`` that: ``2 K C k_out +
  2 k_in K k_out`` flops per sample once ``dW_i`` is there, ``2 L K C`` more to form it. The statistics paths
  form ``dW_i`` anyway (:mod:`dconv.kernel.stats`): the compiled dW loop leaves it in a buffer, the NumPy
  paths hold it in their per-sample GEMMs. Each block of ``dW_i`` goes to a :class:`ProductSink`.
* ``"kronecker"``: never form ``G_i``. ``P_in[:, :K] cols_i.T dZ_i P_out.T = U_i.T V_i`` with
  ``U_i = cols_i @ P_in[:, :K].T`` (L, k_in) and ``V_i = dZ_i @ P_out.T`` (L, k_out):
  ``2 L (K k_in + C k_out + k_in k_out)`` flops per sample, and one im2col copy of a few samples at a time.

:func:`sketch_route` picks by shapes alone (never by a timing, so the bits never depend on one): Kronecker when
its flops are fewer than the gram route's, counting ``dW_i`` as formed for the sketch (``2 L K C``). On the
benchmark layers (k_in = k_out = 32), in millions of multiply-adds per sample, that gives gram for
32x32x16->32 3x3 (L = 1024: Kronecker 6.8, gram 5.0 of which dW_i is 4.7), Kronecker for 16x16x64->128 3x3
stride 2 (1.5 against 7.7) and 8x8x128->128 1x1 (0.59 against 1.7). The timings agree
(``benchmarks/bench_sketch.py``, float32, m = 256, one thread, AMD EPYC Zen 4 at the avx512 level, medians
of 21 interleaved rounds, ms for the chunk with ``stats=True``: 74, 108 and 28 alone; with the gram sketch
80, 147 and 39; with the Kronecker sketch 145, 124 and 36).
The inner products always take the gram route: the trace ``<cols_i.T dZ_i, Q_j>`` costs ``2 L K C`` per query.
``dW_i . Q_j`` costs ``2 K C`` per query, and reading ``Q`` (``8 n_q K C`` bytes: 9.4 MB for 16 queries of the
stride-2 layer). A GEMM per block of ``BLOCK_BYTES`` reads ``Q`` from L3 once per sample on that layer (its
``dW_i`` is 0.6 MB), bound by the cache's bandwidth; OpenBLAS runs a block of a few samples (M = 4-28, N = 16)
no faster, and a buffer of several samples' ``dW_i`` leaves L2. Where the compiled loops run, the products come
from ``_flatconv.query_dots`` instead: a span of 512 values of every query at a time (64 KB for 16 queries,
held in L1/L2 while a block's samples pass over it), vectorised over the values, so ``Q`` is read once per block.
When the compiled dW loop feeds them and no gram-route sketch needs whole ``dW_i`` (:attr:`ProductSink.dots_in_loop`),
it runs ``_flatconv.weight_grad_dots``: tap by tap over a block of :data:`QUERY_BLOCK_SAMPLES` samples, each
tap's sums of the block (1 MB there) go to ``query_dots`` while in L2, with dW and the statistics' bits unchanged
(every element gets the same additions in the same order). Else :meth:`ProductSink.add` runs ``query_dots``
on the blocks it is given. Their sums are float64 in another order than the GEMM's (lane ``k mod 8`` of each
sum takes the values ``k`` of a span in order, the spans' sums are added in order, then the 8 lanes in a fixed
tree): the same bits at every level with FMA and any block of samples, within float64 rounding of the GEMM's
(the baseline level rounds each product); ``weight_grad_dots`` starts a span at each tap, so its bits may differ
from ``query_dots``' on whole rows (queries beside a gram-route sketch).

Precision. ``dW_i`` is float64 where the compiled loop summed it, and rounded to the input dtype where a
NumPy GEMM did (:mod:`dconv.kernel.stats`). The gram route converts each block of ``dW_i`` to float64 and runs
float64 GEMMs (or ``query_dots``) against float64 copies of ``Q`` and ``P``: for float64 inputs the products are
exact to float64 rounding; for float32 inputs their error is that of ``dW_i`` carried through, at most
``gamma_n * <|A_i|.T |dZ_i|, |Q_j|>`` with ``n`` the pixels of one padded sample plus one,
``gamma_n = n u / (1 - n u)``, ``u = 2**-24`` (the bound of ``tests/kernel/test_kernel_stats.py``), plus
float64 rounding. The Kronecker route runs ``U`` and ``V`` as GEMMs in the input dtype (float32 GEMMs, with
``P`` rounded to float32, for float32 inputs) and ``U_i.T V_i`` in float64: error at most about
``(gamma_(K+1) + gamma_(C+1)) * |P_in| |G|_i |P_out|.T`` with ``|G|_i = [|cols_i|.T |dZ_i|; 1.T |dZ_i|]``.
``db_i`` is summed in float64 (:func:`dconv.kernel.stats.sample_bias_grads`) and its terms, ``db_i @ Q_j[K]``
and ``P_in[:, K] (db_i @ P_out.T)``, are float64 on both routes.

Memory: beyond the outputs, each route holds at most :data:`~dconv.kernel.stats.BLOCK_BYTES` of per-sample
products at a time (or one sample's, if larger) per buffer: a block of ``dW_i``, its float64 copy and
``dW_i @ P_out.T``; or a block's padded images, im2col rows, ``U`` and ``V``; or, where the compiled loop
computes the inner products itself, one tap of each of :data:`QUERY_BLOCK_SAMPLES` samples' ``dW_i``.
:func:`products_working_set` bounds the whole.

Projections: :func:`gaussian_projections` (JL: ``E <sketch_i, sketch_j> = <G_i, G_j>``) and
:func:`orthogonal_projections` (rows of a Haar orthogonal matrix: with ``k_in = K + 1`` and ``k_out = C``,
``<sketch_i, sketch_j> = <G_i, G_j>`` up to rounding). Both draw from
``np.random.Generator(np.random.PCG64(seed))``, ``P_in`` first, in float64, so the matrices are the same on
every machine and NumPy version that keeps PCG64's stream and ``standard_normal``'s ziggurat (NumPy >= 1.17).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dconv.errors import InputError
from dconv.kernel import dispatch
from dconv.kernel.layout import pad_input
from dconv.kernel.stats import BLOCK_BYTES, sample_bias_grads
from dconv.kernel.strided import im2col, is_pointwise
from dconv.params import ConvGeometry

QUERY_BLOCK_SAMPLES = 16
"""Samples per block of the compiled dW loop that computes the inner products itself (:attr:`ProductSink.dots_in_loop`),
at least: each block is one pass over ``Q``, and holds one tap of each sample's ``dW_i`` (16 samples of the stride-2
benchmark layer: 1 MB). On that layer (16 queries, two processes at once on the 2-core Zen 4, as a job's two
workers run): a chunk with queries took 1.33-1.45x one with ``stats=True`` alone at 16 samples per block,
1.41-1.47x at 8, 1.55x at 32, against 1.57-1.63x with the whole ``dW_i`` of 4 samples in a buffer and 1.65-1.69x
with a GEMV per sample; callgrind (avx2 level, 1 MB L2 simulated) counted 12.8 million L2 misses at 16 against
25.0 million with the buffer of 4."""

ROUTES = ("auto", "gram", "kronecker")
"""How a sketch may be computed: by :func:`sketch_route` (``auto``), or forced (tests, benchmarks)."""


class Projections(NamedTuple):
    """The two sides of a per-sample sketch ``P_in @ G_i @ P_out.T``.

    Attributes
    ----------
    p_in : ndarray, shape (k_in, K + 1)
        Columns in the rows' order of ``G_i``: ``(kh, kw, c_prev)``, then the bias row.
    p_out : ndarray, shape (k_out, C)
    route : str
        One of :data:`ROUTES`; ``"auto"``: :func:`sketch_route`.
    """

    p_in: np.ndarray
    p_out: np.ndarray
    route: str = "auto"


class SampleProducts(NamedTuple):
    """What :class:`ProductSink` returns for one batch.

    Attributes
    ----------
    sample_dot : ndarray, float64, shape (m, n_q), or None without queries
    sketch : ndarray, float64, shape (m, k_in, k_out), or None without projections
    """

    sample_dot: np.ndarray | None
    sketch: np.ndarray | None


def stack_queries(dW_q: np.ndarray, db_q: np.ndarray) -> np.ndarray:
    """Query gradients as the matrices ``Q_j`` of :mod:`dconv.kernel.sketch`.

    Parameters
    ----------
    dW_q : array_like, shape (n_q, fh, fw, C_prev, C)
    db_q : array_like, shape (n_q, C)

    Returns
    -------
    ndarray, float64, shape (n_q, fh * fw * C_prev + 1, C)
    """
    dW_q, db_q = np.asarray(dW_q, dtype=np.float64), np.asarray(db_q, dtype=np.float64)
    if dW_q.ndim != 5 or db_q.shape != (dW_q.shape[0], dW_q.shape[4]):
        raise InputError(
            f"dW_q and db_q must have shapes (n_q, fh, fw, C_prev, C) and (n_q, C); got {dW_q.shape} and {db_q.shape} instead."
        )
    return np.concatenate([dW_q.reshape(dW_q.shape[0], -1, dW_q.shape[4]), db_q[:, None, :]], axis=1)


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def gaussian_projections(k_in: int, k_out: int, K1: int, C: int, seed: int, dtype=np.float64) -> Projections:
    """Gaussian projections with independent N(0, 1/k) entries, so that ``E[P.T @ P] = I`` on each side.

    Then ``E <sketch_i, sketch_j> = <G_i, G_j>`` (Frobenius). Drawn in float64 from
    ``np.random.Generator(np.random.PCG64(seed))``, ``P_in`` first, and then cast to ``dtype``.

    Parameters
    ----------
    k_in, k_out : int
        Rows of ``P_in`` and ``P_out``.
    K1, C : int
        ``fh * fw * C_prev + 1`` and ``C`` of the layer.
    seed : int

    Returns
    -------
    Projections
        ``p_in`` (k_in, K1), ``p_out`` (k_out, C).
    """
    _check_sizes(k_in, k_out, K1, C)
    rng = _rng(seed)
    p_in = rng.standard_normal((k_in, K1)) / np.sqrt(k_in)
    p_out = rng.standard_normal((k_out, C)) / np.sqrt(k_out)
    return Projections(p_in.astype(dtype), p_out.astype(dtype))


def orthogonal_projections(k_in: int, k_out: int, K1: int, C: int, seed: int, dtype=np.float64) -> Projections:
    """The first rows of Haar-random orthogonal matrices, scaled by ``sqrt(n / k)`` so that ``E[P.T @ P] = I``.

    Each side is the QR of an ``n x n`` standard Gaussian (``n`` = K1 or C) with the signs of ``R``'s diagonal
    moved into ``Q`` (which makes ``Q`` Haar-distributed), its first ``k`` rows kept. With ``k_in = K1`` and
    ``k_out = C`` both are orthogonal and ``<sketch_i, sketch_j> = <G_i, G_j>`` up to rounding. Drawn from
    ``np.random.Generator(np.random.PCG64(seed))``, ``P_in``'s Gaussian first; ``np.linalg.qr`` (LAPACK) may
    round differently from one BLAS to another.

    Parameters
    ----------
    k_in, k_out : int
        Rows kept, at most ``K1`` and ``C``.
    K1, C : int
        ``fh * fw * C_prev + 1`` and ``C`` of the layer.
    seed : int

    Returns
    -------
    Projections
        ``p_in`` (k_in, K1), ``p_out`` (k_out, C).
    """
    _check_sizes(k_in, k_out, K1, C)
    if k_in > K1 or k_out > C:
        raise InputError(f"k_in and k_out must be at most K1 = {K1} and C = {C}; got {k_in} and {k_out} instead.")
    rng = _rng(seed)
    sides = []
    for k, n in ((k_in, K1), (k_out, C)):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        q *= np.where(np.diag(r) < 0, -1.0, 1.0)                       # column j times sign(r_jj)
        sides.append((q[:k] * np.sqrt(n / k)).astype(dtype))
    return Projections(*sides)


def _check_sizes(k_in: int, k_out: int, K1: int, C: int) -> None:
    for name, value in (("k_in", k_in), ("k_out", k_out), ("K1", K1), ("C", C)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive int; got {value!r} instead.")


def parse_products(queries, projections, w_shape: tuple[int, int, int, int]):
    """``(queries, projections)`` checked against weights of shape ``w_shape`` (fh, fw, C_prev, C).

    Returns
    -------
    queries : ndarray, float64, shape (n_q, K + 1, C), or None
    projections : Projections, or None
    """
    fh, fw, c_prev, c_out = w_shape
    k1 = fh * fw * c_prev + 1
    if queries is not None:
        queries = np.asarray(queries, dtype=np.float64)
        if queries.ndim != 3 or queries.shape[1:] != (k1, c_out):
            raise InputError(f"queries must have shape (n_q, {k1}, {c_out}) for W {w_shape}; got {queries.shape} instead.")
    if projections is not None:
        p_in, p_out, *route = projections
        route = route[0] if route else "auto"
        p_in, p_out = np.asarray(p_in), np.asarray(p_out)
        if p_in.ndim != 2 or p_out.ndim != 2 or p_in.shape[1] != k1 or p_out.shape[1] != c_out:
            raise InputError(
                f"projections must have shapes (k_in, {k1}) and (k_out, {c_out}) for W {w_shape}; "
                f"got {p_in.shape} and {p_out.shape} instead."
            )
        if route not in ROUTES:
            raise InputError(f"route must be one of {ROUTES}; got {route!r} instead.")
        projections = Projections(p_in, p_out, route)
    return queries, projections


def sketch_route(geometry: ConvGeometry, w_shape: tuple[int, int, int, int], k_in: int, k_out: int) -> str:
    """``"kronecker"`` or ``"gram"``: the one with fewer flops per sample, from shapes alone.

    Kronecker ``L (K k_in + C k_out + k_in k_out)`` against gram ``K C (L + k_out) + k_in K k_out``, with
    ``L = n_H * n_W``, ``K = fh * fw * C_prev`` (each a multiply-add; see :mod:`dconv.kernel.sketch`).
    """
    fh, fw, c_prev, c_out = w_shape
    n_h, n_w = geometry.out_hw
    pixels, k = n_h * n_w, fh * fw * c_prev
    kronecker = pixels * (k * k_in + c_out * k_out + k_in * k_out)
    gram = k * c_out * (pixels + k_out) + k_in * k * k_out
    return "kronecker" if kronecker < gram else "gram"


class ProductSink:
    """The inner products and sketch of one batch (or slice), filled block by block while the backward pass runs.

    A path hands each block of ``dW_i`` to :meth:`add` (through :class:`dconv.kernel.stats.WeightStats`);
    :meth:`finish` adds the bias rows' terms and, on the Kronecker route, the whole sketch. :meth:`add`
    overwrites its rows, so a path that starts again (the flat path's fallback to im2col) leaves no trace.
    One object serves one call: nothing outlives it.

    Parameters
    ----------
    queries : ndarray, float64, shape (n_q, K + 1, C), or None
    projections : Projections, or None
        From :func:`parse_products`.
    m : int
        Samples in the batch.
    geometry : ConvGeometry
    w_shape : tuple of int
        ``(fh, fw, C_prev, C)``.
    """

    def __init__(self, queries, projections, m: int, geometry: ConvGeometry, w_shape):
        fh, fw, c_prev, c_out = w_shape
        self.k, self.c_out, self.geometry = fh * fw * c_prev, c_out, geometry
        self.sample_dot = self.sketch = None
        self.route = None
        self.compiled_dots = queries is not None and dispatch.use_compiled_query_dots()
        if queries is not None:
            self.queries = np.ascontiguousarray(queries)                             # no copy from parse_products
            self.weight_queries = queries[:, :-1].reshape(queries.shape[0], -1).T     # (K * C, n_q), a view
            self.bias_queries = queries[:, -1].T                                     # (C, n_q)
            self.sample_dot = np.zeros((m, queries.shape[0]))
        if projections is not None:
            p_in, p_out, route = projections
            self.route = sketch_route(geometry, w_shape, p_in.shape[0], p_out.shape[0]) if route == "auto" else route
            self.p_in, self.p_out = p_in, p_out
            self.p_in_w64, self.p_out64 = p_in[:, :-1].astype(np.float64), p_out.astype(np.float64)   # weight columns of P_in
            self.sketch = np.zeros((m, p_in.shape[0], p_out.shape[0]))

    @property
    def needs_samples(self) -> bool:
        """Whether :meth:`add` wants each sample's ``dW_i`` (inner products, or a gram-route sketch)."""
        return self.sample_dot is not None or self.route == "gram"

    @property
    def dots_in_loop(self) -> bool:
        """Whether the compiled dW loop computes the inner products itself, a tap at a time
        (``_flatconv.weight_grad_dots``), and hands :meth:`add` nothing: queries, and no gram-route sketch."""
        return self.compiled_dots and self.route != "gram"

    def block_samples(self, per_sample: int) -> int:
        """How many samples (``dW_i`` of ``per_sample`` values each) the compiled dW loop takes at once:
        :data:`~dconv.kernel.stats.BLOCK_BYTES` of ``dW_i``, or one sample's; at least :data:`QUERY_BLOCK_SAMPLES`
        where it computes the inner products itself (:attr:`dots_in_loop`), holding one tap of each."""
        step = max(1, BLOCK_BYTES // (8 * per_sample))
        return max(step, QUERY_BLOCK_SAMPLES) if self.dots_in_loop else step

    def add(self, rows: np.ndarray, first: int) -> None:
        """Take ``rows[j] = dW_(first + j)`` (g, K * C), in the order of ``W.reshape(K, C)``: write their
        inner products and, on the gram route, their sketches (the weight rows' part)."""
        if not self.needs_samples:
            return
        k, c_out = self.k, self.c_out
        k_out = 0 if self.sketch is None else self.sketch.shape[2]
        dots = self.sample_dot is not None
        if dots and self.compiled_dots and rows.dtype == np.float64 and rows.flags.c_contiguous:
            dispatch.query_dots_compiled(rows, self.queries, self.sample_dot[first : first + rows.shape[0]])
            dots = False
        if not dots and self.route != "gram":
            return
        step = max(1, BLOCK_BYTES // (8 * k * max(c_out if dots else 0, k_out)))
        for lo in range(0, rows.shape[0], step):
            block = rows[lo : lo + step].astype(np.float64, copy=False)           # exact for float32
            at = slice(first + lo, first + lo + block.shape[0])
            if dots and self.compiled_dots:
                dispatch.query_dots_compiled(block, self.queries, self.sample_dot[at])
            elif dots:
                self.sample_dot[at] = block @ self.weight_queries                 # "gn,nq->gq", n = K * C
            if self.route == "gram":
                right = (block.reshape(-1, c_out) @ self.p_out64.T).reshape(block.shape[0], k, k_out)  # "gkc,oc->gko"
                np.matmul(self.p_in_w64, right, out=self.sketch[at])                # "ik,gko->gio"

    def finish(self, A_prev: np.ndarray, dZ: np.ndarray) -> SampleProducts:
        """The bias rows' terms, and the Kronecker route's sketch, added: the finished :class:`SampleProducts`.

        Parameters
        ----------
        A_prev : ndarray, shape (m, H, W, C_prev)
        dZ : ndarray, shape (m, n_H, n_W, C)
        """
        db_each = sample_bias_grads(dZ)                                            # (m, C), float64
        if self.sample_dot is not None:
            self.sample_dot += db_each @ self.bias_queries                         # "mc,cq->mq"
        if self.sketch is not None:
            if self.route == "kronecker":
                kronecker_sketch(A_prev, dZ, self.geometry, self.p_in[:, :-1], self.p_out, self.sketch)
            bias_part = db_each @ self.p_out64.T                                   # "mc,oc->mo"
            for row, weight in enumerate(self.p_in[:, -1].astype(np.float64)):   # "i,mo->mio", no (m, k_in, k_out) temporary
                self.sketch[:, row] += weight * bias_part
        return SampleProducts(self.sample_dot, self.sketch)


def kronecker_sketch(
    A_prev: np.ndarray, dZ: np.ndarray, geometry: ConvGeometry, p_in_w: np.ndarray, p_out: np.ndarray, out: np.ndarray
) -> None:
    """``out[i] = P_in_w @ dW_i @ P_out.T = U_i.T @ V_i`` without forming ``dW_i``, a few samples at a time.

    ``U_i = cols_i @ P_in_w.T`` and ``V_i = dZ_i @ P_out.T`` are GEMMs in the dtype of the inputs over a
    block of samples (one GEMM each); ``U_i.T @ V_i`` is float64.

    Parameters
    ----------
    A_prev : ndarray, shape (m, H, W, C_prev)
    dZ : ndarray, shape (m, n_H, n_W, C)
    p_in_w : ndarray, shape (k_in, K)
        ``P_in`` without its bias column.
    p_out : ndarray, shape (k_out, C)
    out : ndarray, float64, shape (m, k_in, k_out), written
    """
    m, n_h, n_w, c_out = dZ.shape
    pixels, (k_in, k), k_out = n_h * n_w, p_in_w.shape, p_out.shape[0]
    dtype = dZ.dtype
    p_in_w, p_out = p_in_w.astype(dtype, copy=False), p_out.astype(dtype, copy=False)
    step = max(1, BLOCK_BYTES // kronecker_sample_bytes(geometry, A_prev.shape[3], k, k_in, k_out, dtype.itemsize))
    pointwise = is_pointwise(geometry)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        if pointwise:
            cols = A_prev[lo:hi].reshape(-1, k)                                    # (g * L, K), no copy
        else:
            cols = im2col(pad_input(A_prev[lo:hi], geometry.pads), geometry)      # (g * L, K)
        U = (cols @ p_in_w.T).reshape(hi - lo, pixels, k_in)                       # "lk,ik->li"
        V = (dZ[lo:hi].reshape(-1, c_out) @ p_out.T).reshape(hi - lo, pixels, k_out)  # "lc,oc->lo"
        np.matmul(U.transpose(0, 2, 1).astype(np.float64), V.astype(np.float64), out=out[lo:hi])  # "gli,glo->gio"


def kronecker_sample_bytes(geometry: ConvGeometry, c_prev: int, k: int, k_in: int, k_out: int, itemsize: int) -> int:
    """What one sample takes in a block of :func:`kronecker_sketch`: its padded image, im2col rows, ``U``
    and ``V``, and their float64 copies."""
    (n_h, n_w), (rows, cols) = geometry.out_hw, geometry.padded_hw
    pixels = n_h * n_w
    return itemsize * (rows * cols * c_prev + pixels * (k + k_in + k_out)) + 8 * pixels * (k_in + k_out)


def products_working_set(
    m: int, geometry: ConvGeometry, c_prev: int, c_out: int, itemsize: int, n_q: int = 0, k_in: int = 0,
    k_out: int = 0, threads: int = 1,
) -> int:
    """Upper bound, in bytes, of what ``queries`` and ``projections`` add to a :func:`dconv.kernel.backward_kernel`
    call: add it to :func:`dconv.kernel.backward_working_set` with ``stats=True`` (the statistics' machinery
    runs whenever the products need each ``dW_i``).

    ``8 * m * (n_q + k_in * k_out)`` for the outputs (twice with ``threads > 1``: the slices' and their
    concatenation), ``8 * m * (C + k_out)`` for each ``db_i`` and its projection; per thread, the float64 and
    input-dtype copies of the projections, and at most four blocks of :data:`~dconv.kernel.stats.BLOCK_BYTES`
    or of one sample's products (the compiled loop's ``dW_i`` buffer, its float64 copy, ``dW_i @ P_out.T``,
    or a Kronecker block, :func:`kronecker_sample_bytes`); with queries, the compiled loop's block of
    :data:`QUERY_BLOCK_SAMPLES` samples (one tap of each one's ``dW_i``, 8 partial sums of each square sum and
    each product).
    """
    fh, fw = geometry.kernel_hw
    k = fh * fw * c_prev
    outputs = 8 * m * (n_q + k_in * k_out) * (2 if threads > 1 else 1) + 8 * m * (c_out + k_out)
    copies = (8 + itemsize) * (k_in * (k + 1) + k_out * c_out)
    sample = max(8 * k * max(c_out, k_out), kronecker_sample_bytes(geometry, c_prev, k, k_in, k_out, itemsize))
    dots = 8 * QUERY_BLOCK_SAMPLES * (k * c_out + 8 * (n_q + 1)) if n_q else 0
    return outputs + threads * (copies + 4 * max(BLOCK_BYTES, sample) + dots)


def concatenate_products(parts: list[SampleProducts]) -> SampleProducts:
    """The products of consecutive slices of a batch as one, in slice order."""
    return SampleProducts(*(
        None if parts[0][field] is None else np.concatenate([part[field] for part in parts])
        for field in range(len(SampleProducts._fields))
    ))

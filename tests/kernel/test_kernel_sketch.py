"""dconv.kernel's per-sample inner products and sketches (``queries=``, ``projections=``).

The truth is dconv's loop oracle (:func:`dconv.reference.conv2d_backward_loops`) on one sample at a
time, in float64: ``G_i = [dW_i.reshape(K, C); db_i]``, then ``<G_i, Q_j>`` and ``P_in G_i P_out^T``
by einsum. Every path is forced in turn (the ``path_level`` fixture of the statistics' tests), and
both sketch routes (gram, Kronecker). Float64 must agree to 1e-10 relative; float32 is held to the
bounds derived in :func:`float32_bounds`.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import dconv
import dconv.kernel.dispatch
import dconv.kernel.threads
from dconv import InputError
from dconv.kernel import GradientsWithProducts, GradientStats, backward_kernel
from dconv.kernel.sketch import (
    Projections,
    gaussian_projections,
    orthogonal_projections,
    sketch_route,
    stack_queries,
)
from dconv.params import ConvParams, backward_geometry
from dconv.reference import conv2d_backward_loops

from _kernel_cases import Case, make_arrays, rel_err
from test_kernel_stats import path_level  # noqa: F401  (the fixture: every path, every SIMD level)

SKETCH_CASES = {
    "s2_pad1": Case((3, 9, 10, 16), (3, 3, 16, 32), stride=2, padding=1),
    "s1_pad1": Case((3, 6, 7, 16), (3, 3, 16, 16), padding=1),
    "dilation2": Case((3, 8, 9, 8), (3, 2, 8, 16), padding=1, dilation=2),
    "narrow_dilation2": Case((2, 8, 9, 2), (3, 2, 2, 3), padding=1, dilation=2),
    "pointwise": Case((3, 5, 4, 16), (1, 1, 16, 16)),
    "linear": Case((3, 1, 6, 24), (1, 1, 24, 16)),                  # a linear layer over 6 tokens
    "grouped": Case((7, 2, 2, 3), (3, 3, 3, 8), padding=1),        # the flat path's groups of samples
}
ROUTES = ["gram", "kronecker"]
N_QUERIES, K_IN, K_OUT = 3, 5, 4


def geometry_of(case: Case):
    return backward_geometry(case.z_shape(), case.a_shape, case.w_shape, ConvParams.parse(**case.kwargs))


@functools.cache
def _per_sample(case: Case, dtype: str, seed: int, absolute: bool) -> np.ndarray:
    a, w, _, dz = (np.asarray(x, np.float64) for x in make_arrays(case, dtype, seed))
    if absolute:
        a, dz = np.abs(a), np.abs(dz)
    k, c_out = int(np.prod(case.w_shape[:3])), case.w_shape[3]
    grads = [conv2d_backward_loops(dz[i : i + 1], a[i : i + 1], w, **case.kwargs) for i in range(a.shape[0])]
    return np.array([np.concatenate([g.dW.reshape(k, c_out), g.db.reshape(1, c_out)]) for g in grads])


def per_sample(case: Case, dtype, seed: int, absolute: bool = False) -> np.ndarray:
    """``G_i`` (m, K + 1, C) by the loop oracle on each sample alone, float64 on the (rounded) inputs;
    with ``absolute``, of ``|A_prev|`` and ``|dZ|`` (the ``|G|_i`` of the error bounds)."""
    case = case._replace(padding=case.padding if not isinstance(case.padding, list) else tuple(case.padding))
    return _per_sample(case, np.dtype(dtype).name, seed, absolute)


def products_of(case: Case, seed: int):
    """Queries (n_q, K + 1, C) and Gaussian projections for ``case``, float64."""
    k1, c_out = int(np.prod(case.w_shape[:3])) + 1, case.w_shape[3]
    queries = np.random.default_rng(seed).standard_normal((N_QUERIES, k1, c_out))
    return queries, gaussian_projections(K_IN, K_OUT, k1, c_out, seed)


def float32_bounds(case: Case, seed: int, queries: np.ndarray, proj: Projections):
    """Elementwise bounds on float32 inputs' ``sample_dot`` and ``sketch`` against their float64 truth.

    Each element of ``dW_i`` is a sum of at most ``n = Hp * Wp + 1`` float32 products (as in
    :func:`test_kernel_stats.float32_bound`), off by at most ``gamma_n |G|_i`` with
    ``|G|_i = |A_i|^T |dZ_i|`` (``db_i`` is summed in float64). The gram route takes each ``dW_i`` to
    float64 and multiplies by float64 ``Q`` and ``P``: ``|err dot_ij| <= gamma_n <|G|_i, |Q_j|>`` and
    ``|err sketch_i| <= gamma_n |P_in| |G|_i |P_out|^T``. The Kronecker route rounds ``P`` to float32
    (``u``) and runs ``U = cols P_in^T`` and ``V = dZ P_out^T`` as float32 GEMMs (``gamma_(K+1)``,
    ``gamma_(C+1)``), then ``U^T V`` in float64: ``|err| <= (gamma_(K+1) + gamma_(C+1) + their product)
    |P_in| |G|_i |P_out|^T``. Both within ``3 gamma_N |P_in| |G|_i |P_out|^T``, ``N = max(n, K + 2, C + 2)``.
    The float64 GEMMs and sums add at most ``gamma64_(K C + C + k_in)`` of the same absolute terms.
    """
    (top, bottom), (left, right) = geometry_of(case).pads
    n = (case.a_shape[1] + top + bottom) * (case.a_shape[2] + left + right) + 1
    k1, c_out = int(np.prod(case.w_shape[:3])) + 1, case.w_shape[3]
    big_n = max(n, k1 + 1, c_out + 2)
    gamma = lambda count, u: count * u / (1 - count * u)  # noqa: E731
    slack = gamma(k1 * c_out + K_IN + c_out, 2.0**-53)
    g_abs = per_sample(case, np.float32, seed, absolute=True)
    dot_abs = np.einsum("ikc,jkc->ij", g_abs, np.abs(queries))
    sketch_abs = np.einsum("ak,ikc,oc->iao", np.abs(proj.p_in), g_abs, np.abs(proj.p_out))
    return (gamma(n, 2.0**-24) + slack) * dot_abs, (3 * gamma(big_n, 2.0**-24) + slack) * sketch_abs


def assert_products_match_oracle(case: Case, dtype, seed: int, route: str, threads: int = 1) -> None:
    a, w, _, dz = make_arrays(case, dtype, seed)
    queries, proj = products_of(case, seed)
    got = backward_kernel(dz, a, w, geometry_of(case), threads=threads, queries=queries,
                          projections=proj._replace(route=route))
    assert type(got) is GradientsWithProducts and got.stats is None
    G = per_sample(case, dtype, seed)
    want_dot = np.einsum("ikc,jkc->ij", G, queries)                                   # <G_i, Q_j>
    want_sketch = np.einsum("ak,ikc,oc->iao", proj.p_in, G, proj.p_out)               # P_in G_i P_out^T
    m = case.a_shape[0]
    assert got.sample_dot.shape == (m, N_QUERIES) and got.sample_dot.dtype == np.float64
    assert got.sketch.shape == (m, K_IN, K_OUT) and got.sketch.dtype == np.float64
    if np.dtype(dtype) == np.float64:
        assert rel_err(got.sample_dot, want_dot) <= 1e-10, rel_err(got.sample_dot, want_dot)
        assert rel_err(got.sketch, want_sketch) <= 1e-10, rel_err(got.sketch, want_sketch)
    else:
        dot_bound, sketch_bound = float32_bounds(case, seed, queries, proj)
        assert (np.abs(got.sample_dot - want_dot) <= dot_bound).all(), float(np.max(np.abs(got.sample_dot - want_dot) - dot_bound))
        assert (np.abs(got.sketch - want_sketch) <= sketch_bound).all(), float(np.max(np.abs(got.sketch - want_sketch) - sketch_bound))


# --- agreement with the per-sample oracle ------------------------------------------------


@pytest.mark.parametrize("case_id", list(SKETCH_CASES))
def test_every_path_matches_the_per_sample_oracle(case_id, path_level):  # noqa: F811
    for dtype in (np.float32, np.float64):
        for route in ROUTES:
            assert_products_match_oracle(SKETCH_CASES[case_id], dtype, seed=4, route=route)


@pytest.mark.parametrize("case_id", ["s2_pad1", "s1_pad1", "pointwise", "grouped"])
def test_threaded_slices_match_the_per_sample_oracle(case_id, path_level, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    for dtype in (np.float32, np.float64):
        for route in ROUTES:
            assert_products_match_oracle(SKETCH_CASES[case_id], dtype, seed=6, route=route, threads=2)


def test_blocks_of_samples_cover_the_batch(path_level, monkeypatch):  # noqa: F811
    """BLOCK_BYTES small enough that every block holds one sample: the compiled loop's blocks, the
    sink's float64 blocks and the Kronecker route's im2col blocks all cut the batch. The compiled loop
    run block by block gives dW and the statistics the bits of one call over the batch."""
    case_ids = ("s2_pad1", "s1_pad1", "pointwise")
    whole = {}
    for case_id in case_ids:
        a, w, _, dz = make_arrays(SKETCH_CASES[case_id], np.float32, 8)
        whole[case_id] = backward_kernel(dz, a, w, geometry_of(SKETCH_CASES[case_id]), 1, True, stats=True)
    monkeypatch.setattr(dconv.kernel.stats, "BLOCK_BYTES", 1)
    monkeypatch.setattr(dconv.kernel.sketch, "BLOCK_BYTES", 1)
    monkeypatch.setattr(dconv.kernel.sketch, "QUERY_BLOCK_SAMPLES", 1)
    for case_id in case_ids:
        for route in ROUTES:
            assert_products_match_oracle(SKETCH_CASES[case_id], np.float64, seed=8, route=route)
        a, w, _, dz = make_arrays(SKETCH_CASES[case_id], np.float32, 8)
        blocked = backward_kernel(dz, a, w, geometry_of(SKETCH_CASES[case_id]), 1, True, stats=True,
                                  queries=products_of(SKETCH_CASES[case_id], 8)[0])
        for name in ("dA_prev", "dW", "db"):
            np.testing.assert_array_equal(getattr(blocked, name), getattr(whole[case_id], name), err_msg=name)
        for name in GradientStats._fields:
            np.testing.assert_array_equal(getattr(blocked.stats, name), getattr(whole[case_id].stats, name), err_msg=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_input_restarts_the_products_on_the_im2col_path():
    """inf in one sample's input sends a stride-1 layer from the flat path to im2col after the flat path
    has fed some products: the im2col path writes every sample's again, and the other samples keep their
    finite values, equal to their products computed alone."""
    case = Case((3, 6, 5, 2), (3, 3, 2, 3), padding=1)
    geometry = geometry_of(case)
    a, w, _, dz = make_arrays(case, np.float64, 2)
    a[1, 2, 2, 1] = np.inf
    queries, proj = products_of(case, 2)
    got = backward_kernel(dz, a, w, geometry, queries=queries, projections=proj._replace(route="gram"))
    assert not np.isfinite(got.sample_dot[1]).all()
    one = geometry_of(case._replace(a_shape=(1, *case.a_shape[1:])))
    for i in (0, 2):
        alone = backward_kernel(dz[i : i + 1], a[i : i + 1], w, one, queries=queries, projections=proj._replace(route="gram"))
        np.testing.assert_allclose(got.sample_dot[i], alone.sample_dot[0], rtol=1e-12)
        np.testing.assert_allclose(got.sketch[i], alone.sketch[0], rtol=1e-12, atol=1e-12 * np.abs(alone.sketch).max())


@pytest.mark.skipif(not dconv.simd_levels(), reason="the compiled helper was not built")
def test_the_compiled_samples_buffer_needs_the_statistics():
    from dconv import _flatconv

    P, dZ, dW, offsets = np.zeros((100, 4)), np.zeros((1, 3, 3, 8)), np.zeros((1, 4, 8)), np.zeros(1, np.intp)
    wargs = (100, 1, 25, 10, 2, 3, 3, 4, 4, 8)
    level = dconv.simd_levels()[0]
    with pytest.raises(ValueError, match="samples needs dW_sq and norm2"):
        _flatconv.weight_grad(level, P, dZ, offsets, *wargs, dW, None, None, np.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="samples must be a native float buffer of at least 32 items"):
        _flatconv.weight_grad(level, P, dZ, offsets, *wargs, dW, np.zeros((1, 4, 8)), np.zeros(1), np.zeros(10))
    samples = np.zeros((1, 4, 8))
    _flatconv.weight_grad(level, P, dZ, offsets, *wargs, dW, np.zeros((1, 4, 8)), np.zeros(1), samples)


@pytest.mark.skipif(not dconv.simd_levels(), reason="the compiled helper was not built")
@pytest.mark.parametrize("g, n, n_q", [(1, 8, 1), (3, 7, 2), (5, 1043, 7), (9, 1048, 16), (4, 3, 13), (0, 16, 3)])
def test_query_dots_match_the_gemm_at_every_level(g, n, n_q):
    """``_flatconv.query_dots`` against the float64 GEMM: rows and queries cut into every block size (rows
    and queries of each level's blocks and their remainders), spans of 512 values and a tail of ``n % 8``,
    queries read in place ``q_stride`` apart. Within float64 rounding of the GEMM at every level; the
    levels with FMA give the same bits (each lane sums the same values in the same order)."""
    from dconv import _flatconv

    rng = np.random.default_rng(n)
    x, queries = rng.standard_normal((g, n)), rng.standard_normal((n_q, n + 5))
    want = x @ queries[:, :n].T
    bound = 4 * n * np.finfo(np.float64).eps * (np.abs(x) @ np.abs(queries[:, :n]).T)
    bits = {}
    for level in dconv.simd_levels():
        got = np.full((g, n_q), np.nan)
        _flatconv.query_dots(level, x, g, n, queries, n + 5, n_q, got)
        assert (np.abs(got - want) <= bound).all(), level
        bits[level] = got
    fma = [level for level in bits if level != "baseline"]
    for level in fma[1:]:
        np.testing.assert_array_equal(bits[level], bits[fma[0]], err_msg=level)
    short = queries[:, :n].copy()                                     # rows n apart, not n + 5
    with pytest.raises(ValueError, match="Q must be a native float buffer"):
        _flatconv.query_dots(dconv.simd_levels()[0], x, g, n, short, n + 5, max(n_q, 2), np.zeros((g, max(n_q, 2))))


@pytest.mark.skipif(not dconv.simd_levels(), reason="the compiled helper was not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_dots_keeps_the_bits_of_weight_grad(dtype):
    """``_flatconv.weight_grad_dots`` (a tap at a time, two tiles per sample) against ``weight_grad`` with each
    sample's dW kept: dW, dW_sq and norm2 bitwise, the products within float64 rounding of the GEMM on the
    kept dW, at every level."""
    from dconv import _flatconv
    from dconv.kernel.layout import flat_grid

    case = Case((5, 34, 18, 16), (3, 3, 16, 16), stride=2, padding=1)           # 17 x 9 pixels: 2 tiles a sample
    geometry = geometry_of(case)
    a, w, _, dz = make_arrays(case, dtype, 3)
    grid = flat_grid(a.shape[0], geometry)
    P = np.ascontiguousarray(np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))).reshape(-1, 16)
    offsets = np.asarray(grid.offsets, dtype=np.intp)
    (sh, sw), (n_h, n_w) = geometry.stride, geometry.out_hw
    args = (P, dz, offsets, P.shape[0], 5, grid.rows * grid.cols, sh * grid.cols, sw, n_h, n_w, 16, 16, 16)
    queries = np.random.default_rng(0).standard_normal((3, 9 * 16 + 1, 16))
    for level in dconv.simd_levels():
        want = [np.zeros((9, 16, 16)), np.zeros((9, 16, 16)), np.zeros(5), np.zeros((5, 9 * 16 * 16))]
        _flatconv.weight_grad(level, *args, *want)
        got = [np.zeros((9, 16, 16)), np.zeros((9, 16, 16)), np.zeros(5), np.full((5, 3), np.nan)]
        _flatconv.weight_grad_dots(level, *args, *got[:3], queries, queries[0].size, 3, got[3])
        for name, x, y in zip(("dW", "dW_sq", "norm2"), got, want):
            np.testing.assert_array_equal(x, y, err_msg=f"{level} {name}")
        weights = queries[:, :-1].reshape(3, -1)
        gemm = want[3] @ weights.T
        bound = 4 * weights.shape[1] * np.finfo(np.float64).eps * (np.abs(want[3]) @ np.abs(weights).T)
        assert (np.abs(got[3] - gemm) <= bound).all(), level
    with pytest.raises(ValueError, match="q_stride 10 is below the 2304 weights"):
        _flatconv.weight_grad_dots(level, *args, *got[:3], queries, 10, 3, got[3])


# --- the bits of everything else -----------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case_id", ["s2_pad1", "s1_pad1", "narrow_dilation2", "pointwise", "grouped"])
def test_gradients_and_stats_keep_their_bits_with_products(case_id, threads, path_level, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = SKETCH_CASES[case_id]._replace(a_shape=(4, *SKETCH_CASES[case_id].a_shape[1:]))
    geometry = geometry_of(case)
    queries, proj = products_of(case, 3)
    for dtype in (np.float32, np.float64):
        a, w, _, dz = make_arrays(case, dtype, 12)
        for stats in (False, True):
            for dA_prev in (True, False):
                plain = backward_kernel(dz, a, w, geometry, threads, True, stats=stats, dA_prev=dA_prev)
                for extra in ({"queries": queries}, {"projections": proj._replace(route="gram")},
                              {"projections": proj._replace(route="kronecker")}):
                    other = backward_kernel(dz, a, w, geometry, threads, True, stats=stats, dA_prev=dA_prev, **extra)
                    assert type(other) is GradientsWithProducts
                    for name in ("dA_prev", "dW", "db"):
                        x, y = getattr(plain, name), getattr(other, name)
                        assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), (name, extra)
                    if stats:
                        for name in GradientStats._fields:
                            np.testing.assert_array_equal(getattr(plain.stats, name), getattr(other.stats, name), err_msg=name)
                    else:
                        assert other.stats is None


def test_without_products_the_return_types_do_not_change():
    case = SKETCH_CASES["s1_pad1"]
    a, w, _, dz = make_arrays(case, np.float64, 1)
    geometry = geometry_of(case)
    assert type(backward_kernel(dz, a, w, geometry)) is dconv.Gradients
    assert type(backward_kernel(dz, a, w, geometry, stats=True)) is dconv.kernel.GradientsWithStats
    got = backward_kernel(dz, a, w, geometry, queries=products_of(case, 1)[0])
    assert got.sketch is None and got.sample_dot.shape == (3, N_QUERIES)


# --- projections ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case_id", ["s2_pad1", "dilation2", "linear"])
def test_full_size_orthogonal_sketches_keep_every_inner_product(case_id, route):
    """With ``k_in = K + 1`` and ``k_out = C``, ``<sketch_i, sketch_j> = <G_i, G_j>`` up to rounding."""
    case = SKETCH_CASES[case_id]
    k1, c_out = int(np.prod(case.w_shape[:3])) + 1, case.w_shape[3]
    proj = orthogonal_projections(k1, c_out, k1, c_out, seed=9)
    np.testing.assert_allclose(proj.p_in @ proj.p_in.T, np.eye(k1), atol=1e-12)
    a, w, _, dz = make_arrays(case, np.float64, 9)
    sketch = backward_kernel(dz, a, w, geometry_of(case), projections=proj._replace(route=route)).sketch
    G = per_sample(case, np.float64, 9)
    got, want = np.einsum("iao,jao->ij", sketch, sketch), np.einsum("ikc,jkc->ij", G, G)
    assert rel_err(got, want) <= 1e-10, rel_err(got, want)


def jl_variance(G_i: np.ndarray, G_j: np.ndarray, k_in: int, k_out: int) -> float:
    """``Var <A G_i B^T, A G_j B^T>`` for independent ``A`` (k_in, n), ``B`` (k_out, C) with N(0, 1/k) entries.

    Given ``A``, with ``H = G_i^T A^T A G_j`` and ``B``'s rows ``b ~ N(0, I / k_out)``, the estimate is
    ``sum_r b_r^T H b_r``: mean ``tr H``, variance ``(tr H^2 + tr H H^T) / k_out``. Over ``A``
    (``W = A^T A``, Isserlis: ``E[W X W] = X + (X^T + tr(X) I) / k_in``), with ``F = G_j G_i^T``,
    ``S_i = G_i G_i^T``, ``S_j = G_j G_j^T``::

        E tr H^2    = tr F^2 + (tr F^T F + (tr F)^2) / k_in
        E tr H H^T  = tr S_j S_i (1 + 1 / k_in) + tr S_i tr S_j / k_in
        Var_A tr H  = (tr F^2 + tr F^T F) / k_in              (tr H = sum over A's rows of a^T F a)

    and ``Var = (E tr H^2 + E tr H H^T) / k_out + Var_A tr H``; ``E = tr F = <G_i, G_j>``.
    """
    F, S_i, S_j = G_j @ G_i.T, G_i @ G_i.T, G_j @ G_j.T
    tr_f2, tr_ff, tr_f = np.trace(F @ F), np.sum(F * F), np.trace(F)
    e_h2 = tr_f2 + (tr_ff + tr_f**2) / k_in
    e_hh = np.sum(S_j * S_i) * (1 + 1 / k_in) + np.trace(S_i) * np.trace(S_j) / k_in
    return float((e_h2 + e_hh) / k_out + (tr_f2 + tr_ff) / k_in)


def test_gaussian_sketches_estimate_inner_products_with_the_jl_variance():
    """Over 400 seeds, the mean of ``<sketch_0, sketch_j>`` is within 4 standard errors of ``<G_0, G_j>``,
    and its sample variance within 4 standard errors of :func:`jl_variance`: the estimates are heavy-tailed
    (k_in = 4, k_out = 2), so that standard error, ``sqrt((mu_4 - s^4) / N)``, comes from the sample's own
    fourth central moment."""
    case = Case((2, 5, 5, 2), (2, 2, 2, 3), padding=1)
    k1, c_out, k_in, k_out, n_seeds = 9, 3, 4, 2, 400
    a, w, _, dz = make_arrays(case, np.float64, 10)
    geometry = geometry_of(case)
    G = per_sample(case, np.float64, 10)
    estimates = []
    for seed in range(n_seeds):
        sketch = backward_kernel(dz, a, w, geometry, projections=gaussian_projections(k_in, k_out, k1, c_out, seed)).sketch
        estimates.append([np.sum(sketch[0] * sketch[0]), np.sum(sketch[0] * sketch[1])])
    estimates = np.array(estimates)
    for j in (0, 1):
        exact, variance = np.sum(G[0] * G[j]), jl_variance(G[0], G[j], k_in, k_out)
        assert abs(estimates[:, j].mean() - exact) <= 4 * np.sqrt(variance / n_seeds), (j, estimates[:, j].mean(), exact)
        centred = estimates[:, j] - estimates[:, j].mean()
        spread = np.sqrt((np.mean(centred**4) - np.mean(centred**2) ** 2) / n_seeds)
        assert abs(estimates[:, j].var(ddof=1) - variance) <= 4 * spread, (j, estimates[:, j].var(ddof=1), variance, spread)


def test_jl_variance_matches_a_monte_carlo_of_the_matrices_alone():
    """The variance formula on its own, against 20000 draws of (A, B) on fixed matrices: within 5%."""
    rng = np.random.default_rng(0)
    G_i, G_j = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    G_j[:, 0] += G_i[:, 0]                                      # correlated, so <G_i, G_j> is not ~0
    k_in, k_out, draws = 3, 2, 20000
    A = rng.standard_normal((draws, k_in, 6)) / np.sqrt(k_in)
    B = rng.standard_normal((draws, k_out, 3)) / np.sqrt(k_out)
    x = np.einsum("nao,nao->n", A @ G_i @ B.transpose(0, 2, 1), A @ G_j @ B.transpose(0, 2, 1))
    assert abs(x.var() / jl_variance(G_i, G_j, k_in, k_out) - 1) <= 0.05


def test_projections_are_reproducible_from_their_seed():
    """PCG64 and the ziggurat give the same numbers on every machine: these are the first of seed 0."""
    first = gaussian_projections(2, 3, 4, 5, seed=0)
    again = gaussian_projections(2, 3, 4, 5, seed=0)
    np.testing.assert_array_equal(first.p_in, again.p_in)
    np.testing.assert_array_equal(first.p_out, again.p_out)
    rng = np.random.Generator(np.random.PCG64(0))
    np.testing.assert_array_equal(first.p_in, rng.standard_normal((2, 4)) / np.sqrt(2))
    np.testing.assert_allclose(first.p_in[0, :2] * np.sqrt(2), [0.12573022, -0.13210486], rtol=1e-7)
    assert gaussian_projections(2, 3, 4, 5, seed=0, dtype=np.float32).p_in.dtype == np.float32
    ortho = orthogonal_projections(3, 2, 4, 5, seed=1)
    np.testing.assert_allclose(ortho.p_in @ ortho.p_in.T, 4 / 3 * np.eye(3), atol=1e-12)   # rows scaled by sqrt(n / k)
    np.testing.assert_array_equal(ortho.p_out, orthogonal_projections(3, 2, 4, 5, seed=1).p_out)


def test_the_route_follows_the_flops_on_the_benchmark_layers():
    layers = {
        "gram": Case((1, 32, 32, 16), (3, 3, 16, 32), padding=1),
        "kronecker": Case((1, 16, 16, 64), (3, 3, 64, 128), stride=2, padding=1),
    }
    for route, case in layers.items():
        assert sketch_route(geometry_of(case), case.w_shape, 32, 32) == route
    pointwise = Case((1, 8, 8, 128), (1, 1, 128, 128))
    assert sketch_route(geometry_of(pointwise), pointwise.w_shape, 32, 32) == "kronecker"


# --- memory ----------------------------------------------------------------------------------


_PEAK_ALLOCATIONS = """
import json, sys, tracemalloc
sys.path.insert(0, {tests!r})
import numpy as np
import dconv
from _kernel_cases import Case, make_arrays
from dconv.kernel import backward_kernel, backward_working_set
from dconv.kernel.sketch import gaussian_projections, products_working_set
from dconv.params import ConvParams, backward_geometry
peaks = []
for level in {levels!r}:
    dconv.simd.set_level(level)
    for case in {cases!r}:
        for dtype in (np.float32, np.float64):
            a, w, _, dz = make_arrays(case, dtype, 0)
            geometry = backward_geometry(dz.shape, a.shape, w.shape, ConvParams.parse(**case.kwargs))
            k1, c = int(np.prod(w.shape[:3])) + 1, w.shape[3]
            queries = np.ones((16, k1, c))
            proj = gaussian_projections(8, 8, k1, c, 0)
            for route in ("gram", "kronecker"):
                for stats in (False, True):
                    args = dict(stats=stats, queries=queries, projections=proj._replace(route=route))
                    backward_kernel(dz, a, w, geometry, **args)   # warm up
                    tracemalloc.start()
                    backward_kernel(dz, a, w, geometry, **args)
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    m, itemsize = a.shape[0], a.itemsize
                    bound = (backward_working_set(m, geometry, a.shape[3], c, itemsize, stats=True)
                             + products_working_set(m, geometry, a.shape[3], c, itemsize, 16, 8, 8))
                    peaks.append([level, repr(case), route, stats, peak, bound])
print(json.dumps(peaks))
"""


def test_products_allocate_within_the_documented_bound():
    """tracemalloc's peak of one call with 16 queries and an 8 x 8 sketch within ``backward_working_set(stats=True)``
    plus ``products_working_set``, at the numpy level and a compiled one, in a fresh interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_kernel_stats import LEVELS, MEMORY_CASES

    levels = ["numpy", *LEVELS[:1]]
    code = _PEAK_ALLOCATIONS.format(tests=str(Path(__file__).parents[1]), levels=levels, cases=MEMORY_CASES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for level, case, route, stats, peak, bound in json.loads(result.stdout):
        assert peak <= bound, (level, case, route, stats, peak, bound)


# --- the surface -----------------------------------------------------------------------------


def test_stack_queries_puts_the_bias_row_last():
    dW_q, db_q = np.arange(2 * 2 * 1 * 3 * 4).reshape(2, 2, 1, 3, 4), -np.ones((2, 4))
    Q = stack_queries(dW_q, db_q)
    assert Q.shape == (2, 7, 4) and (Q[:, -1] == -1).all() and (Q[1, :6] == dW_q[1].reshape(6, 4)).all()


def test_bad_shapes_are_refused_with_the_expected_shape():
    case = SKETCH_CASES["s1_pad1"]
    a, w, _, dz = make_arrays(case, np.float64, 1)
    geometry = geometry_of(case)
    with pytest.raises(InputError, match=r"queries must have shape \(n_q, 145, 16\) .*; got \(2, 144, 16\) instead"):
        backward_kernel(dz, a, w, geometry, queries=np.zeros((2, 144, 16)))
    with pytest.raises(InputError, match=r"projections must have shapes \(k_in, 145\) and \(k_out, 16\)"):
        backward_kernel(dz, a, w, geometry, projections=(np.zeros((2, 145)), np.zeros((2, 15))))
    with pytest.raises(InputError, match="route must be one of"):
        backward_kernel(dz, a, w, geometry, projections=(np.zeros((2, 145)), np.zeros((2, 16)), "fast"))
    with pytest.raises(InputError, match="k_in and k_out must be at most"):
        orthogonal_projections(5, 2, 4, 5, seed=0)
    with pytest.raises(InputError, match="k_in must be a positive int; got 0 instead"):
        gaussian_projections(0, 2, 4, 5, seed=0)


# --- optional: PyTorch's per-sample gradients ---------------------------------------------


@pytest.mark.parametrize("case_id", ["s2_pad1", "linear"])
def test_products_match_torch_per_sample_gradients(case_id):
    """``torch.func.vmap(torch.func.grad(loss))`` with ``loss_i = sum(conv(x_i) * dz_i)``: ``G_i`` from an
    independent implementation, then its inner products and sketch by einsum."""
    torch = pytest.importorskip("torch")
    from torch.func import grad, vmap

    from _kernel_cases import independent_geometry

    case = SKETCH_CASES[case_id]
    a, w, b, dz = make_arrays(case, np.float64, 17)
    ((top, bottom), (left, right)), stride, dilation = independent_geometry(case)
    x = torch.nn.functional.pad(torch.from_numpy(a.transpose(0, 3, 1, 2).copy()), (left, right, top, bottom))
    g = torch.from_numpy(dz.transpose(0, 3, 1, 2).copy())
    params = (torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b.ravel().copy()))

    def loss(weights, x_i, g_i):
        z = torch.nn.functional.conv2d(x_i[None], weights[0], weights[1], stride=stride, dilation=dilation)
        return (z[0] * g_i).sum()

    dW_i, db_i = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, g)     # (m, C, C_prev, fh, fw), (m, C)
    G = np.concatenate([dW_i.numpy().transpose(0, 3, 4, 2, 1).reshape(case.a_shape[0], -1, case.w_shape[3]),
                        db_i.numpy()[:, None]], axis=1)
    queries, proj = products_of(case, 17)
    got = backward_kernel(dz, a, w, geometry_of(case), queries=queries, projections=proj)
    assert rel_err(got.sample_dot, np.einsum("ikc,jkc->ij", G, queries)) <= 1e-10
    assert rel_err(got.sketch, np.einsum("ak,ikc,oc->iao", proj.p_in, G, proj.p_out)) <= 1e-10

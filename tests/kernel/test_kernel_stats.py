"""dconv.kernel's per-sample gradient statistics (``stats=True``) and the pass without dA_prev.

The truth is dconv's loop oracle (:func:`dconv.reference.conv2d_backward_loops`) run on one
sample at a time, in float64: ``g_i = (dW_i, db_i)``, and from those ``|g_i|^2``,
``sum_i dW_i * dW_i`` and ``sum_i db_i * db_i``. Every path is forced in turn: the NumPy
paths (stride-1 flat GEMMs, in per-sample groups and in groups of several samples; im2col;
1x1) at the ``numpy`` level, and the compiled dW loop at every SIMD level this machine runs.

Float64 inputs must agree to 1e-10 relative. Float32 inputs are held to a bound derived
from the rounding of the float32 sums (:func:`float32_bound`).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dconv
import dconv.kernel.dispatch
import dconv.kernel.threads
from dconv import InputError, conv2d_backward
from dconv.kernel import GradientStats, GradientsWithStats, backward_kernel
from dconv.params import ConvParams, backward_geometry
from dconv.reference import conv2d_backward_loops

from _kernel_cases import CASES, DTYPES, Case, make_arrays, rel_err

LEVELS = dconv.simd_levels()

# Layers the compiled dW loop takes (C a multiple of the vector width in both dtypes): stride 1
# and 2, dilation, every padding form, a merged narrow C_prev, a 1x1 kernel at stride 3.
COMPILED_CASES = {
    "s1_pad1": Case((2, 6, 7, 16), (3, 3, 16, 32), padding=1),
    "s1_same_dilated": Case((2, 5, 9, 8), (3, 2, 8, 16), padding="same", dilation=2),
    "s2_pad1": Case((2, 9, 10, 16), (3, 3, 16, 32), stride=2, padding=1),
    "s2x3_same_dilated": Case((2, 11, 13, 8), (3, 2, 8, 16), stride=(2, 3), padding="same", dilation=(1, 2)),
    "explicit_asym": Case((2, 6, 17, 8), (3, 3, 8, 16), padding=((0, 2), (1, 0))),
    "valid_rect": Case((1, 7, 12, 16), (2, 3, 16, 16), padding="valid"),
    "narrow_3": Case((2, 9, 10, 3), (5, 5, 3, 16), padding=2),          # taps merged into rows
    "stride3_1x1": Case((2, 7, 8, 16), (1, 1, 16, 32), stride=3),
    "pointwise": Case((2, 5, 3, 16), (1, 1, 16, 16)),
    "tall_tiles": Case((2, 16, 9, 8), (3, 3, 8, 16), padding=1),        # two tiles of output rows per sample
}

# The stride-1 NumPy path in groups of several samples (taps * C > Hp * Wp), with one left over.
GROUPED = Case((7, 2, 2, 3), (3, 3, 3, 8), padding=1)


@pytest.fixture(params=["numpy", *LEVELS, *[f"{name}+gemm" for name in LEVELS]])
def path_level(request, monkeypatch):
    """``numpy``: the NumPy paths only. A compiled level: its loops on every layer they can take.
    ``<level>+gemm``: the GEMMs wherever a rule can give them dW and dA_prev, the statistics of
    im2col and 1x1 layers then from the compiled loop run for them alone."""
    level, _, gemm = request.param.partition("+")
    if level != "numpy":
        limit = 0 if gemm else dconv.kernel.dispatch.ANY
        monkeypatch.setitem(dconv.kernel.dispatch.COMPILED_RULES, level, dconv.kernel.dispatch.CompiledRule(*[limit] * 3))
    dconv.simd.set_level(level)
    yield request.param
    dconv.simd.set_level(None)


def geometry_of(case: Case):
    return backward_geometry(case.z_shape(), case.a_shape, case.w_shape, ConvParams.parse(**case.kwargs))


def oracle(case: Case, dtype, seed: int, absolute: bool = False):
    """The loop oracle on each sample alone, in float64 on the (rounded) inputs: ``(dW_i, db_i)``,
    shapes (m, fh, fw, C_prev, C) and (m, C); with ``absolute``, of ``|A_prev|`` and ``|dZ|``."""
    return _oracle(repr(case), np.dtype(dtype).name, seed, absolute)


@functools.cache
def _oracle(case_repr: str, dtype: str, seed: int, absolute: bool):
    case = eval(case_repr, {"Case": Case})          # Case's padding may hold lists, which do not hash
    a, w, _, dz = (np.asarray(x, np.float64) for x in make_arrays(case, dtype, seed))
    if absolute:
        a, dz = np.abs(a), np.abs(dz)
    per_sample = [conv2d_backward_loops(dz[i : i + 1], a[i : i + 1], w, **case.kwargs) for i in range(a.shape[0])]
    return np.array([g.dW for g in per_sample]), np.array([g.db.ravel() for g in per_sample])


def expected_stats(case: Case, dtype, seed: int) -> GradientStats:
    dW, db = oracle(case, dtype, seed)
    m = dW.shape[0]
    norm2 = (dW * dW).reshape(m, -1).sum(axis=1) + (db * db).sum(axis=1)
    return GradientStats(norm2, (dW * dW).sum(axis=0), (db * db).sum(axis=0).reshape(1, 1, 1, -1))


def float32_bound(case: Case, seed: int) -> GradientStats:
    """Elementwise bounds on the error of float32 statistics against their float64 truth.

    Each element ``e`` of ``dW_i`` is a sum of ``n`` products of float32 inputs, ``n`` at most
    the ``Hp * Wp`` pixels of one padded sample (the flat GEMMs sum the wrap-around rows too,
    on zeros), summed in float32 by a GEMM or by the compiled loop's tiles (whose tile sums
    are then added in float64). With ``u = 2**-24`` and ``gamma = (n + 1) u / (1 - (n + 1) u)``
    (one more rounding for a product without FMA), the computed ``e'`` satisfies
    ``|e' - e| <= d = gamma * (|A_i|^T |dZ_i|)`` at that element. The statistics square and add
    in float64, so ``|e'^2 - e^2| <= d (2|e| + d)``: summed over the samples for ``dW_sq``, over
    the elements for ``sample_grad_norm2``. ``db_i`` is summed in float64 (error below
    ``n * 2**-53`` relative to ``sum |dZ_i|``), which, with the float64 squares and sums,
    the slack of ``1e-12`` times the value covers.
    """
    dW, _ = oracle(case, np.float32, seed)
    dW_abs, _ = oracle(case, np.float32, seed, absolute=True)
    (top, bottom), (left, right) = geometry_of(case).pads
    n = (case.a_shape[1] + top + bottom) * (case.a_shape[2] + left + right) + 1
    u = 2.0**-24
    delta = n * u / (1 - n * u) * dW_abs
    squares = delta * (2 * np.abs(dW) + delta)
    truth = expected_stats(case, np.float32, seed)
    m = dW.shape[0]
    return GradientStats(
        squares.reshape(m, -1).sum(axis=1) + 1e-12 * truth.sample_grad_norm2,
        squares.sum(axis=0) + 1e-12 * truth.dW_sq,
        1e-12 * truth.db_sq + 1e-300,
    )


def assert_stats_match_oracle(case: Case, dtype, seed: int, threads: int = 1) -> None:
    a, w, _, dz = make_arrays(case, dtype, seed)
    grads = conv2d_backward(dz, a, w, threads=threads, stats=True, **case.kwargs)
    assert isinstance(grads, GradientsWithStats) and isinstance(grads.stats, GradientStats)
    got, want = grads.stats, expected_stats(case, dtype, seed)
    shapes = [(case.a_shape[0],), case.w_shape, (1, 1, 1, case.w_shape[3])]
    for name, shape in zip(GradientStats._fields, shapes):
        value = getattr(got, name)
        assert value.shape == shape and value.dtype == np.float64, (name, value.shape, value.dtype)
    if np.dtype(dtype) == np.float64:
        for name in GradientStats._fields:
            assert rel_err(getattr(got, name), getattr(want, name)) <= 1e-10, (name, rel_err(getattr(got, name), getattr(want, name)))
        np.testing.assert_allclose(got.sample_grad_norm2, want.sample_grad_norm2, rtol=1e-10, atol=0)
    else:
        bound = float32_bound(case, seed)
        for name in GradientStats._fields:
            error = np.abs(getattr(got, name) - getattr(want, name))
            assert (error <= getattr(bound, name)).all(), (name, float(np.max(error - getattr(bound, name))))


# --- agreement with the per-sample oracle ------------------------------------------------


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("case_id", list(CASES))
def test_numpy_paths_match_the_per_sample_oracle(case_id, m):
    """Every padding form, stride and dilation of the kernel suite, on the NumPy paths, m = 1 and 2."""
    case = CASES[case_id]._replace(a_shape=(m, *CASES[case_id].a_shape[1:]))
    dconv.simd.set_level("numpy")
    try:
        for dtype in DTYPES:
            assert_stats_match_oracle(case, dtype, seed=3)
    finally:
        dconv.simd.set_level(None)


@pytest.mark.parametrize("case_id", list(COMPILED_CASES))
def test_every_path_matches_the_per_sample_oracle(case_id, path_level):
    for dtype in DTYPES:
        assert_stats_match_oracle(COMPILED_CASES[case_id], dtype, seed=5)


@pytest.mark.parametrize("m", [1, 2, 7])
def test_stride1_groups_of_samples_match_the_per_sample_oracle(m, path_level):
    """2x2 images and a 3x3 kernel: the NumPy path sums dW over groups of 5 samples (and
    the rest), so the statistics run per-sample GEMMs of their own."""
    case = GROUPED._replace(a_shape=(m, *GROUPED.a_shape[1:]))
    for dtype in DTYPES:
        assert_stats_match_oracle(case, dtype, seed=m)


@pytest.mark.parametrize("case_id", ["s1_pad1", "s2_pad1", "narrow_3", "pointwise"])
def test_threaded_slices_match_the_per_sample_oracle(case_id, path_level, monkeypatch):
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = COMPILED_CASES[case_id]._replace(a_shape=(3, *COMPILED_CASES[case_id].a_shape[1:]))
    for dtype in DTYPES:
        assert_stats_match_oracle(case, dtype, seed=7, threads=2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_input_restarts_the_statistics_on_the_im2col_path():
    """inf in one sample's input makes the flat path's dW non-finite, and the layer falls back to
    im2col: the statistics start again there (no sample counted twice), and the other samples
    keep their finite figures."""
    case = Case((3, 6, 5, 2), (3, 3, 2, 3), padding=1)
    a, w, _, dz = make_arrays(case, np.float64, 2)
    a[1, 2, 2, 1] = np.inf
    got = conv2d_backward(dz, a, w, threads=1, stats=True, **case.kwargs).stats
    clean = [conv2d_backward(dz[i : i + 1], a[i : i + 1], w, threads=1, stats=True, **case.kwargs).stats for i in (0, 2)]
    assert not np.isfinite(got.sample_grad_norm2[1])
    np.testing.assert_allclose(got.sample_grad_norm2[[0, 2]], [s.sample_grad_norm2[0] for s in clean], rtol=1e-12)
    np.testing.assert_allclose(got.db_sq, expected_stats(case, np.float64, 2).db_sq, rtol=1e-12)   # dZ is finite


# --- the bits of dW and db, with and without the statistics and dA_prev -------------------


BIT_CASES = {**{k: COMPILED_CASES[k] for k in ("s1_pad1", "s2_pad1", "narrow_3", "pointwise", "tall_tiles")},
             "grouped": GROUPED, "same_s2": CASES["same_s2"]}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case_id", list(BIT_CASES))
def test_dW_and_db_keep_their_bits_with_stats_and_without_dA_prev(case_id, threads, path_level, monkeypatch):
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = BIT_CASES[case_id]._replace(a_shape=(4, *BIT_CASES[case_id].a_shape[1:]))
    geometry = geometry_of(case)
    for dtype in DTYPES:
        a, w, _, dz = make_arrays(case, dtype, 11)
        for sums in (False, True):
            plain = backward_kernel(dz, a, w, geometry, threads=threads, float64_sums=sums)
            assert type(plain) is dconv.Gradients
            for stats, dA_prev in [(True, True), (False, False), (True, False)]:
                other = backward_kernel(dz, a, w, geometry, threads=threads, float64_sums=sums, stats=stats, dA_prev=dA_prev)
                assert type(other) is (GradientsWithStats if stats else dconv.Gradients)
                np.testing.assert_array_equal(other.dW, plain.dW, err_msg=f"dW stats={stats} dA_prev={dA_prev}")
                np.testing.assert_array_equal(other.db, plain.db, err_msg=f"db stats={stats} dA_prev={dA_prev}")
                assert other.dW.dtype == plain.dW.dtype and other.db.dtype == plain.db.dtype
                if dA_prev:
                    np.testing.assert_array_equal(other.dA_prev, plain.dA_prev)
                else:
                    assert other.dA_prev is None
        with_dA = backward_kernel(dz, a, w, geometry, threads=threads, stats=True)
        without = backward_kernel(dz, a, w, geometry, threads=threads, stats=True, dA_prev=False)
        for name in GradientStats._fields:
            np.testing.assert_array_equal(getattr(with_dA.stats, name), getattr(without.stats, name), err_msg=name)


@pytest.mark.parametrize("case_id", ["s1_pad1", "s2_pad1", "narrow_3", "tall_tiles"])
def test_compiled_sample_norms_do_not_depend_on_the_batch_split(case_id, path_level, monkeypatch):
    """The compiled loop squares each sample's own float64 dW_i: the same bits however the
    batch is cut into slices (dW_sq, a sum over samples, rounds with the split, as dW does)."""
    if path_level == "numpy" or path_level.endswith("+gemm"):
        pytest.skip("the NumPy GEMMs' bits follow BLAS's blocking")
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = COMPILED_CASES[case_id]._replace(a_shape=(5, *COMPILED_CASES[case_id].a_shape[1:]))
    for dtype in DTYPES:
        a, w, _, dz = make_arrays(case, dtype, 13)
        one, two = (conv2d_backward(dz, a, w, threads=t, stats=True, **case.kwargs).stats for t in (1, 2))
        np.testing.assert_array_equal(one.sample_grad_norm2, two.sample_grad_norm2)
        np.testing.assert_allclose(one.dW_sq, two.dW_sq, rtol=1e-13)


FMA_LEVELS = [name for name in LEVELS if name != "baseline"]


@pytest.mark.skipif(len(FMA_LEVELS) < 2, reason=f"one level with FMA runs here ({FMA_LEVELS}): nothing to compare")
@pytest.mark.parametrize("case_id", ["s1_pad1", "s2_pad1", "narrow_3"])
def test_levels_with_fma_give_the_same_statistics(case_id, monkeypatch):
    every = dconv.kernel.dispatch.CompiledRule(*[dconv.kernel.dispatch.ANY] * 3)
    case = COMPILED_CASES[case_id]
    for dtype in DTYPES:
        a, w, _, dz = make_arrays(case, dtype, 21)
        results = []
        for name in FMA_LEVELS:
            monkeypatch.setitem(dconv.kernel.dispatch.COMPILED_RULES, name, every)
            dconv.simd.set_level(name)
            try:
                results.append(conv2d_backward(dz, a, w, threads=1, stats=True, **case.kwargs).stats)
            finally:
                dconv.simd.set_level(None)
        for other in results[1:]:
            for name in GradientStats._fields:
                np.testing.assert_array_equal(getattr(results[0], name), getattr(other, name), err_msg=name)


# --- the public surface ----------------------------------------------------------------


def test_conv2d_backward_returns_the_statistics_as_a_fourth_value():
    case = COMPILED_CASES["s1_pad1"]
    a, w, _, dz = make_arrays(case, np.float64, 1)
    dA_prev, dW, db, stats = conv2d_backward(dz, a, w, stats=True, **case.kwargs)
    assert stats.sample_grad_norm2.shape == (2,) and stats.db_sq.shape == (1, 1, 1, 32)
    plain = conv2d_backward(dz, a, w, **case.kwargs)
    assert len(plain) == 3 and type(plain) is dconv.Gradients
    for x, y in zip(plain, (dA_prev, dW, db)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_stats_must_be_a_bool(bad):
    case = CASES["pad0"]
    a, w, _, dz = make_arrays(case, np.float64, 1)
    with pytest.raises(InputError, match=f"stats must be True or False; got {bad!r} instead"):
        conv2d_backward(dz, a, w, stats=bad)


@pytest.mark.skipif(not LEVELS, reason="the compiled helper was not built")
def test_compiled_statistics_refuse_half_their_buffers():
    from dconv import _flatconv

    P, dZ, dW, offsets = np.zeros((100, 4)), np.zeros((1, 3, 3, 8)), np.zeros((1, 4, 8)), np.zeros(1, np.intp)
    wargs = (100, 1, 25, 10, 2, 3, 3, 4, 4, 8)
    with pytest.raises(ValueError, match="dW_sq and norm2 must be given together"):
        _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs, dW, np.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="out may be None only with dW_sq and norm2"):
        _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs, None)
    with pytest.raises(ValueError, match="norm2 must be a native float buffer of at least 1 items"):
        _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs, dW, np.zeros((1, 4, 8)), np.zeros(0))


_PEAK_ALLOCATIONS = """
import json, sys, tracemalloc
sys.path.insert(0, {tests!r})
import numpy as np
import dconv
from _kernel_cases import Case, make_arrays
from dconv.kernel import backward_kernel, backward_working_set
from dconv.params import ConvParams, backward_geometry
peaks = []
for level in {levels!r}:
    dconv.simd.set_level(level)
    for case in {cases!r}:
        a, w, _, dz = make_arrays(case, np.float64, 0)
        geometry = backward_geometry(dz.shape, a.shape, w.shape, ConvParams.parse(**case.kwargs))
        backward_kernel(dz, a, w, geometry, stats=True)   # warm up
        tracemalloc.start()
        backward_kernel(dz, a, w, geometry, stats=True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks.append([level, repr(case), peak, backward_working_set(a.shape[0], geometry, a.shape[3], w.shape[3], 8, stats=True)])
print(json.dumps(peaks))
"""

MEMORY_CASES = [
    Case((6, 12, 12, 4), (3, 3, 4, 8), padding=1),                 # stride 1, per-sample GEMMs
    Case((7, 3, 3, 3), (3, 3, 3, 16), padding=1),                  # stride 1, dW in groups of samples
    Case((6, 11, 11, 16), (3, 3, 16, 32), stride=2, padding=1),    # im2col, or the compiled loop
    Case((6, 8, 8, 16), (1, 1, 16, 64)),                           # 1x1
    Case((2, 6, 6, 64), (3, 3, 64, 256), padding=1),               # one sample's dW above BLOCK_BYTES
]


def test_statistics_allocate_within_the_documented_bound():
    """tracemalloc's peak of one stats=True call within backward_working_set(stats=True), at the
    numpy level and a compiled one, in a fresh interpreter (other tests' threads allocate too)."""
    levels = ["numpy", *LEVELS[:1]]
    code = _PEAK_ALLOCATIONS.format(tests=str(Path(__file__).parents[1]), levels=levels, cases=MEMORY_CASES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for level, case, peak, bound in json.loads(result.stdout):
        assert peak <= bound, (level, case, peak, bound)


# --- optional: PyTorch's per-sample gradients ---------------------------------------------


@pytest.mark.parametrize("case_id", ["same_s2", "s2_pad1"])
def test_statistics_match_torch_per_sample_gradients(case_id):
    """``torch.func.vmap(torch.func.grad(loss))`` with ``loss_i = sum(conv(x_i) * dz_i)``: the
    per-example gradients of a summed loss, from an independent implementation."""
    torch = pytest.importorskip("torch")
    from torch.func import grad, vmap

    from _kernel_cases import independent_geometry

    case = {**CASES, **COMPILED_CASES}[case_id]
    a, w, b, dz = make_arrays(case, np.float64, 17)
    ((top, bottom), (left, right)), stride, dilation = independent_geometry(case)
    x = torch.nn.functional.pad(torch.from_numpy(a.transpose(0, 3, 1, 2).copy()), (left, right, top, bottom))
    g = torch.from_numpy(dz.transpose(0, 3, 1, 2).copy())
    params = (torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b.ravel().copy()))

    def loss(weights, x_i, g_i):
        z = torch.nn.functional.conv2d(x_i[None], weights[0], weights[1], stride=stride, dilation=dilation)
        return (z[0] * g_i).sum()

    dW_i, db_i = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, g)     # (m, C, C_prev, fh, fw), (m, C)
    dW_i, db_i = dW_i.numpy().transpose(0, 3, 4, 2, 1), db_i.numpy()
    m = a.shape[0]
    got = conv2d_backward(dz, a, w, stats=True, **case.kwargs).stats
    want_norm2 = (dW_i**2).reshape(m, -1).sum(axis=1) + (db_i**2).sum(axis=1)
    np.testing.assert_allclose(got.sample_grad_norm2, want_norm2, rtol=1e-10)
    assert rel_err(got.dW_sq, (dW_i**2).sum(axis=0)) <= 1e-10
    assert rel_err(got.db_sq, (db_i**2).sum(axis=0).reshape(1, 1, 1, -1)) <= 1e-10

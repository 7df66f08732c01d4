"""dconv.kernel: conv2d_forward / conv2d_backward against the loop oracle, finite differences,
property tests, dtype rules, input validation and IEEE special values."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dconv
import dconv.kernel.dispatch
import dconv.kernel.threads
from dconv import InputDtypeError, InputError, conv2d_backward, conv2d_forward
from dconv.kernel.threads import MIN_SLICE_FLOPS, batch_slices
from dconv.params import ConvParams, backward_geometry
from dconv.reference import conv2d_backward_loops, conv2d_forward_loops

from _kernel_cases import CASES, DTYPES, TOL, Case, conv_cases, f64, make_arrays, rel_err

CASE_IDS = list(CASES)


def reference(case: Case, a, w, b, dz):
    """Float64 loop-oracle results (Z, dA_prev, dW, db)."""
    a, w, b, dz = f64(a, w, b, dz)
    z = conv2d_forward_loops(a, w, b, **case.kwargs)
    return (z, *conv2d_backward_loops(dz, a, w, **case.kwargs))


def assert_matches_reference(case: Case, dtype, seed: int) -> None:
    a, w, b, dz = make_arrays(case, dtype, seed)
    z = conv2d_forward(a, w, b, **case.kwargs)
    grads = conv2d_backward(dz, a, w, **case.kwargs)
    expected = reference(case, a, w, b, dz)
    tol = TOL[np.dtype(dtype)]
    for name, got, want in zip(("Z", "dA_prev", "dW", "db"), (z, *grads), expected):
        assert got.dtype == np.dtype(dtype), name
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@functools.lru_cache(maxsize=None)
def backward_reference(case: Case, dtype: str, seed: int) -> tuple[np.ndarray, ...]:
    """Float64 loop-oracle gradients (dA_prev, dW, db) of ``make_arrays(case, dtype, seed)``, read-only.

    Computed once per case, dtype and seed: the tests that run at every SIMD level (and thread
    count) compare each level's result with the same oracle.
    """
    a, w, _, dz = f64(*make_arrays(case, dtype, seed))
    grads = conv2d_backward_loops(dz, a, w, **case.kwargs)
    for array in grads:
        array.flags.writeable = False
    return tuple(grads)


def assert_gradients_match_reference(case: Case, dtype, seed: int, threads: int) -> None:
    """``conv2d_backward`` on ``threads`` threads against the loop oracle: dtype, C-contiguity and values."""
    a, w, b, dz = make_arrays(case, dtype, seed)
    grads = conv2d_backward(dz, a, w, threads=threads, **case.kwargs)
    for name, got, want in zip(("dA_prev", "dW", "db"), grads, backward_reference(case, np.dtype(dtype).name, seed)):
        assert got.dtype == np.dtype(dtype) and got.flags.c_contiguous, name
        assert rel_err(got, want) <= TOL[np.dtype(dtype)], (name, rel_err(got, want))


# --- 1. oracle comparisons ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_loop_reference(case_id, dtype):
    assert_matches_reference(CASES[case_id], dtype, seed=CASE_IDS.index(case_id))


@pytest.mark.parametrize("case_id", ["same_s2", "output_1x1", "kernel_1x1"])
def test_gradient_shapes(case_id):
    case = CASES[case_id]
    a, w, _, dz = make_arrays(case, np.float64, 0)
    grads = conv2d_backward(dz, a, w, **case.kwargs)
    assert isinstance(grads, dconv.Gradients)
    assert grads.dA_prev.shape == a.shape
    assert grads.dW.shape == w.shape
    assert grads.db.shape == (1, 1, 1, w.shape[3])
    assert conv2d_forward(a, w, **case.kwargs).shape == dz.shape


def test_bias_forms_are_equivalent():
    case = CASES["int_pad"]
    a, w, b, _ = make_arrays(case, np.float64, 1)
    z4 = conv2d_forward(a, w, b, **case.kwargs)
    z1 = conv2d_forward(a, w, b.ravel(), **case.kwargs)
    z0 = conv2d_forward(a, w, **case.kwargs)
    np.testing.assert_allclose(z4, z1, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(z4 - z0, np.broadcast_to(b, z0.shape), rtol=0, atol=1e-12)


def test_array_like_inputs():
    case = CASES["pad0"]
    a, w, b, dz = make_arrays(case, np.float64, 2)
    z = conv2d_forward(a.tolist(), w.tolist(), b.tolist(), **case.kwargs)
    grads = conv2d_backward(dz.tolist(), a.tolist(), w.tolist(), **case.kwargs)
    assert z.dtype == np.float64
    np.testing.assert_allclose(z, conv2d_forward(a, w, b, **case.kwargs), rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, conv2d_backward(dz, a, w, **case.kwargs)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda x: x[:, ::-1, ::-1, :], id="reversed"),
        pytest.param(np.asfortranarray, id="fortran"),
        pytest.param(lambda x: np.repeat(x, 2, axis=-1)[..., ::2], id="strided"),
    ],
)
@pytest.mark.parametrize("case_id", ["pad0", "same_s2", "dilation2"])
def test_non_contiguous_inputs(case_id, view):
    case = CASES[case_id]
    a, w, b, dz = make_arrays(case, np.float64, 3)
    va, vw, vdz = view(a), view(w), view(dz)
    ca, cw, cdz = (np.ascontiguousarray(x) for x in (va, vw, vdz))
    np.testing.assert_allclose(
        conv2d_forward(va, vw, b, **case.kwargs), conv2d_forward(ca, cw, b, **case.kwargs), rtol=1e-12, atol=1e-12
    )
    for got, want in zip(conv2d_backward(vdz, va, vw, **case.kwargs), conv2d_backward(cdz, ca, cw, **case.kwargs)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case_id", ["pad0", "same_s3_d2", "explicit_asym"])
def test_inputs_not_modified(case_id):
    case = CASES[case_id]
    arrays = make_arrays(case, np.float32, 4)
    copies = [x.copy() for x in arrays]
    a, w, b, dz = arrays
    conv2d_forward(a, w, b, **case.kwargs)
    conv2d_backward(dz, a, w, **case.kwargs)
    for x, x0 in zip(arrays, copies):
        np.testing.assert_array_equal(x, x0)


# --- 2. finite differences ---------------------------------------------------


@pytest.mark.parametrize("case_id", ["int_pad", "explicit_asym", "same_s2", "same_s3_d2", "dilation_pair"])
def test_finite_differences(case_id):
    """L = sum(conv2d_forward(A, W, b) * G); central differences on random coordinates."""
    case = CASES[case_id]
    rng = np.random.default_rng(100 + CASE_IDS.index(case_id))
    a, w, b, g = make_arrays(case, np.float64, 100 + CASE_IDS.index(case_id))
    grads = conv2d_backward(g, a, w, **case.kwargs)
    analytic = {"A": grads.dA_prev, "W": grads.dW, "b": grads.db}
    inputs = {"A": a, "W": w, "b": b}

    def loss() -> float:
        return float(np.sum(conv2d_forward(inputs["A"], inputs["W"], inputs["b"], **case.kwargs) * g))

    h = 1e-4
    for name, x in inputs.items():
        for _ in range(4):
            idx = tuple(int(rng.integers(n)) for n in x.shape)
            x0 = x[idx]
            x[idx] = x0 + h
            up = loss()
            x[idx] = x0 - h
            down = loss()
            x[idx] = x0
            numeric = (up - down) / (2 * h)
            assert abs(numeric - analytic[name][idx]) <= 1e-6 * max(abs(analytic[name][idx]), 1.0), (name, idx)


# --- 3. property tests ---------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_property_matches_loop_reference(case, dtype, seed):
    assert_matches_reference(case, dtype, seed)


@settings(max_examples=50, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
def test_property_adjoint_identity(case, seed):
    """<conv(A, W), G> == <A, dA_prev(G)> == <W, dW(G)> without the oracle."""
    a, w, _, g = make_arrays(case, np.float64, seed)
    z = conv2d_forward(a, w, **case.kwargs)
    grads = conv2d_backward(g, a, w, **case.kwargs)
    inner = np.vdot(z, g)
    scale = np.linalg.norm(z) * np.linalg.norm(g) + 1.0
    assert abs(np.vdot(a, grads.dA_prev) - inner) <= 1e-10 * scale
    assert abs(np.vdot(w, grads.dW) - inner) <= 1e-10 * scale
    np.testing.assert_allclose(grads.db.ravel(), g.sum(axis=(0, 1, 2)), rtol=1e-12, atol=1e-12)


# --- 4. dtypes -----------------------------------------------------------------


def test_float32_stays_float32():
    case = CASES["same_s2"]
    a, w, b, dz = make_arrays(case, np.float32, 5)
    assert conv2d_forward(a, w, b, **case.kwargs).dtype == np.float32
    assert conv2d_forward(a, w, **case.kwargs).dtype == np.float32
    assert all(g.dtype == np.float32 for g in conv2d_backward(dz, a, w, **case.kwargs))


@pytest.mark.parametrize("which", ["A_prev", "W", "b", "dZ"])
def test_mixed_precision_promotes_to_float64(which):
    case = CASES["int_pad"]
    a, w, b, dz = make_arrays(case, np.float32, 6)
    arrays = {"A_prev": a, "W": w, "b": b, "dZ": dz}
    arrays[which] = arrays[which].astype(np.float64)
    a, w, b, dz = arrays["A_prev"], arrays["W"], arrays["b"], arrays["dZ"]
    z = conv2d_forward(a, w, b, **case.kwargs)
    grads = conv2d_backward(dz, a, w, **case.kwargs)
    expected = reference(case, a, w, b, dz)
    if which != "dZ":
        assert z.dtype == np.float64
        assert rel_err(z, expected[0]) <= 2e-5
    if which != "b":
        assert all(g.dtype == np.float64 for g in grads)
        for got, want in zip(grads, expected[1:]):
            assert rel_err(got, want) <= 2e-5


BAD_DTYPES = [np.int32, np.int64, np.bool_, np.complex128, np.float16, object]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("which", ["A_prev", "W", "b", "dZ"])
def test_unsupported_dtype_raises(which, bad):
    case = CASES["pad0"]
    a, w, b, dz = make_arrays(case, np.float64, 7)
    arrays = {"A_prev": a, "W": w, "b": b, "dZ": dz}
    arrays[which] = arrays[which].astype(bad)
    a, w, b, dz = arrays["A_prev"], arrays["W"], arrays["b"], arrays["dZ"]
    with pytest.raises(InputDtypeError) as info:
        if which == "dZ":
            conv2d_backward(dz, a, w, **case.kwargs)
        else:
            conv2d_forward(a, w, b, **case.kwargs)
    assert isinstance(info.value, TypeError)
    assert f"{which} must have dtype float32 or float64" in str(info.value)
    if which != "b":
        with pytest.raises(TypeError, match=f"{which} must have dtype"):
            conv2d_backward(dz, a, w, **case.kwargs)


def test_python_int_lists_are_rejected():
    with pytest.raises(InputDtypeError, match="A_prev must have dtype float32 or float64; got int64"):
        conv2d_forward([[[[1]]]], np.ones((1, 1, 1, 1)))


# --- 5. validation -------------------------------------------------------------


def _zeros(*shape):
    return np.zeros(shape)


A = _zeros(2, 5, 5, 3)
W = _zeros(3, 3, 3, 4)
DZ = _zeros(2, 3, 3, 4)

INVALID = [
    ("A_prev_rank", lambda: conv2d_forward(_zeros(5, 5, 3), W), "A_prev must be 4-D (m, H, W, C_prev); got shape (5, 5, 3) (3-D)"),
    ("W_rank", lambda: conv2d_backward(DZ, A, _zeros(1, 3, 3, 3, 4)), "W must be 4-D (fh, fw, C_prev, C); got shape (1, 3, 3, 3, 4) (5-D)"),
    ("dZ_rank", lambda: conv2d_backward(_zeros(2, 3, 3), A, W), "dZ must be 4-D (m, n_H, n_W, C); got shape (2, 3, 3)"),
    ("channel_mismatch", lambda: conv2d_backward(DZ, A, _zeros(3, 3, 2, 4)), "W has 2 input channels (shape (3, 3, 2, 4)) but A_prev has 3"),
    ("batch_mismatch", lambda: conv2d_backward(_zeros(3, 3, 3, 4), A, W), "dZ has batch size 3 (shape (3, 3, 3, 4)) but A_prev has 2"),
    (
        "dZ_shape",
        lambda: conv2d_backward(_zeros(8, 6, 6, 16), _zeros(8, 7, 7, 3), _zeros(3, 3, 3, 16), stride=1, padding=0),
        "dZ has shape (8, 6, 6, 16); A_prev (8, 7, 7, 3), W (3, 3, 3, 16), stride 1, padding 0 give (8, 5, 5, 16).",
    ),
    (
        "dZ_shape_same_stride2",
        lambda: conv2d_backward(_zeros(2, 5, 5, 4), A, W, stride=2, padding="same", dilation=2),
        "dZ has shape (2, 5, 5, 4); A_prev (2, 5, 5, 3), W (3, 3, 3, 4), stride 2, padding 'same', dilation 2 give (2, 3, 3, 4).",
    ),
    ("dZ_channels", lambda: conv2d_backward(_zeros(2, 3, 3, 5), A, W), "give (2, 3, 3, 4)"),
    ("empty_batch", lambda: conv2d_forward(_zeros(0, 5, 5, 3), W), "must have no empty dimension"),
    ("stride_0", lambda: conv2d_forward(A, W, stride=0), "stride must be >= 1; got 0"),
    ("stride_pair_0", lambda: conv2d_backward(DZ, A, W, stride=(1, 0)), "stride must be >= 1; got (1, 0)"),
    ("stride_float", lambda: conv2d_forward(A, W, stride=1.5), "stride must be an int or a pair (h, w) of ints; got 1.5"),
    ("stride_bool", lambda: conv2d_forward(A, W, stride=True), "stride must be an int or a pair (h, w) of ints; got True"),
    ("stride_triple", lambda: conv2d_forward(A, W, stride=(1, 1, 1)), "stride must be an int or a pair"),
    ("dilation_0", lambda: conv2d_forward(A, W, dilation=0), "dilation must be >= 1; got 0"),
    ("dilation_negative", lambda: conv2d_backward(DZ, A, W, dilation=(-1, 1)), "dilation must be >= 1; got (-1, 1)"),
    ("padding_negative", lambda: conv2d_forward(A, W, padding=-1), "padding must be >= 0; got -1"),
    ("padding_pair_negative", lambda: conv2d_forward(A, W, padding=(0, -2)), "padding must be >= 0; got (0, -2)"),
    ("padding_explicit_negative", lambda: conv2d_forward(A, W, padding=((0, -1), (0, 0))), "padding (top, bottom) must be >= 0; got (0, -1)"),
    ("padding_explicit_bad_width", lambda: conv2d_forward(A, W, padding=((0, 0), (1, 2, 3))), "padding (left, right) must be an int or a pair"),
    ("padding_word", lambda: conv2d_forward(A, W, padding="full"), "'same' or 'valid'; got 'full' instead"),
    ("padding_none", lambda: conv2d_backward(DZ, A, W, padding=None), "padding must be an int or a pair (h, w) of ints; got None"),
    ("padding_float", lambda: conv2d_forward(A, W, padding=0.5), "padding must be an int or a pair (h, w) of ints; got 0.5"),
    ("kernel_too_tall", lambda: conv2d_forward(_zeros(1, 4, 9, 3), _zeros(5, 3, 3, 1)), "kernel height 5 (dilated extent 5) is larger than the padded input height 4 (input 4, stride 1, padding 0)"),
    ("kernel_too_wide_padded", lambda: conv2d_forward(_zeros(1, 9, 3, 3), _zeros(3, 6, 3, 1), padding=(0, 1)), "kernel width 6 (dilated extent 6) is larger than the padded input width 5"),
    ("dilated_kernel_too_large", lambda: conv2d_backward(DZ, A, W, dilation=3), "kernel height 3 (dilated extent 7) is larger than the padded input height 5"),
    ("bias_size", lambda: conv2d_forward(A, W, _zeros(1, 1, 1, 3)), "b must have shape (1, 1, 1, 4) to match W (3, 3, 3, 4); got (1, 1, 1, 3)"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in INVALID])
def test_invalid_input_raises_input_error(call, message):
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is InputError, repr(info.value)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- 6. IEEE special values ----------------------------------------------------


def _special_masks(x):
    return np.isnan(x), np.isposinf(x), np.isneginf(x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["A_prev", "W", "dZ"])
@pytest.mark.parametrize("case_id", ["pad0", "same_s2", "dilation2", "stride_gt_kernel"])
def test_special_values_propagate_like_reference(case_id, where, value):
    case = CASES[case_id]
    a, w, _, dz = make_arrays(case, np.float64, 8)
    target = {"A_prev": a, "W": w, "dZ": dz}[where]
    target[tuple(n // 2 for n in target.shape)] = value
    got = (conv2d_forward(a, w, **case.kwargs), *conv2d_backward(dz, a, w, **case.kwargs))
    want = (conv2d_forward_loops(a, w, **case.kwargs), *conv2d_backward_loops(dz, a, w, **case.kwargs))
    for name, x, y in zip(("Z", "dA_prev", "dW", "db"), got, want):
        for mask_got, mask_want in zip(_special_masks(x), _special_masks(y)):
            np.testing.assert_array_equal(mask_got, mask_want, err_msg=name)
        finite = np.isfinite(y)
        np.testing.assert_allclose(x[finite], y[finite], rtol=1e-10, atol=1e-12, err_msg=name)


def test_nan_in_input_gives_nan_in_dw_only_where_read():
    """5x5 input, 3x3 kernel, stride 1, no padding: every kernel offset reads pixel (2, 2)."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 5, 5, 2))
    w = rng.standard_normal((3, 3, 2, 3))
    dz = rng.standard_normal((2, 3, 3, 3))
    a[0, 2, 2, 0] = np.nan
    grads = conv2d_backward(dz, a, w, stride=1, padding=0)
    assert np.isnan(grads.dW[:, :, 0, :]).all()
    assert np.isfinite(grads.dW[:, :, 1, :]).all()
    assert np.isfinite(grads.dA_prev).all() and np.isfinite(grads.db).all()
    # With stride 3 and a 2x2 kernel pixel (2, 2) is never read: no NaN anywhere.
    grads = conv2d_backward(rng.standard_normal((2, 2, 2, 3)), a, w[:2, :2], stride=3, padding=0)
    assert all(np.isfinite(g).all() for g in grads)


# --- the batch split across threads and the per-sample GEMM groups ------------


@pytest.mark.parametrize("m, threads, flops, expected", [
    (10, 2, 1e12, [(0, 5), (5, 10)]),
    (7, 3, 1e12, [(0, 2), (2, 4), (4, 7)]),
    (1, 4, 1e12, [(0, 1)]),                     # fewer samples than threads
    (8, 4, 2.5 * MIN_SLICE_FLOPS, [(0, 4), (4, 8)]),  # too little work for four threads
    (8, 2, 0.0, [(0, 8)]),
])
def test_batch_slices_cover_the_batch_in_order(m, threads, flops, expected):
    assert [(s.start, s.stop) for s in batch_slices(m, threads, flops)] == expected


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case_id", ["int_pad", "same_s1", "dilation2", "pad0", "m1", "same_s2", "kernel_1x1"])
def test_threaded_split_matches_loop_reference(case_id, threads, monkeypatch):
    """Every batch split the kernel may make, down to one sample a thread, against the oracle."""
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = CASES[case_id]._replace(a_shape=(5, *CASES[case_id].a_shape[1:]))
    for dtype in DTYPES:
        assert_gradients_match_reference(case, dtype, seed=21, threads=threads)


def test_threaded_result_is_reproducible_and_close_to_serial():
    """A batch big enough to be split: the same bits on every call, and the serial result to rounding."""
    rng = np.random.default_rng(5)
    a, w, dz = rng.standard_normal((8, 32, 32, 16)), rng.standard_normal((3, 3, 16, 16)), rng.standard_normal((8, 32, 32, 16))
    assert len(batch_slices(8, 2, 4.0 * 8 * 32 * 32 * 9 * 16 * 16)) == 2
    first, again = (conv2d_backward(dz, a, w, padding=1, threads=2) for _ in range(2))
    serial = conv2d_backward(dz, a, w, padding=1, threads=1)
    for name, x, y, z in zip(("dA_prev", "dW", "db"), first, again, serial):
        np.testing.assert_array_equal(x, y, err_msg=name)
        np.testing.assert_allclose(x, z, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case_id", ["dw_and_da", "stride2", "stride3_1x1"])
def test_float64_sums_keep_the_digits_the_default_rounds_off(case_id, threads, monkeypatch):
    """float64_sums (the graph layer's partials): dW and db in float64, the default's values once
    rounded to float32, and not all of them float32 numbers already (the sums kept their digits)."""
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = COMPILED_CASES[case_id]._replace(a_shape=(4, *COMPILED_CASES[case_id].a_shape[1:]))
    a, w, _, dz = make_arrays(case, np.float32, 9)
    geometry = backward_geometry(dz.shape, a.shape, w.shape, ConvParams.parse(case.stride, case.padding, case.dilation))
    rounded = dconv.kernel.backward_kernel(dz, a, w, geometry, threads=threads)
    sums = dconv.kernel.backward_kernel(dz, a, w, geometry, threads=threads, float64_sums=True)
    np.testing.assert_array_equal(sums.dA_prev, rounded.dA_prev)
    for name in ("dW", "db"):
        got, want = getattr(sums, name), getattr(rounded, name)
        assert got.dtype == np.float64 and want.dtype == np.float32, name
        np.testing.assert_array_equal(got.astype(np.float32), want, err_msg=name)
        assert (got != got.astype(np.float32)).any(), name


def test_threaded_split_waits_for_every_slice_when_one_fails(monkeypatch):
    """The calling thread runs the first slice: if it raises, the call still waits for the
    slices running in the pool before the error reaches the caller."""
    import threading
    import time

    finished = []

    def one_slice(dZ, A_prev, W, geometry, out=None):
        if threading.current_thread() is threading.main_thread():
            raise MemoryError("first slice")
        time.sleep(0.2)
        finished.append(dZ.shape[0])
        return out, np.zeros(W.shape), np.zeros(W.shape[3])

    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    monkeypatch.setattr(dconv.kernel, "_backward_one", one_slice)   # backward_kernel hands it to the threads
    case = CASES["int_pad"]._replace(a_shape=(4, 6, 5, 2))
    a, w, _, dz = make_arrays(case, np.float64, 3)
    with pytest.raises(MemoryError, match="first slice"):
        conv2d_backward(dz, a, w, threads=2, **case.kwargs)
    assert finished == [2]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_threaded_split_keeps_special_values_where_the_reference_puts_them(monkeypatch):
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = CASES["int_pad"]._replace(a_shape=(4, 6, 5, 2))
    a, w, _, dz = make_arrays(case, np.float64, 3)
    a[3, 2, 2, 1] = np.inf          # in the second slice only
    dz[0, 1, 1, 0] = np.nan         # in the first slice only
    got = conv2d_backward(dz, a, w, threads=2, **case.kwargs)
    want = conv2d_backward_loops(dz, a, w, **case.kwargs)
    for name, x, y in zip(("dA_prev", "dW", "db"), got, want):
        for mask_got, mask_want in zip(_special_masks(x), _special_masks(y)):
            np.testing.assert_array_equal(mask_got, mask_want, err_msg=name)


@pytest.mark.parametrize("m", [1, 4, 5, 7, 11])
def test_weight_grad_in_groups_with_samples_left_over(m):
    """2x2 images, a 3x3 kernel and 8 channels: dW is summed over groups of several samples
    (taps * C > Hp * Wp), with a shorter last group when m is not a multiple."""
    case = Case((m, 2, 2, 3), (3, 3, 3, 8), padding=1)
    for dtype in DTYPES:
        a, w, b, dz = make_arrays(case, dtype, m)
        got = conv2d_backward(dz, a, w, threads=1, **case.kwargs)
        for name, x, y in zip(("dA_prev", "dW", "db"), got, reference(case, a, w, b, dz)[1:]):
            assert rel_err(x, y) <= TOL[np.dtype(dtype)], (name, rel_err(x, y))


ALLOCATION_CASES = [
    Case((6, 12, 12, 4), (3, 3, 4, 8), padding=1),                 # stride 1, per-sample GEMMs
    Case((7, 3, 3, 3), (3, 3, 3, 16), padding=1),                  # stride 1, dW in groups of samples
    Case((6, 10, 9, 5), (2, 3, 5, 4), padding="same", dilation=2),
    Case((6, 8, 8, 6), (1, 1, 6, 7)),
    Case((6, 11, 11, 4), (3, 3, 4, 6), stride=2, padding=1),       # im2col
    Case((6, 11, 11, 16), (3, 3, 16, 32), stride=2, padding=1),    # compiled: the dW loop and the phases
    Case((4, 10, 10, 16), (1, 1, 16, 128), stride=2),              # compiled, a dZ grid wider than the input
    Case((5, 9, 9, 16), (3, 3, 16, 32), padding=1),                # compiled, stride 1
]
ALLOCATION_IDS = ["s1", "s1-groups", "s1-dilated", "1x1", "s2", "s2-compiled", "1x1-s2-compiled", "s1-compiled"]
ALLOCATION_THREADS = [1, 2]


@pytest.mark.parametrize("threads", ALLOCATION_THREADS)
@pytest.mark.parametrize("case", ALLOCATION_CASES, ids=ALLOCATION_IDS)
def test_kernel_allocates_within_its_documented_bound(case, threads):
    peak, bound = _peak_allocation(case, threads)
    assert peak <= bound + 64 * 1024, (peak, bound)


_PEAK_ALLOCATION = """
import json, sys, tracemalloc
sys.path.insert(0, {tests!r})
import numpy as np
import dconv.kernel.threads
from _kernel_cases import Case, make_arrays
from dconv.kernel import backward_kernel, backward_working_set
from dconv.params import ConvParams, backward_geometry

dconv.kernel.threads.MIN_SLICE_FLOPS = 0.0
found = []
for case, threads in {runs!r}:
    a, w, _, dz = make_arrays(case, np.float64, 2)
    geometry = backward_geometry(dz.shape, a.shape, w.shape, ConvParams.parse(**case.kwargs))
    backward_kernel(dz, a, w, geometry, threads=threads)   # warm up: imports, thread pool
    tracemalloc.start()
    backward_kernel(dz, a, w, geometry, threads=threads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    found.append([peak, backward_working_set(a.shape[0], geometry, a.shape[3], w.shape[3], 8, threads=threads)])
print(json.dumps(found))
"""


@functools.lru_cache(maxsize=1)
def _peak_allocations() -> dict[tuple[Case, int], tuple[int, int]]:
    """``(peak bytes allocated by one backward_kernel call, its documented bound)`` of every case and
    thread count, measured one after the other in one fresh interpreter.

    tracemalloc counts every thread's allocations, and in the full suite earlier
    tests leave threads running (distributed's IO loop, tqdm's monitor): in one CI
    run the peak came out about 100 KiB above its usual maximum.
    """
    runs = [(case, threads) for case in ALLOCATION_CASES for threads in ALLOCATION_THREADS]
    code = _PEAK_ALLOCATION.format(tests=str(Path(__file__).parents[1]), runs=runs)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {run: tuple(found) for run, found in zip(runs, json.loads(result.stdout), strict=True)}


def _peak_allocation(case: Case, threads: int) -> tuple[int, int]:
    return _peak_allocations()[case, threads]


# --- the compiled dA_prev loop (dconv/_flatconv.c) ---------------------------------

needs_compiled = pytest.mark.skipif(not dconv.simd_levels(), reason="the compiled helper was not built")

LEVELS = dconv.simd_levels()
"""Every compiled SIMD level this machine runs: each is tested (DCONV_SIMD picks one in production)."""


@pytest.fixture(params=LEVELS or [pytest.param("none", marks=pytest.mark.skip(reason="no compiled level here"))])
def level(request, monkeypatch):
    """Run the test at one SIMD level, with the compiled loops on every layer they can take (not only
    where COMPILED_RULES says they are faster), then restore the process's own level."""
    every = dconv.kernel.dispatch.CompiledRule(*[dconv.kernel.dispatch.ANY] * 3)
    monkeypatch.setitem(dconv.kernel.dispatch.COMPILED_RULES, request.param, every)
    dconv.simd.set_level(request.param)
    yield request.param
    dconv.simd.set_level(None)


COMPILED_CASES = {  # C_prev = 16 (dA_prev) or C = 32 (dW): multiples of the vector widths in both dtypes
    "pad1": Case((3, 9, 11, 16), (3, 3, 16, 5), padding=1),
    "dw_only": Case((2, 6, 7, 5), (3, 3, 5, 32), padding=1),
    "dw_and_da": Case((2, 5, 9, 16), (3, 2, 16, 32), padding="same", dilation=2),
    "dw_channel_tail": Case((3, 4, 4, 20), (2, 2, 20, 64)),
    "stride2": Case((2, 9, 10, 16), (3, 3, 16, 32), stride=2, padding=1),
    "stride_2x3_same_dilated": Case((2, 11, 13, 16), (3, 2, 16, 32), stride=(2, 3), padding="same", dilation=(1, 2)),
    "stride3_1x1": Case((2, 7, 8, 16), (1, 1, 16, 32), stride=3),
    "narrow_3": Case((2, 9, 10, 3), (5, 5, 3, 16), padding=2),      # a first layer: C_prev 3, C 16
    "narrow_1_dilated": Case((3, 7, 6, 1), (3, 2, 1, 32), padding="same", dilation=2),
    "pad0_rect": Case((2, 7, 12, 16), (2, 3, 16, 3)),
    "same_dilated": Case((2, 10, 9, 16), (3, 2, 16, 4), padding="same", dilation=(2, 3)),
    "explicit_asym": Case((1, 6, 17, 16), (3, 3, 16, 2), padding=((0, 2), (1, 0))),
    "kernel_1x1": Case((2, 5, 3, 16), (1, 1, 16, 4)),
    "whole_input": Case((2, 4, 5, 16), (4, 5, 16, 3)),
    "wide_32": Case((1, 3, 20, 32), (3, 3, 32, 8), padding=1),
    "odd_vectors_24": Case((2, 5, 7, 24), (3, 3, 24, 8), padding=1),  # float64: 3 vectors of 8 channels
}


def test_compiled_helper_is_built_where_it_can_be():
    """pip builds dconv/_flatconv.c as an optional extension: on a machine with a C compiler and the
    Python headers it must be there, or a broken build would go unnoticed (the NumPy path hides it)."""
    import shutil
    import sysconfig

    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.exists():
        pytest.skip("no C compiler or Python headers here: the NumPy path is expected")
    assert dconv.kernel.dispatch._flatconv is not None, f"dconv._flatconv was not built; dconv is {dconv.__file__}"


@needs_compiled
@pytest.mark.parametrize("level_name", [*LEVELS, "numpy"])
@pytest.mark.parametrize("case_id", list(COMPILED_CASES))
def test_compiled_loops_match_loop_reference(case_id, level_name):
    case = COMPILED_CASES[case_id]
    geometry = backward_geometry(case.z_shape(), case.a_shape, case.w_shape, ConvParams.parse(**case.kwargs))
    dconv.simd.set_level(level_name)
    try:
        used = []
        for dtype in DTYPES:
            used += [dconv.kernel.dispatch.use_compiled_input_grad(dtype, case.a_shape[3], case.w_shape[3]),
                     dconv.kernel.dispatch.use_compiled_weight_grad(dtype, case.a_shape[3], case.w_shape[3], geometry)]
            assert_gradients_match_reference(case, dtype, seed=4, threads=1)
    finally:
        dconv.simd.set_level(None)
    if level_name == "numpy":
        assert not any(used)


def _random_compiled_cases(n: int, seed: int = 11) -> list[Case]:
    """Strides 1-3, dilations 1-2, every padding form, channel counts the compiled loops take."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        fh, fw = rng.integers(1, 5, 2)
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
        padding = [0, 1, (1, 2), ((0, 2), (1, 0)), "same", "valid"][rng.integers(6)]
        c_prev, c_out = int(rng.choice([1, 3, 16, 32])), int(rng.choice([16, 32]))
        case = Case((int(rng.integers(1, 4)), int(rng.integers(4, 12)), int(rng.integers(4, 12)), c_prev),
                    (int(fh), int(fw), c_prev, c_out), stride=stride, padding=padding, dilation=dilation)
        try:
            case.z_shape()
        except ValueError:                  # the kernel does not fit this input
            continue
        cases.append(case)
    return cases


@needs_compiled
@pytest.mark.parametrize("case", _random_compiled_cases(40), ids=lambda c: f"{c.a_shape}-{c.w_shape}-s{c.stride}-p{c.padding}-d{c.dilation}")
def test_compiled_loops_on_random_layers_match_loop_reference(case, level):
    for dtype in DTYPES:
        assert_gradients_match_reference(case, dtype, seed=13, threads=1)


@needs_compiled
@pytest.mark.parametrize("width", range(1, 27))
def test_compiled_register_blocks_of_every_size(width, level):
    """The C loops cut a row of pixels into blocks of 1-12 pixels, and the rows of dW (C_prev) into
    blocks of 1-16 rows, one C function per size and level: widths and C_prev 1-26 reach every one."""
    cases = [Case((2, 3, width, c), (2, 3, c, c_out), padding=1) for c, c_out in [(32, 32), (16, 16), (8, 16)]]
    cases += [Case((2, 3, width, c), (3, 2, c, 16), padding=1) for c in range(1, 5)]                # narrow dA_prev
    cases += [Case((1, 2, 3, width), (2, 1, width, c_out), padding=(1, 0)) for c_out in (32, 16)]     # dW rows
    for case in cases:
        for dtype in DTYPES:
            assert_gradients_match_reference(case, dtype, seed=width, threads=1)


@needs_compiled
@pytest.mark.parametrize("case_id", ["dw_and_da", "stride2", "narrow_3"])
def test_compiled_loops_in_threads_match_loop_reference(case_id, level, monkeypatch):
    """The compiled loops release the GIL and run slices of a batch side by side."""
    monkeypatch.setattr(dconv.kernel.threads, "MIN_SLICE_FLOPS", 0.0)
    case = COMPILED_CASES[case_id]._replace(a_shape=(5, *COMPILED_CASES[case_id].a_shape[1:]))
    for dtype in DTYPES:
        assert_gradients_match_reference(case, dtype, seed=8, threads=2)


@needs_compiled
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["A_prev", "dZ"])
@pytest.mark.parametrize("case_id", ["dw_and_da", "stride2"])
def test_compiled_loops_keep_special_values_where_the_reference_puts_them(where, case_id):
    case = COMPILED_CASES[case_id]
    a, w, _, dz = make_arrays(case, np.float32, 6)
    {"A_prev": a, "dZ": dz}[where][1, 3, 4, 3] = np.nan
    got = conv2d_backward(dz, a, w, threads=1, **case.kwargs)
    want = conv2d_backward_loops(dz, a, w, **case.kwargs)
    for name, x, y in zip(("dA_prev", "dW", "db"), got, want):
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=name)


@needs_compiled
@pytest.mark.parametrize("rows, columns", [(1, 1), (7, 3), (1030, 32), (61, 300)])
def test_compiled_column_sums_are_the_float64_sums(rows, columns):
    from dconv import _flatconv

    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, columns)) * 10.0 ** rng.integers(-3, 6, (rows, columns))).astype(np.float32)
    x[::2] += 1e6                       # terms that cancel: a float32 sum would lose them
    x[1::2] -= 1e6
    out = np.full(columns, 0.5)
    _flatconv.column_sums(x, rows, columns, out)
    want = 0.5 + x.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-9 * np.abs(x).sum(axis=0).max())


@needs_compiled
def test_compiled_loop_refuses_buffers_it_cannot_use():
    from dconv import _flatconv

    D, Wt, out = np.zeros((100, 4), np.float32), np.zeros((1, 4, 16), np.float32), np.zeros((1, 3, 3, 16), np.float32)
    offsets = np.zeros(1, np.intp)
    args = (100, 0, 1, 25, 3, 3, 5, 4, 16)                     # d_rows, base, m, sample, H, W, cols, C, C_prev
    layout = (0, 144, 48, 16)                                  # out's first element, sample, row and pixel steps

    def call(D=D, Wt=Wt, offsets=offsets, args=args, out=out, layout=layout):
        _flatconv.input_grad(LEVELS[0], D, Wt, offsets, *args, out, layout)

    call()                                                     # fits: no error
    call(args=(*args[:4], 2, 2, *args[6:]), layout=(0, 144, 96, 32))    # pixels (0, 0), (0, 2), (2, 0), (2, 2)
    with pytest.raises(ValueError, match="Wt must be a native float buffer"):
        call(Wt=Wt.astype(np.float64))
    with pytest.raises(ValueError, match="offsets must be a native intp buffer"):
        call(offsets=offsets.astype(np.int32))
    with pytest.raises(ValueError, match="does not fit"):
        call(args=(100, 90, *args[2:]))
    with pytest.raises(ValueError, match="not a multiple of the vector width, nor at most 4"):
        call(Wt=np.zeros((1, 4, 8), np.float32), args=(*args[:-1], 8), out=np.zeros((1, 3, 3, 8), np.float32),
             layout=(0, 72, 24, 8))
    with pytest.raises(ValueError, match="not a multiple of the vector width, nor at most 4"):  # narrow, but C = 4
        call(Wt=np.zeros((1, 4, 3), np.float32), args=(*args[:-1], 3), out=np.zeros((1, 3, 3, 3), np.float32),
             layout=(0, 27, 9, 3))
    with pytest.raises(ValueError, match="not C-contiguous"):
        call(out=out[..., ::2])
    with pytest.raises(ValueError, match="out must be a native float buffer of at least 160 items"):
        call(layout=(16, 144, 48, 16))                         # the last pixel would end past out
    with pytest.raises(ValueError, match="bad layout"):
        call(layout=(0, 144, 48, 8))                           # pixels overlapping
    P, dZ, dW = np.zeros((100, 4), np.float32), np.zeros((1, 3, 3, 32), np.float32), np.zeros((1, 4, 32))
    wargs = (100, 1, 25, 10, 2, 3, 3, 4, 4)                     # p_rows, m, sample, row_step, col_step, n_H, n_W, C_prev, rows
    _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs, 32, dW)
    _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs[:-1], 8, 32, np.zeros((1, 8, 32)))   # rows spanning 2 pixels
    with pytest.raises(ValueError, match="out must be a native float buffer"):
        _flatconv.weight_grad(LEVELS[0], P, dZ, offsets, *wargs, 32, dW.astype(np.float32))
    with pytest.raises(ValueError, match="do not fit the 20 rows of P"):   # the last pixel reads row 24
        _flatconv.weight_grad(LEVELS[0], P[:20], dZ, offsets, 20, *wargs[1:], 32, dW)
    with pytest.raises(ValueError, match="do not fit the 25 rows of P"):   # 8 values from row 24 run past it
        _flatconv.weight_grad(LEVELS[0], P[:25], dZ, offsets, 25, *wargs[1:-1], 8, 32, np.zeros((1, 8, 32)))
    with pytest.raises(ValueError, match="not a multiple of the vector width"):
        _flatconv.weight_grad(LEVELS[0], P, np.zeros((1, 3, 3, 8), np.float32), offsets, *wargs, 8, np.zeros((1, 4, 8)))


@needs_compiled
def test_compiled_loops_refuse_a_level_they_cannot_run():
    from dconv import _flatconv

    P, dZ, dW, offsets = np.zeros((100, 4)), np.zeros((1, 3, 3, 8)), np.zeros((1, 4, 8)), np.zeros(1, np.intp)
    wargs = (100, 1, 25, 10, 2, 3, 3, 4, 4)
    with pytest.raises(ValueError, match="SIMD level sse9 is not compiled into this build"):
        _flatconv.weight_grad("sse9", P, dZ, offsets, *wargs, 8, dW)
    lacking = [name for name in ("avx512", "avx2") if name not in LEVELS]
    if platform.machine() in ("x86_64", "AMD64") and lacking:      # compiled in, but this CPU lacks it
        with pytest.raises(ValueError, match=f"SIMD level {lacking[0]}: this CPU cannot run it"):
            _flatconv.weight_grad(lacking[0], P, dZ, offsets, *wargs, 8, dW)


def test_every_level_has_a_rule():
    assert set(dconv.kernel.dispatch.COMPILED_RULES) == set(dconv.simd.LEVELS)


FMA_LEVELS = [name for name in LEVELS if name != "baseline"]


@pytest.mark.skipif(len(FMA_LEVELS) < 2, reason=f"one level with FMA runs here ({FMA_LEVELS}): nothing to compare")
@pytest.mark.parametrize("case_id", ["pad1", "dw_and_da", "stride2", "narrow_3", "odd_vectors_24"])
def test_levels_with_fma_give_the_same_bits(case_id, monkeypatch):
    """avx512, avx2 and neon sum the same terms in the same order with one rounding each: a job that
    moves between CPU types gets the same dA_prev, dW and db on the layers the loops take."""
    every = dconv.kernel.dispatch.CompiledRule(*[dconv.kernel.dispatch.ANY] * 3)
    case = COMPILED_CASES[case_id]
    for dtype in DTYPES:
        a, w, _, dz = make_arrays(case, dtype, 21)
        results = []
        for name in FMA_LEVELS:
            monkeypatch.setitem(dconv.kernel.dispatch.COMPILED_RULES, name, every)
            dconv.simd.set_level(name)
            try:
                results.append(conv2d_backward(dz, a, w, threads=1, **case.kwargs))
            finally:
                dconv.simd.set_level(None)
        for other in results[1:]:
            for name, x, y in zip(("dA_prev", "dW", "db"), results[0], other):
                np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_threads_must_be_a_positive_int(bad):
    a, w, dz = np.zeros((1, 3, 3, 1)), np.zeros((1, 1, 1, 1)), np.zeros((1, 3, 3, 1))
    with pytest.raises(InputError, match=r"^threads must be a positive int or None; got "):
        conv2d_backward(dz, a, w, threads=bad)


def test_default_threads_follow_blas():
    assert dconv.kernel.blas_threads() >= 1


# --- import hygiene ------------------------------------------------------------


@pytest.mark.parametrize("module", ["dconv", "dconv.kernel"])
def test_import_does_not_pull_in_dask(module):
    code = f"import sys, {module}; assert 'dask' not in sys.modules, sorted(m for m in sys.modules if 'dask' in m)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

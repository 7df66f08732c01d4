"""dconv.reference: the loop oracle itself, checked against hand-computed values and an
independent shifted-slice implementation that shares no code with dconv."""

from __future__ import annotations

import numpy as np
import pytest

from dconv.reference import conv2d_backward_loops, conv2d_forward_loops

from _kernel_cases import CASES, independent_geometry, make_arrays, rel_err


def shifted_slice_forward(case, a, w):
    """Z = sum over kernel offsets of a strided slice of the padded input times W[kh, kw]."""
    ((pt, pb), (pl, pr)), (sh, sw), (dh, dw) = independent_geometry(case)
    padded = np.pad(a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    fh, fw = w.shape[:2]
    n_h = (padded.shape[1] - (fh - 1) * dh - 1) // sh + 1
    n_w = (padded.shape[2] - (fw - 1) * dw - 1) // sw + 1
    z = np.zeros((a.shape[0], n_h, n_w, w.shape[3]))
    for kh in range(fh):
        for kw in range(fw):
            rows = padded[:, kh * dh :: sh][:, :n_h]
            block = rows[:, :, kw * dw :: sw][:, :, :n_w]
            z += block @ w[kh, kw]
    return z


def test_hand_computed_forward():
    a = np.arange(9.0).reshape(1, 3, 3, 1)
    w = np.array([[1.0, 0.0], [0.0, -1.0]]).reshape(2, 2, 1, 1)
    z = conv2d_forward_loops(a, w, np.array([[[[0.5]]]]))
    np.testing.assert_array_equal(z, np.full((1, 2, 2, 1), -4.0 + 0.5))


def test_hand_computed_stride_dilation_padding():
    a = np.arange(25.0).reshape(1, 5, 5, 1)
    w = np.ones((2, 2, 1, 1))
    z = conv2d_forward_loops(a, w, stride=2, dilation=2, padding=((0, 1), (0, 0)))
    # Padded height 6, dilated extent 3: windows start at rows 0, 2 and cols 0, 2; the pad row is unused.
    x = a[0, :, :, 0]
    expected = np.array([[x[i, j] + x[i, j + 2] + x[i + 2, j] + x[i + 2, j + 2] for j in (0, 2)] for i in (0, 2)])
    np.testing.assert_array_equal(z[0, :, :, 0], expected)


def test_hand_computed_backward():
    """1x1 input, 'same' 3x3 kernel: only the kernel centre touches the real pixel."""
    a = np.array([[[[2.0]]]])
    w = np.arange(9.0).reshape(3, 3, 1, 1)
    dz = np.array([[[[3.0]]]])
    grads = conv2d_backward_loops(dz, a, w, padding="same")
    assert grads.dA_prev.shape == (1, 1, 1, 1) and grads.dA_prev[0, 0, 0, 0] == 3.0 * 4.0
    expected_dw = np.zeros((3, 3, 1, 1))
    expected_dw[1, 1] = 6.0
    np.testing.assert_array_equal(grads.dW, expected_dw)
    np.testing.assert_array_equal(grads.db, [[[[3.0]]]])


@pytest.mark.parametrize("case_id", list(CASES))
def test_forward_matches_shifted_slices(case_id):
    case = CASES[case_id]
    a, w, _, _ = make_arrays(case, np.float64, 11)
    assert rel_err(conv2d_forward_loops(a, w, **case.kwargs), shifted_slice_forward(case, a, w)) <= 1e-12


@pytest.mark.parametrize("case_id", list(CASES))
def test_backward_is_adjoint_of_forward(case_id):
    """<Z, G> == <A, dA(G)> == <W, dW(G)>, and db is the sum of G."""
    case = CASES[case_id]
    a, w, _, g = make_arrays(case, np.float64, 12)
    inner = np.vdot(shifted_slice_forward(case, a, w), g)
    grads = conv2d_backward_loops(g, a, w, **case.kwargs)
    assert np.vdot(a, grads.dA_prev) == pytest.approx(inner, rel=1e-12, abs=1e-12)
    assert np.vdot(w, grads.dW) == pytest.approx(inner, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grads.db.ravel(), g.sum(axis=(0, 1, 2)), rtol=1e-12)
    assert grads.dA_prev.shape == a.shape and grads.dW.shape == w.shape


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        ((np.float32, np.float32, np.float32), np.float32),
        ((np.float32, np.float32, np.float64), np.float64),
        ((np.float32, np.float64, np.float32), np.float64),
    ],
)
def test_forward_dtype_includes_bias(dtypes, expected):
    rng = np.random.default_rng(13)
    a, w, b = (rng.standard_normal(s).astype(d) for s, d in zip([(1, 3, 3, 1), (2, 2, 1, 2), (1, 1, 1, 2)], dtypes))
    assert conv2d_forward_loops(a, w, b).dtype == np.dtype(expected)

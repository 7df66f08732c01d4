"""Optional: dconv.kernel against torch.nn.functional.conv2d + autograd. Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dconv import conv2d_backward, conv2d_forward

from _kernel_cases import CASES, DTYPES, TOL, conv_cases, independent_geometry, make_arrays, rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_conv(case, a, w, b, dz):
    """(Z, dA_prev, dW, db) from torch, in the dtype of the inputs, converted back to NHWC/HWIO."""
    ((top, bottom), (left, right)), stride, dilation = independent_geometry(case)
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).requires_grad_()
    k = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_()
    bias = torch.from_numpy(b.ravel().copy()).requires_grad_()
    z = F.conv2d(F.pad(x, (left, right, top, bottom)), k, bias, stride=stride, dilation=dilation)
    z.backward(torch.from_numpy(np.ascontiguousarray(dz.transpose(0, 3, 1, 2))))
    return (
        z.detach().numpy().transpose(0, 2, 3, 1),
        x.grad.numpy().transpose(0, 2, 3, 1),
        k.grad.numpy().transpose(2, 3, 1, 0),
        bias.grad.numpy().reshape(1, 1, 1, -1),
    )


def assert_matches_torch(case, dtype, seed):
    """dconv agrees with torch to TOL; in float32, up to torch's own rounding error as well.

    A float32 sum that cancels (db especially) can leave torch's float32 result further than
    TOL from the truth, so torch float64 on the same values is the truth, dconv must be within
    TOL of it, and dconv may differ from torch float32 by TOL plus torch's own error.
    """
    a, w, b, dz = make_arrays(case, dtype, seed)
    got = (conv2d_forward(a, w, b, **case.kwargs), *conv2d_backward(dz, a, w, **case.kwargs))
    want = torch_conv(case, a, w, b, dz)
    truth = torch_conv(case, *(x.astype(np.float64) for x in (a, w, b, dz)))
    tol = TOL[np.dtype(dtype)]
    for name, x, y, exact in zip(("Z", "dA_prev", "dW", "db"), got, want, truth):
        assert x.dtype == y.dtype == np.dtype(dtype), name
        assert rel_err(x, exact) <= tol, (name, "dconv vs float64 truth", rel_err(x, exact))
        assert rel_err(x, y) <= tol + rel_err(y, exact), (name, rel_err(x, y), rel_err(y, exact))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_torch(case_id, dtype):
    assert_matches_torch(CASES[case_id], dtype, seed=200 + list(CASES).index(case_id))


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_property_matches_torch(case, dtype, seed):
    assert_matches_torch(case, dtype, seed)

"""dconv.classic: conv_forward / conv_backward(dZ, cache) against the loop oracle, and its validation."""

from __future__ import annotations

import numpy as np
import pytest

from dconv import Gradients, InputError, conv_backward, conv_forward
from dconv.reference import conv2d_backward_loops, conv2d_forward_loops

from _kernel_cases import TOL, rel_err

# (A_prev shape, f, n_C, stride, pad); square kernels as in the classic API.
CLASSIC = {
    "pad0_stride1": ((2, 5, 5, 3), 3, 4, 1, 0),
    "pad1_stride1": ((2, 5, 6, 3), 3, 2, 1, 1),
    "pad2_stride2": ((2, 7, 7, 2), 3, 3, 2, 2),
    "pad1_stride3": ((1, 8, 6, 2), 2, 2, 3, 1),
    "pad0_f1": ((3, 4, 4, 2), 1, 3, 1, 0),
    "pad0_whole_input": ((2, 4, 4, 2), 4, 3, 1, 0),
}


def _arrays(shape, f, n_c, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((f, f, shape[3], n_c)).astype(dtype)
    b = rng.standard_normal((1, 1, 1, n_c)).astype(dtype)
    return rng, a, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case_id", list(CLASSIC))
def test_matches_reference(case_id, dtype):
    shape, f, n_c, stride, pad = CLASSIC[case_id]
    rng, a, w, b = _arrays(shape, f, n_c, dtype, seed=list(CLASSIC).index(case_id))
    hparameters = {"stride": stride, "pad": pad}
    z, cache = conv_forward(a, w, b, hparameters)
    a64, w64, b64 = (x.astype(np.float64) for x in (a, w, b))
    z_ref = conv2d_forward_loops(a64, w64, b64, stride=stride, padding=pad)
    assert z.dtype == np.dtype(dtype)
    assert rel_err(z, z_ref) <= TOL[np.dtype(dtype)]

    dz = rng.standard_normal(z.shape).astype(dtype)
    grads = conv_backward(dz, cache)
    assert isinstance(grads, Gradients)
    expected = conv2d_backward_loops(dz.astype(np.float64), a64, w64, stride=stride, padding=pad)
    for name, got, want in zip(grads._fields, grads, expected):
        assert got.dtype == np.dtype(dtype), name
        assert rel_err(got, want) <= TOL[np.dtype(dtype)], name


def test_cache_round_trip():
    _, a, w, b = _arrays((2, 5, 5, 3), 3, 4, np.float64, 20)
    hparameters = {"stride": 2, "pad": 1}
    _, cache = conv_forward(a, w, b, hparameters)
    assert isinstance(cache, tuple) and len(cache) == 4
    assert cache[0] is a and cache[1] is w and cache[2] is b and cache[3] is hparameters
    dz = np.random.default_rng(21).standard_normal((2, 3, 3, 4))
    first = conv_backward(dz, cache)
    second = conv_backward(dz, list(cache))
    for x, y in zip(first, second):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13)


def test_z_includes_bias():
    _, a, w, b = _arrays((2, 4, 5, 2), 3, 3, np.float64, 22)
    z_bias, _ = conv_forward(a, w, b, {"stride": 1, "pad": 1})
    z_zero, _ = conv_forward(a, w, np.zeros_like(b), {"stride": 1, "pad": 1})
    np.testing.assert_allclose(z_bias - z_zero, np.broadcast_to(b, z_bias.shape), rtol=0, atol=1e-12)
    assert np.ptp(b) > 0  # a constant bias would hide a channel mix-up


def test_pad_zero_and_extra_hparameter_keys():
    """pad = 0 works (the teaching version broke) and extra keys are ignored."""
    _, a, w, b = _arrays((1, 3, 3, 1), 3, 1, np.float64, 23)
    z, cache = conv_forward(a, w, b, {"stride": 1, "pad": 0, "note": "x"})
    assert z.shape == (1, 1, 1, 1)
    assert z[0, 0, 0, 0] == pytest.approx(np.sum(a[0, :, :, 0] * w[:, :, 0, 0]) + b.item())
    grads = conv_backward(np.ones_like(z), cache)
    np.testing.assert_allclose(grads.dA_prev[0, :, :, 0], w[:, :, 0, 0])


A = np.zeros((2, 5, 5, 3))
W = np.zeros((3, 3, 3, 4))
B = np.zeros((1, 1, 1, 4))
DZ = np.zeros((2, 3, 3, 4))
GOOD = {"stride": 1, "pad": 0}

INVALID = [
    ("missing_pad", lambda: conv_forward(A, W, B, {"stride": 1}), "hparameters is missing 'pad'; expected keys 'stride' and 'pad', got ['stride']"),
    ("missing_both", lambda: conv_forward(A, W, B, {}), "hparameters is missing 'stride' and 'pad'"),
    ("missing_mixed_keys", lambda: conv_forward(A, W, B, {"stride": 1, 0: 1}), "hparameters is missing 'pad'"),
    ("list_hparameters", lambda: conv_forward(A, W, B, [1, 0]), "hparameters must be a dict with keys 'stride' and 'pad'; got list"),
    ("none_hparameters", lambda: conv_forward(A, W, B, None), "got NoneType instead"),
    ("stride_0", lambda: conv_forward(A, W, B, {"stride": 0, "pad": 0}), "stride must be >= 1; got 0"),
    ("pad_negative", lambda: conv_forward(A, W, B, {"stride": 1, "pad": -1}), "padding must be >= 0; got -1"),
    ("cache_short", lambda: conv_backward(DZ, (A, W, GOOD)), "cache must be the tuple (A_prev, W, b, hparameters) from conv_forward; got tuple of length 3 instead."),
    ("cache_none", lambda: conv_backward(DZ, None), "cache must be the tuple (A_prev, W, b, hparameters) from conv_forward; got NoneType instead."),
    ("cache_dict", lambda: conv_backward(DZ, {"A_prev": A}), "got dict instead"),
    ("cache_bad_hparameters", lambda: conv_backward(DZ, (A, W, B, {"pad": 0})), "hparameters is missing 'stride'"),
    ("dz_shape", lambda: conv_backward(np.zeros((2, 5, 5, 4)), (A, W, B, GOOD)), "dZ has shape (2, 5, 5, 4); A_prev (2, 5, 5, 3), W (3, 3, 3, 4), stride 1, padding 0 give (2, 3, 3, 4)."),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in INVALID])
def test_invalid_input_raises_input_error(call, message):
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is InputError, repr(info.value)
    assert message in str(info.value)

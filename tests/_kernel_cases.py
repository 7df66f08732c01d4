"""Shared cases, data builders and hypothesis strategies for the kernel tests."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st

from dconv.params import ConvParams

# Relative error-norm tolerances, always against a float64 reference.
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
DTYPES = [np.float32, np.float64]


class Case(NamedTuple):
    """One convolution configuration: input/kernel shapes and the public keyword arguments."""

    a_shape: tuple[int, int, int, int]  # (m, H, W, C_prev)
    w_shape: tuple[int, int, int, int]  # (fh, fw, C_prev, C)
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def z_shape(self) -> tuple[int, ...]:
        params = ConvParams.parse(self.stride, self.padding, self.dilation)
        out_hw = params.resolve(self.a_shape[1:3], self.w_shape[:2]).out_hw
        return (self.a_shape[0], *out_hw, self.w_shape[3])


# Every padding form, strides 1-3, dilations 1-2, rectangular kernels and the edge cases.
CASES = {
    "pad0": Case((2, 5, 5, 3), (3, 3, 3, 4)),
    "int_pad": Case((2, 6, 5, 2), (3, 3, 2, 3), padding=1),
    "pair_pad_stride2": Case((2, 6, 7, 2), (3, 2, 2, 3), stride=2, padding=(1, 2)),
    "explicit_asym": Case((1, 7, 6, 3), (2, 3, 3, 2), stride=(2, 3), padding=((0, 2), (1, 0))),
    "explicit_lists": Case((2, 6, 6, 2), (2, 3, 2, 2), stride=[2, 1], padding=[[2, 1], [0, 1]]),
    "explicit_zero": Case((2, 5, 4, 2), (2, 2, 2, 2), padding=((0, 0), (0, 0))),
    "valid_stride3": Case((2, 8, 7, 2), (3, 3, 2, 2), stride=3, padding="valid"),
    "same_s1": Case((2, 5, 6, 2), (3, 3, 2, 2), padding="same"),
    "same_s2": Case((2, 7, 6, 3), (3, 2, 3, 2), stride=2, padding="same"),
    "same_s3_d2": Case((1, 8, 7, 2), (3, 3, 2, 2), stride=3, padding="same", dilation=2),
    "same_even_kernel": Case((2, 5, 5, 2), (2, 4, 2, 3), padding="SAME"),
    "same_s2_mixed": Case((1, 6, 9, 2), (2, 3, 2, 2), stride=(2, 3), padding="same", dilation=(1, 2)),
    "dilation2": Case((2, 8, 9, 2), (3, 2, 2, 3), padding=1, dilation=2),
    "dilation_pair": Case((1, 9, 8, 2), (2, 3, 2, 2), stride=(1, 2), dilation=(2, 1)),
    "kernel_1x1": Case((2, 4, 5, 3), (1, 1, 3, 4)),
    "kernel_1x1_stride2_pad": Case((2, 5, 5, 3), (1, 1, 3, 2), stride=2, padding=1),
    "kernel_1x1_stride_2x3": Case((2, 5, 7, 3), (1, 1, 3, 2), stride=(2, 3)),
    "m1": Case((1, 5, 5, 1), (3, 3, 1, 1), padding=1),
    "output_1x1": Case((2, 3, 3, 2), (3, 3, 2, 2)),
    "kernel_whole_input_rect": Case((2, 4, 3, 2), (4, 3, 2, 3), stride=2),
    "kernel_whole_padded_input": Case((1, 3, 3, 2), (5, 5, 2, 2), padding=1),
    "stride_gt_kernel": Case((2, 7, 7, 2), (2, 2, 2, 2), stride=3),
    "stride_leftover": Case((1, 8, 8, 1), (3, 3, 1, 2), stride=3, padding=1),
    "one_pixel_input": Case((2, 1, 1, 2), (1, 1, 2, 3), stride=2, padding="same"),
}


def make_arrays(case: Case, dtype: Any, seed: int):
    """Random ``(A_prev, W, b, dZ)`` for ``case`` in ``dtype``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(case.a_shape).astype(dtype)
    w = rng.standard_normal(case.w_shape).astype(dtype)
    b = rng.standard_normal((1, 1, 1, case.w_shape[3])).astype(dtype)
    dz = rng.standard_normal(case.z_shape()).astype(dtype)
    return a, w, b, dz


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute if ``expected`` is zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in arrays]


# --- hypothesis -------------------------------------------------------------

pairs_1_3 = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
pairs_1_2 = st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2)))


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


paddings = st.one_of(
    st.integers(0, 2),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.tuples(
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
    ),
    st.sampled_from(["valid", "same", "SAME"]),
)


def _explicit_pads(padding: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        return ((0, 0), (0, 0))  # "same" never needs a minimum input size
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return padding


@st.composite
def conv_cases(draw) -> Case:
    """A small valid :class:`Case`: the input is always at least as large as the dilated kernel needs."""
    stride, dilation, padding = draw(pairs_1_3), draw(pairs_1_2), draw(paddings)
    fh, fw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = _explicit_pads(padding)
    sizes = []
    for f, d, (lo, hi) in zip((fh, fw), _pair(dilation), pads):
        smallest = max(1, (f - 1) * d + 1 - lo - hi)
        sizes.append(draw(st.integers(smallest, smallest + 5)))
    m, c_prev, c = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return Case((m, sizes[0], sizes[1], c_prev), (fh, fw, c_prev, c), stride, padding, dilation)


# --- independent geometry (no dconv code) ---------------------------------------


def independent_geometry(case: Case):
    """``(pads, stride, dilation)`` per axis for ``case``, TensorFlow rules for "same", written out
    without dconv.params so oracles built on it are independent of the package."""
    stride, dilation = _pair(case.stride), _pair(case.dilation)
    padding = case.padding
    pads = []
    for ax in range(2):
        if isinstance(padding, str):
            n, f, s, d = case.a_shape[1 + ax], case.w_shape[ax], stride[ax], dilation[ax]
            if padding.lower() == "valid":
                pads.append((0, 0))
                continue
            out = -(-n // s)
            total = max((out - 1) * s + (f - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append(tuple(_explicit_pads(padding)[ax]))
    return tuple(pads), stride, dilation

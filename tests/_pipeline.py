"""Shared helpers for the pipeline tests (graph, job, store, CLI, summary)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import zarr

import dconv

# Relative error-norm tolerances of a pipeline result against the single-process kernel.
PIPELINE_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


class Conv(NamedTuple):
    """A small convolution configuration for :func:`make_input` (``tests/conftest.py``)."""

    height: int
    width: int
    kernel: tuple[int, int]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1

    @property
    def params(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def make_kwargs(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "kernel": self.kernel, **self.params}


# Padding forms (int, pair, asymmetric, "same" with stride 2, "valid"), dilation 2, rectangular kernels.
CONVS = {
    "pad1": Conv(8, 8, (3, 3), padding=1),
    "same_stride2": Conv(9, 8, (3, 3), stride=2, padding="same"),
    "asymmetric_pad": Conv(7, 6, (2, 3), stride=(2, 1), padding=((0, 2), (1, 0))),
    "pair_pad_rect_kernel": Conv(6, 7, (3, 2), padding=(1, 2)),
    "dilation2": Conv(9, 8, (3, 2), padding=1, dilation=2),
    "valid_rect_kernel": Conv(7, 8, (1, 3), stride=(1, 2), padding="valid"),
}


def rel_err(actual: Any, expected: Any) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def read_inputs(path: str) -> dict[str, np.ndarray]:
    """The A_prev, dZ and W arrays of an input group, read in full."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in ("A_prev", "dZ", "W")}


def kernel_gradients(arrays: dict[str, np.ndarray], **params: Any) -> dconv.Gradients:
    """The single-process kernel on whole in-memory arrays: the oracle of every pipeline test."""
    return dconv.conv2d_backward(arrays["dZ"], arrays["A_prev"], arrays["W"], **params)


def read_output(path: str) -> dict[str, np.ndarray]:
    """dA_prev, dW and db of a complete output group, read back from Zarr."""
    group = dconv.open_result(str(path))
    return {name: np.asarray(group[name][...]) for name in ("dA_prev", "dW", "db")}


def assert_matches(output: dict[str, np.ndarray], expected: dconv.Gradients, dtype: Any) -> None:
    """Every output array has ``dtype`` and is within the dtype's tolerance of the kernel."""
    tol = PIPELINE_TOL[np.dtype(dtype)]
    for name, want in zip(("dA_prev", "dW", "db"), expected):
        got = output[name]
        assert got.dtype == np.dtype(dtype), (name, got.dtype)
        err = rel_err(got, want)
        assert err <= tol, (name, err, tol)


def provenance(path: str) -> dict[str, Any]:
    return dict(zarr.open_group(str(path), mode="r").attrs["dconv"])

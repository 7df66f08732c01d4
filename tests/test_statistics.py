"""dconv.statistics: a chunk's values are the layout's stats entries, and the figures from known sums."""

from __future__ import annotations

import numpy as np
import pytest

from dconv.kernel import conv2d_backward
from dconv.statistics import STATS, TOP, TOP_DTYPE, TOP_SAMPLES, chunk_values, format_stats, noise_figures
from dconv.store import OUTPUT_LAYOUT, Kind


def test_a_chunk_s_values_are_the_layout_s_stats_entries():
    """One value per BLOCK and REDUCE entry of the stats part, with the shapes and dtypes the table places."""
    rng = np.random.default_rng(3)
    A_prev, dZ = rng.standard_normal((5, 6, 6, 2)), rng.standard_normal((5, 6, 6, 3))
    W = rng.standard_normal((3, 3, 2, 3))
    grads = conv2d_backward(dZ, A_prev, W, padding=1, stats=True)
    values = chunk_values(grads.stats, first=10)
    shapes = {"A_prev": A_prev.shape, "dZ": dZ.shape, "W": W.shape}
    entries = [e for e in OUTPUT_LAYOUT if e.part == STATS and e.kind in (Kind.BLOCK, Kind.REDUCE)]
    assert list(values) == [entry.name for entry in entries]
    for entry in entries:
        shape = (entry.partial_shape or entry.shape)(shapes)
        dtype = entry.partial_dtype if entry.kind is Kind.REDUCE else entry.dtype
        assert values[entry.name].shape == tuple(shape) and values[entry.name].dtype == np.dtype(dtype), entry.name
    top = values[TOP]
    assert top.dtype == TOP_DTYPE and top.shape == (TOP_SAMPLES,)
    assert sorted(top["index"][top["index"] >= 0]) == list(range(10, 15))


@pytest.mark.parametrize(
    "m, grad_sum_norm2, sum_sample_norm2, noise_scale",
    [(4, 40.0, 16.0, 1.0), (1, 4.0, 4.0, None), (4, 4.0, 16.0, None)],
    ids=["defined", "one-sample", "lost-in-noise"],
)
def test_noise_figures_and_their_lines(m, grad_sum_norm2, sum_sample_norm2, noise_scale):
    """m = 4, |S|^2 = 40, sum_i |g_i|^2 = 16: |G|^2 = (40 - 16) / 12 = 2, tr = (16 - 40 / 4) / 3 = 2, noise scale 1."""
    figures = noise_figures(grad_sum_norm2, sum_sample_norm2, m)
    assert figures["noise_scale"] == (pytest.approx(noise_scale) if noise_scale is not None else None)
    lines = format_stats({**figures, "top_samples": {"index": [3], "sample_grad_norm2": [None]}})
    assert lines[0] == f"  gradient statistics over m = {m} samples (g_i: the gradient of sample i; S = sum_i g_i):"
    assert ("undefined" in lines[1]) == (noise_scale is None) and lines[-1] == "    largest |g_i|^2: sample 3 (undefined)"

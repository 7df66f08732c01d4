"""The per-sample gradient statistics of a job, in one place: their names, how chunks' values
combine, the figures a finished job records and how ``inspect`` prints them. Pure NumPy.

With ``--stats``, each chunk task's kernel (:mod:`dconv.kernel.stats`) returns each sample's
``|g_i|^2`` and the sums of squares ``sum_i dW_i^2``, ``sum_i db_i^2``; with the chunk's
top list (:func:`top_samples`) these are the chunk's statistics values (:func:`chunk_values`),
one per entry of the output layout's ``stats`` part (:data:`dconv.store.layout.OUTPUT_LAYOUT`,
whose entries point at the functions here). The tree reduction adds the sums and merges the
top lists (:func:`merge_top`); at the finish :func:`gradient_figures` turns them into the
provenance's ``stats`` attribute (:func:`noise_figures`: the gradient noise scale), which
``dconv inspect`` prints (:func:`format_stats`).

A new per-sample array: its name and value here (:func:`chunk_values`), its entry in the layout table.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from dconv.kernel.stats import GradientStats

__all__ = [
    "DB_SQ",
    "DW_SQ",
    "SAMPLE_GRAD_NORM2",
    "STATS",
    "TOP",
    "TOP_DTYPE",
    "TOP_SAMPLES",
    "chunk_values",
    "exact_sum",
    "format_stats",
    "gradient_figures",
    "merge_top",
    "noise_figures",
    "top_samples",
    "top_samples_bytes",
]

STATS = "stats"
"""The job option, the output subgroup and the provenance key of the statistics."""

SAMPLE_GRAD_NORM2 = f"{STATS}/sample_grad_norm2"
"""Each sample's ``|g_i|^2 = |dW_i|^2 + |db_i|^2``: float64, shape (m,), an array along m."""

DW_SQ = f"{STATS}/dW_sq"
"""``sum_i dW_i * dW_i``, elementwise: float64, shape (fh, fw, C_prev, C)."""

DB_SQ = f"{STATS}/db_sq"
"""``sum_i db_i * db_i``, elementwise: float64, shape (1, 1, 1, C)."""

TOP = f"{STATS}/top_samples"
"""The largest ``|g_i|^2`` with their sample indices (:data:`TOP_DTYPE`, shape (:data:`TOP_SAMPLES`,));
kept only to make a figure."""


def chunk_values(stats: GradientStats, first: int) -> dict[str, np.ndarray]:
    """A chunk task's statistics values by name, from the kernel's ``stats`` of samples ``first, first + 1, ...``.

    Returns
    -------
    dict
        :data:`SAMPLE_GRAD_NORM2` (b,), :data:`DW_SQ` (fh, fw, C_prev, C), :data:`DB_SQ`
        (1, 1, 1, C), all float64, and :data:`TOP`, the chunk's top list (:func:`top_samples`).
    """
    return {
        SAMPLE_GRAD_NORM2: stats.sample_grad_norm2,
        DW_SQ: stats.dW_sq,
        DB_SQ: stats.db_sq,
        TOP: top_samples(stats.sample_grad_norm2, first),
    }


TOP_SAMPLES = 10
"""How many of the largest ``|g_i|^2`` a job keeps (:func:`top_samples`)."""

TOP_DTYPE = np.dtype([("index", "<i8"), ("norm2", "<f8")])
"""One entry of a top list: the sample's index in the batch, and its ``|g_i|^2``. Unused entries have index -1."""


def _top_order(entries: np.ndarray) -> np.ndarray:
    """Indices that sort ``entries`` (TOP_DTYPE) largest ``norm2`` first, NaN first of all (the worst
    outlier), ties by sample index; unused entries (index -1) last."""
    unused = entries["index"] < 0
    nan = np.isnan(entries["norm2"])
    value = np.where(nan | unused, 0.0, entries["norm2"])
    return np.lexsort((entries["index"], -value, ~nan, unused))


def top_samples(norm2: np.ndarray, first: int, k: int = TOP_SAMPLES) -> np.ndarray:
    """The ``k`` largest of ``norm2`` with their sample indices, ``first`` being that of ``norm2[0]``.

    Parameters
    ----------
    norm2 : ndarray, float64, shape (b,)
        ``|g_i|^2`` of consecutive samples.

    Returns
    -------
    ndarray of TOP_DTYPE, shape (k,)
        Largest first (NaN before any number, ties by index); index -1 pads a list of fewer than ``k``.
    """
    entries = np.zeros(norm2.shape[0], dtype=TOP_DTYPE)
    entries["index"] = np.arange(first, first + norm2.shape[0])
    entries["norm2"] = norm2
    return _pad_top(entries[_top_order(entries)][:k], k)


def top_samples_bytes(b: int) -> int:
    """An upper bound on what :func:`top_samples` allocates for ``b`` norms: its entries and sort keys."""
    return 128 * b + 4096


def merge_top(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The top list of two batches' top lists (TOP_DTYPE, shape (k,)): the same whatever the tree that merges them."""
    both = np.concatenate([left, right])
    return both[_top_order(both)][: left.shape[0]]


def _pad_top(entries: np.ndarray, k: int) -> np.ndarray:
    top = np.zeros(k, dtype=TOP_DTYPE)
    top["index"] = -1
    top[: entries.shape[0]] = entries
    return top


def noise_figures(grad_sum_norm2: float, sum_sample_norm2: float, m: int) -> dict[str, float | None]:
    """The batch's gradient figures from ``|S|^2 = |sum_i g_i|^2`` and ``sum_i |g_i|^2`` over ``m`` samples.

    Returns
    -------
    dict
        ``m``; ``sum_sample_norm2``; ``grad_sum_norm2 = |S|^2`` (a model job adds the
        layers' ``|S_l|^2`` and ``sum_i |g_i^l|^2``); ``mean_grad_norm2 = |S / m|^2``;
        ``grad_norm2 = (|S|^2 - sum_i |g_i|^2) / (m (m - 1))``, the unbiased estimate of
        ``|G|^2``; ``trace_cov = (sum_i |g_i|^2 - |S|^2 / m) / (m - 1)``, the trace of the
        unbiased sample covariance; ``noise_scale = trace_cov / grad_norm2`` (B_simple of
        McCandlish et al. 2018). None where a figure is undefined (m = 1; ``grad_norm2 <= 0``
        for the noise scale) or not finite.
    """
    def finite(value: float | None) -> float | None:
        return float(value) if value is not None and np.isfinite(value) else None

    figures: dict[str, float | None] = {
        "m": int(m),
        "sum_sample_norm2": finite(sum_sample_norm2),
        "grad_sum_norm2": finite(grad_sum_norm2),
        "mean_grad_norm2": finite(grad_sum_norm2 / m**2),
        "grad_norm2": None,
        "trace_cov": None,
        "noise_scale": None,
    }
    if m > 1:
        grad_norm2 = (grad_sum_norm2 - sum_sample_norm2) / (m * (m - 1))
        trace_cov = (sum_sample_norm2 - grad_sum_norm2 / m) / (m - 1)
        figures["grad_norm2"], figures["trace_cov"] = finite(grad_norm2), finite(trace_cov)
        if figures["grad_norm2"] is not None and grad_norm2 > 0:
            figures["noise_scale"] = finite(trace_cov / grad_norm2)
    return figures


def exact_sum(*arrays: np.ndarray) -> float:
    """The sum of every value of ``arrays`` (float64), correctly rounded (``math.fsum``)."""
    return math.fsum(np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]).tolist())


def gradient_figures(finished: Mapping[str, Any], sums: Mapping[str, np.ndarray], m: int) -> dict[str, Any]:
    """``attrs["dconv"]["stats"]``: :func:`noise_figures` and the top samples.

    ``|S|^2`` is taken from the float64 tree sums of dW and db (never the stored float32
    dW), ``sum_i |g_i|^2`` from those of ``dW_sq`` and ``db_sq``; each sum is correctly
    rounded (:func:`exact_sum`). ``top_samples`` lists the largest ``|g_i|^2`` first, ``None`` for a non-finite value.
    """
    grad_sum_norm2 = exact_sum(np.square(sums["dW"]), np.square(sums["db"]))
    figures = noise_figures(grad_sum_norm2, exact_sum(sums[DW_SQ], sums[DB_SQ]), m)
    top = sums[TOP]
    top = top[top["index"] >= 0]
    figures["top_samples"] = {
        "index": top["index"].tolist(),
        "sample_grad_norm2": [float(v) if np.isfinite(v) else None for v in top["norm2"].tolist()],
    }
    return figures


def _figure(value: Any) -> str:
    """A figure as ``inspect`` prints it: six significant digits, or ``undefined``."""
    return "undefined" if value is None else f"{value:.6g}"


def _why_undefined(stats: Mapping[str, Any]) -> str:
    """Why the noise scale is undefined (``""`` when it is defined)."""
    if stats.get("noise_scale") is not None:
        return ""
    if stats.get("m", 0) < 2:
        return " (it needs m >= 2 samples)"
    if stats.get("grad_norm2") is not None and stats["grad_norm2"] <= 0:
        return (
            " (the unbiased |G|^2 is not positive: the mean gradient is lost in the samples' noise, "
            "as when the samples share no signal)"
        )
    return " (a term is not finite)"


def format_stats(stats: Mapping[str, Any]) -> list[str]:
    """The lines of ``inspect`` on the gradient statistics: the noise scale, its terms, the top samples."""
    lines = [
        f"  gradient statistics over m = {stats['m']} samples (g_i: the gradient of sample i; S = sum_i g_i):",
        f"    noise scale B_simple = tr(Sigma) / |G|^2 = {_figure(stats['noise_scale'])}{_why_undefined(stats)}",
        f"    |G|^2 (unbiased) = {_figure(stats['grad_norm2'])}, tr(Sigma) = {_figure(stats['trace_cov'])}, "
        f"|S/m|^2 = {_figure(stats['mean_grad_norm2'])}, sum_i |g_i|^2 = {_figure(stats['sum_sample_norm2'])}",
    ]
    top = stats.get("top_samples") or {}
    pairs = [f"{index} ({_figure(value)})" for index, value in zip(top.get("index", []), top.get("sample_grad_norm2", []))]
    if pairs:
        lines.append("    largest |g_i|^2: sample " + ", ".join(pairs))
    return lines

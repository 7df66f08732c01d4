"""A model job's output: one dconv output per layer under ``layers/``, the model's results at the root.

::

    OUT/                          attrs["dconv_model_output"]: the model job's provenance and status,
                                  its layers, and with --stats the model's figures and the per-layer table
    OUT/layers/<name>/            each layer's output, exactly a single-layer job's (dconv.store.output)
    OUT/stats/sample_grad_norm2   (m,) float64, with --stats: each sample's whole-model |g_i|^2,
                                  the sum of its layers' stats/sample_grad_norm2
    OUT/dots/sample_dot           (m, n_q) float64, with --dot: each sample's inner products with the
                                  whole-model queries, the sum of its layers' dots/sample_dot

The root's status is that of the whole job: "running", "interrupted", "failed",
"complete"; each layer output keeps its own, so a resumed job skips the layers
that are complete and continues the others from their records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from dconv.statistics import SAMPLE_GRAD_NORM2, merge_top, noise_figures, top_samples
from dconv.store.layout import SAMPLE_DOT
from dconv.store.lease import LEASE_NAME
from dconv.store.locations import create_group, open_group
from dconv.store.output import StatusGroup, check_output_target, fingerprint, now
from dconv.store.ownership import MODEL_OUTPUT_MARKER, remove_own

__all__ = ["ModelOutput", "MODEL_ATTR", "LAYERS", "model_figures", "NORM_BLOCK"]

MODEL_ATTR = MODEL_OUTPUT_MARKER
"""The root attribute of a model job's output: its provenance and status."""

LAYERS = "layers"
"""The subgroup that holds one output per layer."""

NORM_BLOCK = 2**20
"""Samples per block when the layers' per-sample norms are added (and per chunk of the model's array)."""


@dataclass(frozen=True)
class ModelOutput(StatusGroup):
    """A picklable handle on a model job's output group.

    Attributes
    ----------
    url : str
        Local path or fsspec URL of the output group.
    storage_options : dict
        fsspec options (may hold credentials: never written anywhere).
    """

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)

    ATTRIBUTE: ClassVar[str] = MODEL_ATTR

    def layer_url(self, name: str) -> str:
        """Where layer ``name``'s output goes."""
        return f"{self.url.rstrip('/')}/{LAYERS}/{name}"

    def check_target(self, input_location: str | None, *, overwrite: bool, resume: bool) -> None:
        """Refuse an ``out`` that would lose data, as :meth:`dconv.store.output.OutputStore.check_target` does,
        for a model output: to resume, it must be one; to overwrite, it must be one and nothing more.

        Raises
        ------
        InputError
        """
        check_output_target(self, input_location, overwrite=overwrite, resume=resume, kind="model_output")

    def open(self, identity: Mapping[str, Any], provenance: Mapping[str, Any], *, resume: bool,
             resumed: Mapping[str, Any] | None = None) -> None:
        """Create the root (replacing a model output there, but the lease), or mark it running again to resume."""
        if resume and self.provenance() is not None:
            self.update(status="running", resumed=now(), **dict(resumed or {}))
            return
        if self.provenance() is not None:
            self.update(status="replacing")
        remove_own(self.url, self.storage_options, "model_output", keep=(LEASE_NAME,))
        attributes = {**identity, **provenance, "fingerprint": fingerprint(identity), "started": now(),
                      "status": "running"}
        group = create_group(self.url, self.storage_options, attributes={MODEL_ATTR: attributes})
        group.create_group(LAYERS)

    def write_sample_norms(self, layer_urls: Sequence[str], m: int) -> np.ndarray:
        """``stats/sample_grad_norm2`` (m,): the layers' per-sample ``|g_i|^2`` added, in layer order, a block
        of :data:`NORM_BLOCK` samples at a time; returns the model's top list (:func:`dconv.statistics.top_samples`)."""
        top = None
        for start, total in self._add_layers(SAMPLE_GRAD_NORM2, layer_urls, m, ("m",)):
            block_top = top_samples(total, start)
            top = block_top if top is None else merge_top(top, block_top)
        return top

    def write_sample_dots(self, layer_urls: Sequence[str], m: int) -> None:
        """``dots/sample_dot`` (m, n_q): the layers' inner products with their queries added, in layer order."""
        for _ in self._add_layers(SAMPLE_DOT, layer_urls, m, ("m", "query")):
            pass

    def _add_layers(
        self, name: str, layer_urls: Sequence[str], m: int, dims: tuple[str, ...]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Write array ``name`` of the root, the sum of the layers' arrays ``name`` (float64, along m), a block of
        :data:`NORM_BLOCK` samples at a time, adding in layer order; yields each block's first sample and sum."""
        layers = [open_group(url, "r", self.storage_options)[name] for url in layer_urls]
        tail = tuple(layers[0].shape[1:])
        rows = max(1, min(max(m, 1), NORM_BLOCK // max(1, int(np.prod(tail)))))
        array = self.group().create_array(
            name, shape=(m, *tail), chunks=(rows, *tail), dtype="float64", fill_value=0, compressors=None,
            dimension_names=list(dims), overwrite=True,
        )
        for start, stop in _blocks(m, rows):
            total = np.zeros((stop - start, *tail))
            for layer in layers:
                total += np.asarray(layer[start:stop], dtype=np.float64)
            array[start:stop] = total
            yield start, total

    def finish(self, **provenance: Any) -> None:
        """Record the model's results and set status "complete" (the job's last write)."""
        self.update(**provenance, status="complete", finished=now())


def _blocks(m: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, m, size):
        yield start, min(start + size, m)


def model_figures(layer_stats: Mapping[str, Mapping[str, Any]], m: int, top: np.ndarray) -> dict[str, Any]:
    """The model's gradient figures from its layers' (their ``stats`` provenance, in layer order), and the table.

    ``|S|^2 = sum_l |S_l|^2`` and ``sum_i |g_i|^2 = sum_l sum_i |g_i^l|^2``, each added
    correctly rounded (``math.fsum``) from the layers' float64 figures; then
    :func:`dconv.statistics.noise_figures`. ``layers`` is the per-layer table: each
    layer's figures and its share of the model's ``sum_i |g_i|^2`` and ``|S|^2``.
    """
    grad_sum = {name: _grad_sum_norm2(stats) for name, stats in layer_stats.items()}
    sample_sum = {name: stats.get("sum_sample_norm2") for name, stats in layer_stats.items()}
    known = all(value is not None for value in (*grad_sum.values(), *sample_sum.values()))
    total_grad = math.fsum(grad_sum.values()) if known else float("nan")
    total_sample = math.fsum(sample_sum.values()) if known else float("nan")
    figures = noise_figures(total_grad, total_sample, m)
    valid = top[top["index"] >= 0]
    figures["top_samples"] = {
        "index": valid["index"].tolist(),
        "sample_grad_norm2": [float(v) if np.isfinite(v) else None for v in valid["norm2"].tolist()],
    }
    figures["layers"] = [
        {
            "name": name,
            "sum_sample_norm2": sample_sum[name],
            "grad_sum_norm2": grad_sum[name],
            "noise_scale": stats.get("noise_scale"),
            "share_sum_sample_norm2": _share(sample_sum[name], figures["sum_sample_norm2"]),
            "share_grad_sum_norm2": _share(grad_sum[name], figures["grad_sum_norm2"]),
        }
        for name, stats in layer_stats.items()
    ]
    return figures


def _grad_sum_norm2(stats: Mapping[str, Any]) -> float | None:
    """A layer's ``|S_l|^2``: recorded since model jobs; from ``|S_l / m|^2`` in an older output."""
    if stats.get("grad_sum_norm2") is not None:
        return stats["grad_sum_norm2"]
    mean = stats.get("mean_grad_norm2")
    return None if mean is None else mean * stats["m"] ** 2


def _share(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole

"""Hand-made backward outputs with sketches, dots and norms, laid out as the backward jobs write them (issue #26)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import zarr


def write_layer(group: zarr.Group, values: np.ndarray | None, projections: tuple[np.ndarray, np.ndarray] | None,
                *, dots: np.ndarray | None = None, norms: np.ndarray | None = None, status: str = "complete",
                batch_chunk: int = 8, attrs: bool = True) -> None:
    """One layer's output into ``group``: ``sketch/values``, ``P_in``, ``P_out``, ``dots``, ``stats``."""
    provenance: dict = {"status": status}
    if values is not None:
        m, k_in, k_out = values.shape
        provenance["sketch"] = {"k_in": k_in, "k_out": k_out, "kind": "gaussian", "seed": 0,
                                "dtype": str(values.dtype)}
        sketch = group.create_group("sketch")
        array = sketch.create_array("values", shape=values.shape, chunks=(batch_chunk, k_in, k_out),
                                    dtype=values.dtype, dimension_names=["m", "k_in", "k_out"])
        array[...] = values
        sketch.create_array("P_in", data=projections[0])
        sketch.create_array("P_out", data=projections[1])
    if dots is not None:
        provenance["dots"] = {"n_q": int(dots.shape[1]), "queries": "queries.zarr"}
        group.require_group("dots").create_array("sample_dot", data=dots, dimension_names=["m", "query"])
    if norms is not None:
        group.require_group("stats").create_array("sample_grad_norm2", data=norms, dimension_names=["m"])
    if attrs:
        group.attrs["dconv"] = provenance


def one_layer(path: Path | str, values=None, projections=None, **kwargs) -> str:
    """A one-layer output at ``path``."""
    write_layer(zarr.open_group(str(path), mode="w", zarr_format=3), values, projections, **kwargs)
    return str(path)


def model(path: Path | str, layers: Sequence[tuple[str, np.ndarray, tuple]], *, norms=None, dots=None,
          status: str = "complete") -> str:
    """A model output at ``path``: each ``(name, values, projections)`` under ``layers/<name>``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, values, projections in layers:
        write_layer(root.require_group(f"layers/{name}"), values, projections)
    if norms is not None:
        root.require_group("stats").create_array("sample_grad_norm2", data=norms, dimension_names=["m"])
    if dots is not None:
        root.require_group("dots").create_array("sample_dot", data=dots, dimension_names=["m", "query"])
    root.attrs["dconv_model_output"] = {
        "status": status, "m": int(layers[0][1].shape[0]),
        "layers_run": [{"name": name, "kind": "conv2d", "path": f"layers/{name}"} for name, _, _ in layers],
    }
    return str(path)


def projections(rng: np.random.Generator, k_in: int, k_out: int, K: int = 5, C: int = 3) -> tuple:
    return rng.standard_normal((k_in, K + 1)), rng.standard_normal((k_out, C))


def features(values: Sequence[np.ndarray]) -> np.ndarray:
    """The feature matrix (m, F) float32 of the layers' sketches, in layer order."""
    return np.concatenate([v.reshape(v.shape[0], -1).astype(np.float32) for v in values], axis=1)

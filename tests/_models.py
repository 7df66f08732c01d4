"""Model input groups for the model-job tests, written with NumPy only (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import dconv

# A conv with stride 2 and padding, a dilated conv, and a linear layer on (m, T, in) inputs (A_prev (m, 1, T, in)).
LAYERS = {
    "conv1": ("conv2d", dict(height=12, width=12, in_channels=3, out_channels=4, kernel=3, stride=2, padding=1)),
    "conv2": ("conv2d", dict(height=6, width=6, in_channels=4, out_channels=5, kernel=3, padding=2, dilation=2)),
    "fc": ("linear", dict(height=1, width=3, in_channels=20, out_channels=3, kernel=1, padding=0)),
}


def model_group(path: Path, m: int = 40, *, dtype: str = "float64", chunk: int = 8, seed: int = 0) -> str:
    """A model input group of :data:`LAYERS` at ``path``: seeded inputs whose samples share a mean gradient."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    for i, (name, (_, recipe)) in enumerate(LAYERS.items()):
        dconv.make_inputs(f"{path}/layers/{name}", m=m, dtype=dtype, chunk=chunk, seed=seed + i, shared=0.5, **recipe)
    root.attrs["dconv_model"] = {
        "writer": "tests", "version": dconv.__version__, "sample_index": "appended",
        "layers": [{"name": name, "kind": kind, "path": f"layers/{name}"} for name, (kind, _) in LAYERS.items()],
    }
    return str(path)


def read(out: Path | str, name: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(out), mode="r")[name][...])

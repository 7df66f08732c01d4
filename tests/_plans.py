"""Plans for tests of the plan's sizing and text: make-inputs' default layer on lazy Dask zeros."""

from __future__ import annotations

import dask.array as da
import numpy as np

from dconv.plan import plan_job

DEFAULT_LAYER = {"height": 32, "width": 32, "in_channels": 16, "out_channels": 32}  # make-inputs' default


def plan_in_memory(tmp_path, m: int = 1024, **options):
    """The plan of make-inputs' default layer (3x3, padding 1, float32) on lazy Dask zeros: any m, no memory."""
    height, width, c_prev, c_out = DEFAULT_LAYER.values()
    inputs = {
        "A_prev": da.zeros((m, height, width, c_prev), dtype=np.float32),
        "dZ": da.zeros((m, height, width, c_out), dtype=np.float32),
        "W": np.zeros((3, 3, c_prev, c_out), np.float32),
    }
    return plan_job(inputs, tmp_path / "out.zarr", padding=1, **options)

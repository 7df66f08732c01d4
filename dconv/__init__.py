"""dconv: conv2d backward (dA_prev, dW, db) for batches larger than one process.

Layers, bottom up:

- :mod:`dconv.params`, :mod:`dconv.kernel`: pure NumPy, one in-memory batch.
- :mod:`dconv.simd`: the SIMD level of the kernel's compiled loops (``DCONV_SIMD``).
- :mod:`dconv.classic`: the classic ``conv_forward`` / ``conv_backward(dZ, cache)`` API.
- :mod:`dconv.graph`: the Dask computation over batch chunks.
- :mod:`dconv.store`: the Zarr layout of inputs and outputs.
- :mod:`dconv.job`: ``backward_job``, which ties graph, store and cluster together.
- :mod:`dconv.cli`: the ``dconv`` command.

The kernel-level names import nothing but NumPy; the job-level names import
Dask and Zarr on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from dconv.classic import conv_backward, conv_forward
from dconv.errors import InputDtypeError, InputError, SimdLevelError
from dconv.kernel import Gradients, conv2d_backward, conv2d_forward
from dconv.params import ConvParams
from dconv.simd import simd_levels

__version__ = "0.1.0"

__all__ = [
    "ConvParams",
    "Gradients",
    "InputDtypeError",
    "InputError",
    "JobResult",
    "SimdLevelError",
    "__version__",
    "backward_job",
    "conv2d_backward",
    "conv2d_forward",
    "conv_backward",
    "conv_forward",
    "make_inputs",
    "open_result",
    "simd_levels",
]

# Job-level names, imported lazily so that `import dconv` stays NumPy-only.
_LAZY = {
    "backward_job": "dconv.job",
    "JobResult": "dconv.job",
    "make_inputs": "dconv.store",
    "open_result": "dconv.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dconv' has no attribute {name!r}")

"""dconv: conv2d backward (dA_prev, dW, db) for batches larger than one process.

Layers, bottom up (docs/DESIGN.md draws them):

- :mod:`dconv.kernel`: pure NumPy (and optional compiled loops), one in-memory batch;
  :mod:`dconv.params` validates shapes and hyperparameters, :mod:`dconv.simd` picks
  the SIMD level of the compiled loops (``DCONV_SIMD``).
- :mod:`dconv.classic`: the classic ``conv_forward`` / ``conv_backward(dZ, cache)`` API.
- :mod:`dconv.options`: the job's options, each declared once (:mod:`dconv.option_fields`).
- :mod:`dconv.tree`: the reduction tree's shape.
- :mod:`dconv.store`: Zarr: input groups (one layer's, or a whole model's), the output layout
  table, records, the lease, what ``--overwrite`` may replace, ``inspect``;
  :mod:`dconv.statistics`: the ``--stats`` figures.
- :mod:`dconv.sources`, :mod:`dconv.graph`, :mod:`dconv.waves`: the Dask computation,
  chunk -> combine -> aggregate, submitted in waves.
- :mod:`dconv.plan`, :mod:`dconv.sizing`, :mod:`dconv.report`, :mod:`dconv.job`,
  :mod:`dconv.cluster`, :mod:`dconv.workers`: the plan, its memory model and text, the run,
  and where it runs.
- :mod:`dconv.score`: ``dconv score``, train samples scored against queries by their gradient
  sketches, each query's top lists (:mod:`dconv.kernel.topk`, :mod:`dconv.store.score_output`).
- :mod:`dconv.cli`, :mod:`dconv.spec`: the ``dconv`` command and pipeline specs.
- :func:`dconv.capture`: a PyTorch model's layers, captured into a model input group
  (imports torch only when called).

The kernel-level names import nothing but NumPy; the job-level names import
Dask and Zarr on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from dconv.capture import capture
from dconv.classic import conv_backward, conv_forward
from dconv.errors import (
    InputDtypeError,
    InputError,
    JobInterrupted,
    LeaseLost,
    NonFiniteInput,
    SimdLevelError,
    SpecError,
)
from dconv.kernel import Gradients, GradientStats, GradientsWithStats, conv2d_backward, conv2d_forward
from dconv.params import ConvParams
from dconv.simd import level_text, simd_levels

__version__ = "0.1.0"


def version_text() -> str:
    """``dconv X.Y.Z; SIMD level ...``: what ``dconv --version`` prints (:func:`dconv.simd.level_text`)."""
    return f"dconv {__version__}; {level_text()}"

__all__ = [
    "ClusterOptions",
    "ConvParams",
    "Gradients",
    "GradientStats",
    "GradientsWithStats",
    "InputDtypeError",
    "InputError",
    "InputRecipe",
    "InputWriter",
    "JobInterrupted",
    "LeaseLost",
    "NonFiniteInput",
    "JobOptions",
    "JobPlan",
    "JobResult",
    "LayerSpec",
    "ModelPlan",
    "ModelResult",
    "ModelWriter",
    "PipelineSpec",
    "SimdLevelError",
    "SpecError",
    "__version__",
    "backward_job",
    "capture",
    "conv2d_backward",
    "conv2d_forward",
    "conv_backward",
    "conv_forward",
    "describe_job",
    "format_summary",
    "is_model_group",
    "load_spec",
    "make_inputs",
    "open_model_inputs",
    "open_result",
    "plan_backward",
    "plan_job",
    "plan_model",
    "plan_recipe",
    "run_job",
    "run_score",
    "plan_score",
    "score_job",
    "ScorePlan",
    "ScoreResult",
    "simd_levels",
    "store_exists",
    "summarize",
    "torch_conv_params",
    "version_text",
    "write_queries",
    "queries_from_inputs",
    "queries_from_output",
]

# Job-level names, imported lazily so that `import dconv` stays NumPy-only.
_LAZY = {
    "ClusterOptions": "dconv.cluster",
    "InputRecipe": "dconv.options",
    "JobOptions": "dconv.options",
    "JobPlan": "dconv.plan",
    "plan_job": "dconv.plan",
    "plan_recipe": "dconv.plan",
    "describe_job": "dconv.job",
    "JobResult": "dconv.job",
    "backward_job": "dconv.job",
    "run_job": "dconv.job",
    "plan_backward": "dconv.job",
    "score_job": "dconv.score",
    "plan_score": "dconv.score",
    "run_score": "dconv.score",
    "ScorePlan": "dconv.score",
    "ScoreResult": "dconv.score",
    "ModelPlan": "dconv.model",
    "ModelResult": "dconv.model",
    "plan_model": "dconv.model",
    "PipelineSpec": "dconv.spec",
    "load_spec": "dconv.spec",
    "make_inputs": "dconv.store",
    "open_result": "dconv.store",
    "summarize": "dconv.store",
    "store_exists": "dconv.store",
    "InputWriter": "dconv.store",
    "torch_conv_params": "dconv.store",
    "write_queries": "dconv.store.queries",
    "queries_from_inputs": "dconv.store.queries",
    "queries_from_output": "dconv.store.queries",
    "format_summary": "dconv.store",
    "LayerSpec": "dconv.store",
    "ModelWriter": "dconv.store",
    "open_model_inputs": "dconv.store",
    "is_model_group": "dconv.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

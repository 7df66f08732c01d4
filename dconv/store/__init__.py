"""The Zarr layer: input groups, the output layout, per-chunk completion, provenance.

- :mod:`~dconv.store.layout`: the table of every output array and figure a job writes.
- :mod:`~dconv.store.output`: the output group: safety checks, create or resume, chunk writes, the finish.
- :mod:`~dconv.store.records`: a running job's bookkeeping, one record per node of the reduction tree.
- :mod:`~dconv.store.inputs`: input groups: open and check, read rows (and what a read holds), write
  synthetic ones, or give their metadata in memory.
- :mod:`~dconv.store.writer`: input groups written a batch at a time (``InputWriter``), e.g. from PyTorch.
- :mod:`~dconv.store.model`: model input groups, one input group per layer of a network (``ModelWriter``,
  ``open_model_inputs``).
- :mod:`~dconv.store.summary`: what ``dconv inspect`` reports.
- :mod:`~dconv.store.ownership`: the overwrite rule: what dconv may replace (its own groups) and how.
- :mod:`~dconv.store.lease`: one writer per output: the lease a job holds on it.
- :mod:`~dconv.store.locations`: local paths and fsspec URLs.
- :mod:`~dconv.store.fastread`: the fast chunk reader, the only user of zarr's private API.
"""

from __future__ import annotations

from dconv.store.fastread import read_path
from dconv.store.inputs import (
    INPUT_ARRAYS,
    InputGroup,
    compressor,
    job_inputs,
    make_inputs,
    open_inputs,
    read_batch,
    read_memory,
    read_whole,
    recipe_metadata,
)
from dconv.store.lease import check_unheld
from dconv.store.layout import DIMENSIONS, OUTPUT_LAYOUT, PROGRESS, Kind, OutputEntry, OutputLayout, place_layout
from dconv.store.locations import absolute_location, is_local, open_group, public_location, store_exists
from dconv.store.output import (
    ATTR,
    ChunkProgress,
    LEVEL_CODES,
    OutputStore,
    fingerprint,
    now,
    open_output,
    open_result,
)
from dconv.store.model import (
    LayerSpec,
    ModelInputs,
    ModelLayer,
    ModelWriter,
    is_model_group,
    open_model_inputs,
)
from dconv.store.summary import format_levels, format_summary, summarize
from dconv.store.writer import InputWriter, torch_conv_params

__all__ = [
    "ATTR",
    "ChunkProgress",
    "DIMENSIONS",
    "INPUT_ARRAYS",
    "LEVEL_CODES",
    "OUTPUT_LAYOUT",
    "PROGRESS",
    "InputGroup",
    "InputWriter",
    "Kind",
    "LayerSpec",
    "ModelInputs",
    "ModelLayer",
    "ModelWriter",
    "OutputEntry",
    "OutputLayout",
    "OutputStore",
    "absolute_location",
    "check_unheld",
    "compressor",
    "fingerprint",
    "format_levels",
    "format_summary",
    "is_local",
    "is_model_group",
    "job_inputs",
    "make_inputs",
    "now",
    "open_group",
    "open_inputs",
    "open_model_inputs",
    "open_output",
    "open_result",
    "place_layout",
    "public_location",
    "read_batch",
    "read_memory",
    "read_path",
    "read_whole",
    "recipe_metadata",
    "store_exists",
    "summarize",
    "torch_conv_params",
]

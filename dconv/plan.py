"""Planning a job: validate everything on metadata, choose the batch chunk, write nothing.

:func:`plan_job` opens the inputs (metadata and ``W`` only), resolves the
convolution, checks every shape, dtype and option, picks the samples per task
(from :class:`~dconv.options.JobOptions`, or the memory model), lays out the
output and checks that it may be written. Anything wrong raises
:class:`~dconv.errors.InputError` here, before a byte of output exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os import PathLike
from typing import Any, Mapping, Sequence

import numpy as np
from dask.utils import format_bytes

from dconv.errors import InputError
from dconv.graph import Partial, backward_graph, batch_bounds, batch_sources, chunk_task
from dconv.kernel import backward_working_set
from dconv.options import JobOptions
from dconv.params import ConvGeometry, ConvParams, backward_geometry, result_dtype
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word
from dconv.store import InputGroup, OutputStore, absolute_location, fingerprint, place_layout
from dconv.store.inputs import job_inputs, read_whole

__all__ = ["JobPlan", "plan_job", "task_memory", "choose_batch_chunk", "DEFAULT_BATCH_CHUNK"]

DEFAULT_BATCH_CHUNK = 256


@dataclass(frozen=True)
class JobPlan:
    """A validated job: everything :func:`dconv.job.run_job` needs, nothing written yet.

    Attributes
    ----------
    options : JobOptions
        As given, with ``simd`` set to the job's ``DCONV_SIMD`` word (checked, not
        resolved: each worker resolves it); the fields below are what the rest resolved to.
    params : ConvParams
        Stride, padding and dilation: the options, else the input's ``hparameters``.
    geometry : ConvGeometry
    shapes, dtypes : dict
        Of the input arrays ``A_prev``, ``dZ``, ``W``.
    compute_dtype : numpy.dtype
    batch_chunk : int
        Samples per task.
    bounds : list of (start, stop)
        The batch chunks.
    dz_sources, a_sources : sequence
        One per chunk: a Zarr slice the task reads, or a Dask block.
    W : ndarray, shape (fh, fw, C_prev, C)
        In the compute dtype.
    out : OutputStore
        The output, with its layout.
    input_location : str
        Where the input came from, without credentials.
    input_chunk : int or None
        The inputs' Zarr chunk along m (None for in-memory arrays).
    """

    options: JobOptions
    params: ConvParams
    geometry: ConvGeometry
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    compute_dtype: np.dtype
    batch_chunk: int
    bounds: Sequence[tuple[int, int]]
    dz_sources: Sequence[Any]
    a_sources: Sequence[Any]
    W: np.ndarray
    out: OutputStore
    input_location: str
    input_chunk: int | None

    @property
    def m(self) -> int:
        return self.shapes["A_prev"][0]

    @property
    def simd(self) -> str:
        """The job's ``DCONV_SIMD`` word."""
        return self.options.simd

    def identity(self) -> dict[str, Any]:
        """What must match for ``resume`` to continue this job's output (JSON-friendly).

        The input, its shapes and dtypes, and every option declared part of the
        identity (:meth:`JobOptions.identity_keys`), as resolved.
        """
        resolved = {"params": self.params.to_dict(), "batch_chunk": self.batch_chunk}
        return {
            "input": self.input_location,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "dtypes": {**self.dtypes, "compute": str(self.compute_dtype)},
            **{key: resolved.get(key, getattr(self.options, key, None)) for key in JobOptions.identity_keys()},
        }

    @property
    def fingerprint(self) -> str:
        """A short hash of :meth:`identity`, stored in the output's provenance."""
        return fingerprint(self.identity())

    def provenance(self) -> dict[str, Any]:
        """The ``dconv`` attribute of a new output, less identity, status and times."""
        return {
            "pads": [list(p) for p in self.geometry.pads],
            "n_chunks": len(self.bounds),
            "versions": _versions(),
            "simd": {"requested": self.simd},
        }

    def task_memory(self) -> int:
        """Bytes one chunk task holds at its peak (an upper bound; see :func:`task_memory`)."""
        return task_memory(min(self.batch_chunk, self.m), self.shapes, self.geometry, self.compute_dtype)

    def describe(self) -> str:
        """A few lines for ``--dry-run``: what would run, and its per-task memory."""
        lines = [
            f"input   {self.input_location}",
            f"output  {self.out.location}" + (" (resume)" if self.options.resume else ""),
            "shapes  " + ", ".join(f"{k} {v}" for k, v in self.shapes.items()) + f" ({self.compute_dtype})",
            f"conv    {self.params.describe()}, pads {self.geometry.pads}",
            f"chunks  {len(self.bounds)} of up to {self.batch_chunk} samples (m = {self.m}), "
            f"tree fan-in {self.options.split_every}",
            f"memory  at most about {format_bytes(self.task_memory())} per running task",
            f"simd    {SIMD_ENV_VAR}={self.simd}, resolved on each worker",
        ]
        if self.input_chunk and self.batch_chunk % self.input_chunk and self.batch_chunk < self.m:
            lines.append(
                f"note    batch_chunk {self.batch_chunk} is not a multiple of the input's Zarr chunk "
                f"{self.input_chunk} along m: tasks decode the input chunks they straddle more than once"
            )
        return "\n".join(lines)

    def open_output(self) -> np.ndarray:
        """Create the output, or reopen it to resume (:meth:`OutputStore.open`); the mask of finished chunks."""
        return self.out.open(
            self.identity(), self.provenance(), resume=self.options.resume, resumed={"simd": {"requested": self.simd}}
        )

    def graph(self, finished: Sequence[bool] | None = None) -> Any:
        """The job's Dask computation (:func:`dconv.graph.backward_graph`), reusing ``finished`` chunks."""
        return backward_graph(
            self.dz_sources,
            self.a_sources,
            self.W,
            self.geometry,
            self.out,
            self.bounds,
            self.options,
            finished=finished,
        )

    def run_chunk(self, index: int) -> Partial:
        """Run chunk ``index``'s task here, as a worker would: read, compute, write (the output must be open)."""
        start = self.bounds[index][0]
        return chunk_task(
            self.dz_sources[index], self.a_sources[index], self.W, self.geometry, self.out, index, start, self.options
        )


def _versions() -> dict[str, str]:
    import dask
    import zarr

    import dconv

    return {"dconv": dconv.__version__, "numpy": np.__version__, "dask": dask.__version__, "zarr": zarr.__version__}


# --------------------------------------------------------------------------- memory and the batch chunk


def task_memory(batch: int, shapes: Mapping[str, Sequence[int]], geometry: ConvGeometry, dtype: Any) -> int:
    """Bytes one chunk task of ``batch`` samples holds at its peak (an upper bound).

    Its ``A_prev`` and ``dZ`` blocks, ``itemsize * b * (H*W*C_prev + n_H*n_W*C)``,
    plus the kernel's working set, :func:`dconv.kernel.backward_working_set`.
    """
    _, height, width, c_prev = shapes["A_prev"]
    _, n_h, n_w, c_out = shapes["dZ"]
    itemsize = np.dtype(dtype).itemsize
    blocks = itemsize * batch * (height * width * c_prev + n_h * n_w * c_out)
    return blocks + backward_working_set(batch, geometry, c_prev, c_out, itemsize)


def aligned(batch_chunk: int, input_chunk: int | None) -> int:
    """``batch_chunk`` rounded down to a multiple of the input's Zarr chunk along m, when one fits.

    A task whose slice covers whole input chunks decodes each of them once; a
    misaligned one decodes the chunks it straddles twice or more.
    """
    if input_chunk is None or batch_chunk < input_chunk:
        return batch_chunk
    return batch_chunk - batch_chunk % input_chunk


def choose_batch_chunk(
    options: JobOptions,
    shapes: Mapping[str, Sequence[int]],
    geometry: ConvGeometry,
    dtype: Any,
    input_chunk: int | None = None,
) -> int:
    """The samples per task: ``options.batch_chunk`` if given, else the default or what ``max_memory`` allows.

    The default is 256, and with ``max_memory`` the largest chunk whose task
    fits; either is then aligned to ``input_chunk`` (see :func:`aligned`). A
    given ``batch_chunk`` is used as it is, once checked against ``max_memory``.

    Raises
    ------
    InputError
        ``batch_chunk`` needs more than ``max_memory`` per task, or not even one sample fits.
    """
    batch_chunk, budget = options.batch_chunk, options.max_memory
    if budget is None:
        return aligned(DEFAULT_BATCH_CHUNK, input_chunk) if batch_chunk is None else batch_chunk
    m = shapes["A_prev"][0]
    low, high = 0, m  # the largest b in [1, m] with task_memory(b) <= budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if task_memory(middle, shapes, geometry, dtype) <= budget else (low, middle - 1)
    if low == 0:
        raise InputError(
            f"one sample needs about {format_bytes(task_memory(1, shapes, geometry, dtype))} per task, "
            f"more than max_memory {format_bytes(budget)}."
        )
    if batch_chunk is None:
        return aligned(low, input_chunk)
    needed = task_memory(batch_chunk, shapes, geometry, dtype)
    if needed > budget:
        raise InputError(
            f"batch_chunk {batch_chunk} needs about {format_bytes(needed)} per task, more than max_memory "
            f"{format_bytes(budget)}; use batch_chunk <= {low}, or leave it out to have it chosen."
        )
    return batch_chunk


# --------------------------------------------------------------------------- planning


def resolve_params(options: JobOptions, hparameters: Mapping[str, Any] | None) -> ConvParams:
    """Options win; the ones not given come from the input's ``hparameters`` attribute, else 1, 0, 1.

    ``hparameters`` is the classic ``{"stride": s, "pad": p}`` dict, optionally
    with ``"dilation"``; ``pad`` may take any padding form.
    """
    stored = dict(hparameters or {})
    unknown = set(stored) - {"stride", "pad", "dilation"}
    if unknown:
        raise InputError(
            f"the input's hparameters attribute takes keys stride, pad, dilation; got {sorted(unknown)} instead."
        )
    return ConvParams.parse(
        stride=options.stride if options.stride is not None else stored.get("stride", 1),
        padding=options.padding if options.padding is not None else stored.get("pad", 0),
        dilation=options.dilation if options.dilation is not None else stored.get("dilation", 1),
    )


def plan_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> JobPlan:
    """Validate a job without writing anything.

    Parameters
    ----------
    inputs, out, storage_options
        As for :func:`dconv.backward_job`.
    options : JobOptions, optional
        How the job computes; ``values`` (any :class:`JobOptions` field) replace its fields.

    Raises
    ------
    InputError
        Anything wrong that the metadata shows.
    """
    options = JobOptions.build(options, **values)
    storage_options = dict(storage_options or {})
    options = JobOptions.build(options, simd=parse_word(options.simd or os.environ.get(SIMD_ENV_VAR)))
    inputs = job_inputs(inputs, storage_options)
    params = resolve_params(options, inputs.hparameters)
    shapes = {name: tuple(int(n) for n in array.shape) for name, array in inputs.arrays.items()}
    geometry = backward_geometry(shapes["dZ"], shapes["A_prev"], shapes["W"], params)
    compute_dtype = result_dtype(*(np.dtype(array.dtype) for array in inputs.arrays.values()))
    batch_chunk = choose_batch_chunk(options, shapes, geometry, compute_dtype, inputs.chunk_along_m)
    bounds = batch_bounds(shapes["A_prev"][0], batch_chunk)

    layout = place_layout(shapes, compute_dtype, batch_chunk)
    out_store = OutputStore(absolute_location(out), storage_options, layout)
    out_store.check_target(inputs.zarr_location, overwrite=options.overwrite, resume=options.resume)
    return JobPlan(
        options=options,
        params=params,
        geometry=geometry,
        shapes=shapes,
        dtypes={name: str(np.dtype(array.dtype)) for name, array in inputs.arrays.items()},
        compute_dtype=compute_dtype,
        batch_chunk=int(batch_chunk),
        bounds=bounds,
        dz_sources=batch_sources(inputs.arrays["dZ"], "dZ", bounds),
        a_sources=batch_sources(inputs.arrays["A_prev"], "A_prev", bounds),
        W=read_whole("W", inputs.arrays["W"]).astype(compute_dtype, copy=False),
        out=out_store,
        input_location=inputs.location,
        input_chunk=inputs.chunk_along_m,
    )

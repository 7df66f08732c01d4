"""Planning a job: validate everything on metadata, choose the batch chunk, write nothing.

:func:`plan_job` opens the inputs (metadata and ``W`` only), resolves the
convolution, checks every shape, dtype and option, picks the samples per task
(from :class:`~dconv.options.JobOptions`, or the memory model), lays out the
output and checks that it may be written. Anything wrong raises
:class:`~dconv.errors.InputError` here, before a byte of output exists.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from dconv import report
from dconv.errors import InputError
from dconv.graph import JobGraph, Partial, backward_graph
from dconv.products import job_projections, job_queries, write_projections
from dconv.options import InputRecipe, JobOptions
from dconv.params import ConvGeometry, ConvParams, backward_geometry, result_dtype
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word
from dconv.sizing import WorkerMemory, choose_batch_chunk, disk_bytes, task_memory, worker_memory
from dconv.sources import DaskBatches, ZarrBatches, batch_bounds, batch_sources
from dconv.store import (
    InputGroup,
    OutputStore,
    absolute_location,
    check_unheld,
    fingerprint,
    job_inputs,
    place_layout,
    public_location,
    read_path,
    read_whole,
    recipe_metadata,
)
from dconv.waves import WAVE_CHUNKS

__all__ = ["JobPlan", "plan_job", "plan_recipe", "resolve_params"]


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
    dz_sources, a_sources : ZarrBatches or DaskBatches
        ``dZ`` and ``A_prev`` by batch chunk: a Zarr array each task reads its
        samples of, or a Dask array chunked along ``bounds``.
    W : ndarray, shape (fh, fw, C_prev, C)
        In the compute dtype.
    out : OutputStore
        The output, with its layout.
    input_location : str
        Where the input came from, without credentials.
    input_chunks : dict
        The Zarr chunk along m of each of ``A_prev`` and ``dZ`` read from Zarr.
    input_reads : dict
        How each of those is read (:func:`dconv.store.read_path`):
        ``"<codecs>/mapped"``, ``"<codecs>/memory"``, ``"<codecs>/fetched"``, or
        None for zarr's public read.
    input_recipe : InputRecipe or None
        Set by :func:`plan_recipe`: the input does not exist yet and this recipe
        would make it; such a plan describes the job but cannot run it.
    queries : ndarray or None, shape (n_q, fh * fw * C_prev + 1, C)
        With ``dot``: the query gradients (:func:`dconv.products.job_queries`).
    projections : Projections or None
        With ``sketch``: ``P_in`` (k_in, K + 1) and ``P_out`` (k_out, C) (:func:`dconv.products.job_projections`).
    """

    options: JobOptions
    params: ConvParams
    geometry: ConvGeometry
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    compute_dtype: np.dtype
    batch_chunk: int
    bounds: Sequence[tuple[int, int]]
    dz_sources: ZarrBatches | DaskBatches
    a_sources: ZarrBatches | DaskBatches
    W: np.ndarray
    out: OutputStore
    input_location: str
    input_chunks: dict[str, int] = field(default_factory=dict)
    input_reads: dict[str, str | None] = field(default_factory=dict)
    input_recipe: InputRecipe | None = None
    queries: np.ndarray | None = field(default=None, repr=False)
    projections: Any = field(default=None, repr=False)

    @property
    def m(self) -> int:
        return self.shapes["A_prev"][0]

    @property
    def simd(self) -> str:
        """The job's ``DCONV_SIMD`` word."""
        return self.options.simd

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    def done_chunks(self) -> int:
        """Chunks done in the output (their leaf records, or all of a complete output)."""
        return int(self.out.done_chunks().sum())

    def mark_interrupted(self, signal: str) -> None:
        self.out.mark_interrupted(signal)

    def mark_failed(self, error: BaseException) -> None:
        self.out.mark_failed(error)

    def identity(self) -> dict[str, Any]:
        """What must match for ``resume`` to continue this job's output (JSON-friendly).

        The input, its shapes and dtypes, and every option recorded as part of
        the identity (:meth:`JobOptions.identity`), as resolved.
        """
        resolved = dataclasses.replace(
            self.options,
            stride=self.params.stride,
            padding=self.params.padding,
            dilation=self.params.dilation,
            batch_chunk=self.batch_chunk,
        )
        return {
            "input": self.input_location,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "dtypes": {**self.dtypes, "compute": str(self.compute_dtype)},
            **resolved.identity(),
        }

    @property
    def fingerprint(self) -> str:
        """A short hash of :meth:`identity`, stored in the output's provenance."""
        return fingerprint(self.identity())

    def resume_differences(self, stored: Mapping[str, Any]) -> list[str]:
        """How this job differs from the one that wrote the provenance ``stored``: ``"key: here, in out"`` each."""
        return identity_differences(self.identity(), stored, ("input", "shapes", "dtypes"))

    def check_resumable(self, stored: Mapping[str, Any]) -> None:
        """Refuse to resume the output whose provenance is ``stored`` if another job made it.

        Raises
        ------
        InputError
            Naming what differs; the options were taken from the output
            (:meth:`JobOptions.resuming`), so what differs is the input.
        """
        check_resumable(self.out.location, self.resume_differences(stored))

    def provenance(self) -> dict[str, Any]:
        """The ``dconv`` attribute of a new output, less identity, status and times."""
        return {
            "pads": [list(p) for p in self.geometry.pads],
            "n_chunks": len(self.bounds),
            "versions": _versions(),
            "simd": {"requested": self.simd},
            **({} if self.out.layout.bias else {"bias": False}),
        }

    def task_memory(self) -> int:
        """Bytes one chunk task holds at its peak (an upper bound; see :func:`dconv.sizing.task_memory`).

        Input chunks that a task cuts count whole (:func:`dconv.store.read_memory`).
        """
        size = min(self.batch_chunk, self.m)
        products = self.queries is not None or self.projections is not None
        return task_memory(
            size, self.shapes, self.geometry, self.compute_dtype, self.input_chunks, self.dtypes,
            stats=self.options.stats or products, input_reads=self.input_reads,
        ) + self._products_memory(size)

    def _products_memory(self, size: int) -> int:
        """What the per-sample products add to a task: the kernel's (:func:`products_working_set`) and the cast sketch."""
        if self.queries is None and self.projections is None:
            return 0
        from dconv.kernel.sketch import products_working_set

        n_q = 0 if self.queries is None else self.queries.shape[0]
        k_in, k_out = (0, 0) if self.projections is None else (self.projections.p_in.shape[0], self.projections.p_out.shape[0])
        fh, fw, c_prev, c_out = self.shapes["W"]
        return products_working_set(size, self.geometry, c_prev, c_out, np.dtype(self.compute_dtype).itemsize,
                                    n_q, k_in, k_out) + size * k_in * k_out * 4

    def worker_memory(self) -> WorkerMemory:
        """The memory limit a worker of one thread needs for this job's tasks (:func:`dconv.sizing.worker_memory`)."""
        return worker_memory(self.task_memory())

    def disk_bytes(self) -> dict[str, int]:
        """Bytes the job reads and writes, uncompressed, by name (:func:`dconv.sizing.disk_bytes`)."""
        return disk_bytes(self.shapes, self.dtypes, self.out.layout, self.options.keep_partials)

    def describe(self) -> str:
        """What ``--dry-run`` prints of the plan (:func:`dconv.report.describe`)."""
        return report.describe(self)

    def announce(self, n_workers: int, threads_per_worker: int = 1) -> str:
        """The plan in one line, said before a job starts (:func:`dconv.report.announce`)."""
        return report.announce(self, n_workers, threads_per_worker)

    def warnings(self, n_workers: int, threads_per_worker: int = 1, cores: int | None = None) -> list[str]:
        """What in this plan wastes time or memory, one line each (:func:`dconv.report.warnings`)."""
        return report.warnings(self, n_workers, threads_per_worker, cores)

    def straddle_warning(self) -> str | None:
        """The warning that tasks cut the input's Zarr chunks along m, or None (see :mod:`dconv.report`)."""
        return report.straddle_warning(self)

    def open_output(self, cluster: Mapping[str, Any] | None = None) -> np.ndarray:
        """Create the output, or reopen it to resume (:meth:`OutputStore.open`); the mask of finished chunks.

        Parameters
        ----------
        cluster : mapping, optional
            Where the job runs (:meth:`ClusterOptions.to_dict`), recorded for the resume command.

        Raises
        ------
        InputError
            The plan comes from :func:`plan_recipe`: its input does not exist
            yet; or the output to resume was made by another job.
        """
        if self.input_recipe is not None:
            raise InputError(
                f"the input {self.input_location} does not exist yet (the plan comes from its recipe); "
                "make it first (dconv.make_inputs), then plan the job with plan_job."
            )
        # under the lease: what another job wrote since this one was planned is refused as it would have been then
        self.out.check_target(None, overwrite=self.options.overwrite, resume=self.options.resume)
        stored = self.out.provenance() if self.options.resume else None
        if stored is not None:
            self.check_resumable(stored)
        carried = {**self.options.to_dict("carried"), "cluster": dict(cluster or {})}
        finished = self.out.open(
            self.identity(),
            {**self.provenance(), **carried},
            resume=stored is not None,
            resumed={**carried, "simd": {"requested": self.simd}},
        )
        if self.projections is not None:  # stored with the output: a resume and sketch_like read them back
            write_projections(self.out.group(), self.projections)
        return finished

    def graph(self, stored: Sequence[tuple[int, int]] | None = None, wave_chunks: int | None = None) -> JobGraph:
        """The job's reduction tree (:func:`dconv.graph.backward_graph`), reading the ``stored`` nodes back.

        Parameters
        ----------
        stored : sequence of (depth, index), optional
            The frontier an earlier run left (:meth:`OutputStore.frontier`).
        wave_chunks : int, optional
            At most this many chunks per wave; default :data:`dconv.waves.WAVE_CHUNKS`.
        """
        wave_chunks = WAVE_CHUNKS if wave_chunks is None else wave_chunks
        return backward_graph(
            self.dz_sources,
            self.a_sources,
            self.W,
            self.geometry,
            self.out,
            self.bounds,
            self.options,
            stored=stored,
            wave_chunks=wave_chunks,
            queries=self.queries,
            projections=self.projections,
        )

    def run_chunk(self, index: int) -> Partial:
        """Run chunk ``index``'s task here, as a worker would: read, compute, write (the output must be open)."""
        return self.graph().run_chunk(index)


def identity_differences(here: Mapping[str, Any], stored: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """How the identity ``here`` differs from the one a provenance ``stored`` recorded (its ``keys`` and its
    options'): ``"key: here, in out"`` each."""
    there = {**{key: stored.get(key) for key in keys}, **JobOptions.from_dict(stored).identity()}
    return [
        f"{key}: {here.get(key)!r} here, {there.get(key)!r} in out"
        for key in dict.fromkeys([*here, *there])
        if here.get(key) != there.get(key)
    ]


def check_resumable(location: str, differences: Sequence[str]) -> None:
    """Raises InputError naming ``differences`` if there are any: another job made the output at ``location``."""
    if differences:
        raise InputError(
            f"cannot resume {location!r}: it was made by another job ({'; '.join(differences)}); "
            "give the input it was made from, or write to another out."
        )


def _versions() -> dict[str, str]:
    import dask
    import zarr

    import dconv

    return {"dconv": dconv.__version__, "numpy": np.__version__, "dask": dask.__version__, "zarr": zarr.__version__}


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


def _no_conv_options(options: JobOptions) -> bool:
    return options.stride is None and options.padding is None and options.dilation is None


def _geometry(shapes: Mapping[str, tuple[int, ...]], params: ConvParams, assumed: bool) -> ConvGeometry:
    """:func:`backward_geometry`; a shape error says so when the conv parameters were assumed, not given."""
    try:
        return backward_geometry(shapes["dZ"], shapes["A_prev"], shapes["W"], params)
    except InputError as e:
        if not assumed:
            raise
        raise InputError(
            f"{e} The input has no hparameters attribute and no stride, padding or dilation was given, "
            "so stride 1, padding 0 and dilation 1 were assumed; give the layer's."
        ) from e


def plan_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    model_layer: tuple[str, int] | None = None,
    **values: Any,
) -> JobPlan:
    """Validate a job without writing anything.

    Parameters
    ----------
    inputs, out, storage_options
        As for :func:`dconv.backward_job`.
    options : JobOptions, optional
        How the job computes; ``values`` (any :class:`JobOptions` field) replace its fields.
    model_layer : (name, index), optional
        The layer of a model this job is (:mod:`dconv.model`): its queries in a model's query group,
        its projections' stream (:mod:`dconv.products`).

    Raises
    ------
    InputError
        Anything wrong that the metadata shows; or another job holds a fresh lease on ``out``
        (:mod:`dconv.store.lease`), named with the age of its last heartbeat.
    """
    given = set(values) | {  # the fields the caller set, even to their defaults: a resume keeps those
        spec.name for spec in JobOptions.recorded() if options is not None and getattr(options, spec.name) != spec.default
    }
    options = _absolute_paths(JobOptions.build(options, **values))
    storage_options = dict(storage_options or {})
    stored = OutputStore(absolute_location(out), storage_options).provenance() if options.resume else None
    if stored is not None:  # the output's own options, where none are given
        options = options.resuming(JobOptions.from_dict(stored), public_location(str(out)), given)
    options = JobOptions.build(options, simd=parse_word(options.simd or os.environ.get(SIMD_ENV_VAR)))
    _check_one_layer(inputs, options, storage_options)
    inputs = job_inputs(inputs, storage_options)
    params = resolve_params(options, inputs.hparameters)
    shapes = {name: tuple(int(n) for n in array.shape) for name, array in inputs.arrays.items()}
    geometry = _geometry(shapes, params, assumed=inputs.hparameters is None and _no_conv_options(options))
    compute_dtype = result_dtype(*(np.dtype(array.dtype) for array in inputs.arrays.values()))
    dtypes = {name: str(np.dtype(array.dtype)) for name, array in inputs.arrays.items()}
    streamed = {name: inputs.arrays[name] for name in ("A_prev", "dZ")}
    input_chunks = {name: int(array.chunks[0]) for name, array in streamed.items() if isinstance(array, zarr.Array)}
    input_reads = {name: read_path(streamed[name]) for name in input_chunks}
    batch_chunk = choose_batch_chunk(options, shapes, geometry, compute_dtype, input_chunks, dtypes, input_reads)
    bounds = batch_bounds(shapes["A_prev"][0], batch_chunk)

    name = None if model_layer is None else model_layer[0]
    queries = job_queries(options, shapes["W"], inputs.bias, name, storage_options)
    projections = job_projections(options, shapes["W"], inputs.bias, absolute_location(out), model_layer,
                                  storage_options, resume=stored is not None)
    layout = place_layout(
        shapes, compute_dtype, batch_chunk, options.split_every, dA_prev=options.dA_prev, stats=options.stats,
        bias=inputs.bias, queries=None if queries is None else queries.shape[0],
        sketch=None if projections is None else (projections.p_in.shape[0], projections.p_out.shape[0]),
        sketch_dtype=options.sketch_dtype or "float32",
    )
    out_store = OutputStore(absolute_location(out), storage_options, layout)
    check_unheld(out_store.url, storage_options)  # another job writing it: nothing else matters
    out_store.check_target(inputs.zarr_location, overwrite=options.overwrite, resume=options.resume)
    plan = JobPlan(
        options=options,
        params=params,
        geometry=geometry,
        shapes=shapes,
        dtypes=dtypes,
        compute_dtype=compute_dtype,
        batch_chunk=int(batch_chunk),
        bounds=bounds,
        dz_sources=batch_sources(inputs.arrays["dZ"], "dZ", bounds),
        a_sources=batch_sources(inputs.arrays["A_prev"], "A_prev", bounds),
        W=read_whole("W", inputs.arrays["W"]).astype(compute_dtype, copy=False),
        out=out_store,
        input_location=inputs.location,
        input_chunks=input_chunks,
        input_reads=input_reads,
        queries=queries,
        projections=projections,
    )
    if stored is not None:
        plan.check_resumable(stored)
    return plan


def _absolute_paths(options: JobOptions) -> JobOptions:
    """``dot`` and ``sketch_like`` as absolute paths (workers and resumes may run elsewhere); URLs as given."""
    paths = {name: absolute_location(getattr(options, name)) for name in ("dot", "sketch_like")
             if getattr(options, name) is not None}
    return JobOptions.build(options, **paths) if paths else options


def _check_one_layer(inputs: Any, options: JobOptions, storage_options: Mapping[str, Any]) -> None:
    """Refuse a model input group, and ``layers`` for a one-layer input (:mod:`dconv.model` plans models)."""
    from dconv.store.model import is_model_group

    if isinstance(inputs, (str, PathLike)) and is_model_group(str(inputs), storage_options):
        raise InputError(
            f"{public_location(str(inputs))!r} is a model input group: plan it with plan_model "
            "(backward_job and dconv backward take either)."
        )
    if options.layers is not None:
        raise InputError(
            f"layers selects layers of a model input group; the input is an input group of one layer "
            f"(got layers {list(options.layers)} instead of none)."
        )


def plan_recipe(
    recipe: InputRecipe,
    inputs: str | PathLike,
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> JobPlan:
    """Plan a job whose input does not exist yet: the group ``recipe`` would write at ``inputs``.

    The plan is :func:`plan_job`'s for an input of the recipe's shapes, dtype,
    Zarr chunks and ``hparameters``, so its memory bound, disk figures and
    warnings are those of the real run. Nothing is written and nothing is
    generated: the arrays are Zarr metadata in memory. Such a plan describes
    the job (:meth:`JobPlan.describe` names ``inputs`` and the recipe) but cannot
    run it: make the input (:func:`dconv.make_inputs`), then :func:`plan_job`.

    Parameters
    ----------
    recipe : InputRecipe
        What :func:`dconv.make_inputs` would write.
    inputs : str or path
        Where it would write it.
    out, options, storage_options, values
        As for :func:`plan_job`.

    Raises
    ------
    InputError
        The recipe's layer has no valid output shape, or :func:`plan_job` refuses the job.
    """
    recipe = InputRecipe.build(recipe)
    group = recipe_metadata(recipe, str(inputs))
    plan = plan_job(group, out, options, storage_options=storage_options, **values)
    return dataclasses.replace(plan, input_recipe=recipe)

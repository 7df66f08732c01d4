"""``backward_job``: validate everything, then run the graph on a cluster and record the result.

A job has two phases. :func:`plan_job` reads only metadata (and ``W``) and
raises :class:`~dconv.errors.InputError` for anything wrong, before a byte of
output is written. :func:`run_job` checks that every worker runs the job's SIMD
level (:func:`check_simd`), creates or resumes the output, computes the graph in
one pass and marks the output "complete" last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask
import numpy as np
import zarr
from dask.callbacks import Callback

from dconv.cluster import ClusterOptions, connect
from dconv.errors import InputError, SimdLevelError
from dconv.graph import CHUNK_PREFIX, ZarrSlice, backward_graph, batch_bounds, normalize_split_every, progress_topic
from dconv.kernel import as_float_array, backward_working_set
from dconv.params import ConvGeometry, ConvParams, backward_geometry, check_float_dtype, result_dtype
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import level_report, parse_word, resolve_level
from dconv.store import (
    InputGroup,
    OutputStore,
    absolute_location,
    is_local,
    open_inputs,
    public_location,
    read_batch,
    store_exists,
)

__all__ = ["backward_job", "plan_job", "run_job", "check_simd", "JobPlan", "JobResult", "DEFAULT_BATCH_CHUNK"]

DEFAULT_BATCH_CHUNK = 256
LOCAL_SCHEDULERS = ("threads", "synchronous")


@dataclass(frozen=True)
class JobResult:
    """What a finished job returns.

    Attributes
    ----------
    dW : ndarray, shape (fh, fw, C_prev, C)
    db : ndarray, shape (1, 1, 1, C)
    out : str
        The output group (without credentials); dA_prev is there.
    n_chunks, computed_chunks : int
        Batch chunks in the job, and how many this run computed (fewer on resume).
    seconds : dict
        Wall time of the run (``total``, ``compute``) and the summed task time
        of the chunks' ``read``, ``kernel`` and ``write`` steps.
    nonfinite : dict
        Count of NaN and Inf values in each of ``dA_prev``, ``dW`` and ``db``.
    simd : dict
        ``{level: chunks}``: how many of the job's chunks ran at each SIMD
        level (chunks an earlier run finished count at the level they ran at).
    """

    dW: np.ndarray
    db: np.ndarray
    out: str
    n_chunks: int
    computed_chunks: int
    seconds: dict = field(default_factory=dict)
    nonfinite: dict = field(default_factory=dict)
    simd: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobPlan:
    """A validated job: everything :func:`run_job` needs, nothing written yet.

    ``simd`` is the job's ``DCONV_SIMD`` word, checked but not resolved: each
    worker resolves it (:func:`dconv.simd.use_level`).
    """

    dz_batches: Sequence[Any]
    a_batches: Sequence[Any]
    W: np.ndarray
    params: ConvParams
    geometry: ConvGeometry
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    compute_dtype: np.dtype
    bounds: Sequence[tuple[int, int]]
    batch_chunk: int
    split_every: int
    input_location: str
    input_chunk: int | None
    out: OutputStore
    resume: bool
    check_finite: bool
    simd: str = "auto"

    def identity(self) -> dict[str, Any]:
        """What must match for ``resume`` to continue this job's output (JSON-friendly)."""
        return {
            "input": self.input_location,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "dtypes": {**self.dtypes, "compute": str(self.compute_dtype)},
            "params": self.params.to_dict(),
            "batch_chunk": self.batch_chunk,
            "split_every": self.split_every,
        }

    @property
    def fingerprint(self) -> str:
        """A short hash of :meth:`identity`, stored in the output's provenance."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A few lines for ``--dry-run``: what would run, and its per-task memory."""
        m = self.shapes["A_prev"][0]
        per_task = task_memory(min(self.batch_chunk, m), self.shapes, self.geometry, self.compute_dtype)
        return "\n".join(
            [
                f"input   {self.input_location}",
                f"output  {self.out.location}" + (" (resume)" if self.resume else ""),
                "shapes  " + ", ".join(f"{k} {v}" for k, v in self.shapes.items()) + f" ({self.compute_dtype})",
                f"conv    {self.params.describe()}, pads {self.geometry.pads}",
                f"chunks  {len(self.bounds)} of up to {self.batch_chunk} samples (m = {m}), "
                f"tree fan-in {self.split_every}",
                f"memory  at most about {format_size(per_task)} per running task",
                f"simd    {SIMD_ENV_VAR}={self.simd}, resolved on each worker",
            ]
            + (
                [
                    f"note    batch_chunk {self.batch_chunk} is not a multiple of the input's Zarr chunk "
                    f"{self.input_chunk} along m: tasks decode the input chunks they straddle more than once"
                ]
                if self.input_chunk and self.batch_chunk % self.input_chunk and self.batch_chunk < m
                else []
            )
        )

    def graph(self, finished: Sequence[bool] | None = None) -> Any:
        """The job's Dask computation (:func:`dconv.graph.backward_graph`), reusing ``finished`` chunks."""
        return backward_graph(
            self.dz_batches,
            self.a_batches,
            self.W,
            self.geometry,
            self.out,
            self.bounds,
            split_every=self.split_every,
            finished=finished,
            check_finite=self.check_finite,
            simd_word=self.simd,
        )

    def provenance(self) -> dict[str, Any]:
        """The ``dconv`` attribute of the output, less status and times."""
        return {
            **self.identity(),
            "pads": [list(p) for p in self.geometry.pads],
            "n_chunks": len(self.bounds),
            "fingerprint": self.fingerprint,
            "versions": _versions(),
            "simd": {"requested": self.simd},
        }


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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_size(n_bytes: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GB"``, ``"1e9"``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    if not isinstance(value, (str, int)) or not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"max_memory must be a size such as 512MiB, 2GB or 1e9 bytes; got {value!r} instead.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def aligned(batch_chunk: int, input_chunk: int | None) -> int:
    """``batch_chunk`` rounded down to a multiple of the input's Zarr chunk along m, when one fits.

    A task whose slice covers whole input chunks decodes each of them once; a
    misaligned one decodes the chunks it straddles twice or more.
    """
    if input_chunk is None or batch_chunk < input_chunk:
        return batch_chunk
    return batch_chunk - batch_chunk % input_chunk


def choose_batch_chunk(
    batch_chunk: int | None,
    max_memory: Any,
    shapes: Mapping[str, Sequence[int]],
    geometry: ConvGeometry,
    dtype: Any,
    input_chunk: int | None = None,
) -> int:
    """The samples per task: ``batch_chunk`` if given, else the default or what ``max_memory`` allows.

    The default is 256, and with ``max_memory`` the largest chunk whose task
    fits; either is then aligned to ``input_chunk`` (see :func:`aligned`). A
    given ``batch_chunk`` is used as it is, once checked against ``max_memory``.

    Raises
    ------
    InputError
        ``batch_chunk`` needs more than ``max_memory`` per task, or not even one sample fits.
    """
    if max_memory is None:
        return aligned(DEFAULT_BATCH_CHUNK, input_chunk) if batch_chunk is None else batch_chunk
    budget = parse_size(max_memory)
    m = shapes["A_prev"][0]
    low, high = 0, m  # the largest b in [1, m] with task_memory(b) <= budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if task_memory(middle, shapes, geometry, dtype) <= budget else (low, middle - 1)
    if low == 0:
        raise InputError(
            f"one sample needs about {format_size(task_memory(1, shapes, geometry, dtype))} per task, "
            f"more than max_memory {format_size(budget)}."
        )
    if batch_chunk is None:
        return aligned(low, input_chunk)
    needed = task_memory(batch_chunk, shapes, geometry, dtype) if isinstance(batch_chunk, int) else 0
    if needed > budget:
        raise InputError(
            f"batch_chunk {batch_chunk} needs about {format_size(needed)} per task, more than max_memory "
            f"{format_size(budget)}; use batch_chunk <= {low}, or leave it out to have it chosen."
        )
    return batch_chunk


def _versions() -> dict[str, str]:
    import dask
    import zarr

    import dconv

    return {"dconv": dconv.__version__, "numpy": np.__version__, "dask": dask.__version__, "zarr": zarr.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- planning


def resolve_params(
    stride: Any, padding: Any, dilation: Any, hparameters: Mapping[str, Any] | None
) -> ConvParams:
    """Explicit options win; missing ones come from the input's ``hparameters`` attribute.

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
        stride=stride if stride is not None else stored.get("stride", 1),
        padding=padding if padding is not None else stored.get("pad", 0),
        dilation=dilation if dilation is not None else stored.get("dilation", 1),
    )


def _zarr_chunk_along_m(*arrays: Any) -> int | None:
    """The larger Zarr chunk along m of the input arrays (None for in-memory arrays)."""
    chunks = [array.chunks[0] for array in arrays if isinstance(array, zarr.Array)]
    return max(chunks) if chunks else None


def _read_whole(name: str, array: Any) -> np.ndarray:
    """A small array read in full; a corrupt Zarr chunk is named in the error."""
    if isinstance(array, zarr.Array):
        return read_batch(array, name, 0, array.shape[0])
    return np.asarray(array)


def _zarr_batches(array: Any, name: str, bounds: Sequence[tuple[int, int]]) -> list[ZarrSlice]:
    return [ZarrSlice(array, name, start, stop) for start, stop in bounds]


def _dask_batches(array: Any, bounds: Sequence[tuple[int, int]]) -> list[Any]:
    import dask.array as da

    chunks = (tuple(stop - start for start, stop in bounds), *[(n,) for n in array.shape[1:]])
    blocks = da.asarray(array).rechunk(chunks).to_delayed()
    return list(blocks.reshape(-1))


def _check_out_apart_from_input(out: str, input_location: str | None) -> None:
    """Refuse an ``out`` that is the input store, lies inside it, or contains it."""
    if input_location is None:
        return
    if is_local(out) and is_local(input_location):  # compare real paths: symlinks must not hide nesting
        out, input_location = os.path.realpath(out), os.path.realpath(input_location)
    out_location, input_location = public_location(out).rstrip("/"), input_location.rstrip("/")
    if out_location == input_location or out_location.startswith(input_location + "/"):
        raise InputError(f"out {out_location!r} is inside the input store {input_location!r}; choose another path.")
    if input_location.startswith(out_location + "/"):
        raise InputError(f"the input store {input_location!r} is inside out {out_location!r}; choose another path.")


def _check_out_replaceable(out: OutputStore, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing ``out`` unless told to, and never replace foreign data."""
    if overwrite and resume:
        raise InputError("give overwrite or resume, not both.")
    if not store_exists(out.url, out.storage_options):
        return
    if not overwrite and not resume:
        raise InputError(
            f"out {out.location!r} already exists; pass --overwrite to replace it or --resume to continue it."
        )
    if out.provenance() is None and not _is_empty_dir(out.url):
        raise InputError(
            f"out {out.location!r} exists and is not a dconv output; refusing to "
            f"{'overwrite' if overwrite else 'resume'} it. Choose another path."
        )


def _is_empty_dir(url: str) -> bool:
    path = Path(url)
    return is_local(url) and path.is_dir() and not any(path.iterdir())


def plan_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    *,
    stride: Any = None,
    padding: Any = None,
    dilation: Any = None,
    batch_chunk: int | None = None,
    max_memory: int | str | None = None,
    split_every: int | None = 8,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    check_finite: bool = False,
    simd: str | None = None,
) -> JobPlan:
    """Validate a job without writing anything. Arguments as for :func:`backward_job`."""
    storage_options = dict(storage_options or {})
    simd = parse_word(simd if simd is not None else os.environ.get(SIMD_ENV_VAR))
    if isinstance(inputs, (str, PathLike)):
        inputs = open_inputs(str(inputs), storage_options)
    if isinstance(inputs, InputGroup):
        arrays = {"A_prev": inputs.A_prev, "dZ": inputs.dZ, "W": inputs.W}
        hparameters, input_location = inputs.hparameters, inputs.location
    elif isinstance(inputs, Mapping):
        missing = [name for name in ("A_prev", "dZ", "W") if name not in inputs]
        if missing:
            raise InputError(f"inputs must hold arrays A_prev, dZ and W; missing {', '.join(missing)}.")
        arrays = {name: inputs[name] for name in ("A_prev", "dZ", "W")}
        hparameters, input_location = None, None
    else:
        raise InputError(
            f"inputs must be a Zarr group path/URL or a mapping of arrays; got {type(inputs).__name__} instead."
        )
    for name, array in arrays.items():
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            arrays[name] = as_float_array(name, array)
        check_float_dtype(name, arrays[name].dtype)

    params = resolve_params(stride, padding, dilation, hparameters)
    shapes = {name: tuple(int(n) for n in array.shape) for name, array in arrays.items()}
    geometry = backward_geometry(shapes["dZ"], shapes["A_prev"], shapes["W"], params)
    compute_dtype = result_dtype(*(np.dtype(a.dtype) for a in arrays.values()))
    input_chunk = _zarr_chunk_along_m(arrays["A_prev"], arrays["dZ"])
    batch_chunk = choose_batch_chunk(batch_chunk, max_memory, shapes, geometry, compute_dtype, input_chunk)
    bounds = batch_bounds(shapes["A_prev"][0], batch_chunk)
    split_every = normalize_split_every(split_every)

    out_store = OutputStore(absolute_location(out), storage_options)
    _check_out_apart_from_input(out_store.url, input_location)
    _check_out_replaceable(out_store, overwrite=overwrite, resume=resume)

    if input_location is not None:  # Zarr arrays: each task reads its own slice
        a_batches = _zarr_batches(arrays["A_prev"], "A_prev", bounds)
        dz_batches = _zarr_batches(arrays["dZ"], "dZ", bounds)
    else:
        a_batches, dz_batches = _dask_batches(arrays["A_prev"], bounds), _dask_batches(arrays["dZ"], bounds)
    return JobPlan(
        dz_batches=dz_batches,
        a_batches=a_batches,
        W=_read_whole("W", arrays["W"]).astype(compute_dtype, copy=False),
        params=params,
        geometry=geometry,
        shapes=shapes,
        dtypes={name: str(np.dtype(array.dtype)) for name, array in arrays.items()},
        compute_dtype=compute_dtype,
        bounds=bounds,
        batch_chunk=int(batch_chunk),
        split_every=split_every,
        input_location=input_location or "<in-memory arrays>",
        input_chunk=input_chunk,
        out=out_store,
        resume=resume,
        check_finite=check_finite,
        simd=simd,
    )


# --------------------------------------------------------------------------- running


def check_simd(word: str, client: Any = None) -> dict[str, str]:
    """Refuse a ``DCONV_SIMD`` word that a process which would run the job's chunks cannot run.

    With a distributed ``client``, every worker answers
    :func:`dconv.simd.level_report` (``client.run``); without one, this process
    resolves the word.

    Returns
    -------
    dict
        Worker address (``"local"`` for this process) -> the level it will run at.

    Raises
    ------
    SimdLevelError
        One line naming each worker that cannot run ``word``, and what it runs.
    """
    if client is None:
        return {"local": resolve_level(word)}
    reports = client.run(level_report, word)
    refused = [
        f"worker {address} cannot run it (it runs {', '.join(report['runs'])})"
        for address, report in sorted(reports.items())
        if report["level"] is None
    ]
    if refused:
        raise SimdLevelError(f"{SIMD_ENV_VAR}={word}: " + "; ".join(refused) + "; no task was started.")
    return {address: report["level"] for address, report in reports.items()}


def prepare_output(plan: JobPlan) -> np.ndarray:
    """Create the output, or reopen it on resume; return the mask of finished chunks."""
    n_chunks = len(plan.bounds)
    stored = plan.out.provenance() if plan.resume else None
    if stored is not None:
        if stored.get("fingerprint") != plan.fingerprint:
            differences = [
                f"{key}: {value!r} here, {stored.get(key)!r} in out"
                for key, value in plan.identity().items()
                if stored.get(key) != value
            ]
            raise InputError(
                f"cannot resume {plan.out.location!r}: it was made by another job ("
                + ("; ".join(differences) or "its fingerprint differs")
                + "). Use --overwrite to start again."
            )
        try:
            finished = plan.out.done_chunks()
        except (KeyError, FileNotFoundError):  # killed while creating the layout: nothing is done
            finished = None
        if finished is not None and finished.size == n_chunks:
            plan.out.ensure_levels()
            plan.out.update_provenance(status="running", resumed=_now(), simd={"requested": plan.simd})
            return finished
    plan.out.create(
        a_shape=plan.shapes["A_prev"],
        w_shape=plan.shapes["W"],
        dtype=plan.compute_dtype,
        batch_chunk=plan.batch_chunk,
        provenance={**plan.provenance(), "started": _now()},
    )
    return np.zeros(n_chunks, dtype=bool)


class _LocalChunkProgress(Callback):
    """Advances a progress bar as chunk tasks finish on a local Dask scheduler."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith(CHUNK_PREFIX):
            self.bar.update(1)


def _compute(graph: Any, plan: JobPlan, client: Any, scheduler: str | None, bar: Any) -> Any:
    """Compute ``graph``, advancing ``bar`` per finished chunk (distributed: via the tasks' events)."""
    if scheduler is not None:
        with _LocalChunkProgress(bar):
            return dask.compute(graph, scheduler=scheduler)[0]
    topic = progress_topic(plan.out.url)
    client.subscribe_topic(topic, lambda event: bar.update(1))
    try:
        return client.compute(graph).result()
    finally:
        client.unsubscribe_topic(topic)


def run_job(
    plan: JobPlan,
    *,
    client: Any = None,
    scheduler: str | None = None,
    progress: bool = False,
) -> JobResult:
    """Run a planned job on ``client`` (a ``distributed.Client``) or a local Dask ``scheduler``.

    Raises
    ------
    SimdLevelError
        A worker (or this process, for a local ``scheduler``) cannot run the
        job's SIMD level; nothing is written.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    check_simd(plan.simd, client if scheduler is None else None)
    finished = prepare_output(plan)
    pending = int((~finished).sum())
    graph = plan.graph(finished=list(finished))
    t1 = time.perf_counter()
    try:
        with tqdm(total=pending, unit="chunk", desc="dconv", file=sys.stderr, disable=not progress) as bar:
            total = _compute(graph, plan, client, scheduler, bar)
        t2 = time.perf_counter()
        dW = total.dW.astype(plan.compute_dtype)
        db = total.db.astype(plan.compute_dtype).reshape(1, 1, 1, -1)
        stats = dict(total.stats)
        levels = dict(sorted(stats.pop("simd", {}).items()))
        nonfinite = {
            "dA_prev": int(stats.pop("nonfinite_dA_prev", 0)),
            "dW": int(dW.size - np.count_nonzero(np.isfinite(dW))),
            "db": int(db.size - np.count_nonzero(np.isfinite(db))),
        }
        seconds = {"compute": t2 - t1, **stats}
        plan.out.finish(
            dW,
            db,
            finished=_now(),
            nonfinite=nonfinite,
            seconds={k: round(v, 3) for k, v in seconds.items()},
            simd={"requested": plan.simd, "chunks": levels},
        )
    except BaseException as e:
        with contextlib.suppress(Exception):
            plan.out.update_provenance(status="failed", reason=f"{type(e).__name__}: {e}"[:2000], failed=_now())
        raise
    seconds["total"] = time.perf_counter() - t0
    return JobResult(
        dW=dW,
        db=db,
        out=plan.out.location,
        n_chunks=len(plan.bounds),
        computed_chunks=pending,
        seconds=seconds,
        nonfinite=nonfinite,
        simd=levels,
    )


def backward_job(
    inputs: str | PathLike | InputGroup | Mapping[str, Any],
    out: str | PathLike,
    *,
    stride: Any = None,
    padding: Any = None,
    dilation: Any = None,
    batch_chunk: int | None = None,
    max_memory: int | str | None = None,
    split_every: int | None = 8,
    client: Any = None,
    scheduler: str | None = None,
    cluster: ClusterOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    check_finite: bool = False,
    simd: str | None = None,
    progress: bool = False,
    quiet: bool = True,
) -> JobResult:
    """Compute dA_prev, dW and db for a whole batch, chunk by chunk, on Dask.

    Parameters
    ----------
    inputs : str, path, or mapping
        A Zarr v3 input group (local path or fsspec URL) with ``A_prev``
        (m, H, W, C_prev), ``dZ`` (m, n_H, n_W, C) and ``W`` (fh, fw, C_prev, C);
        or a mapping with those keys holding NumPy or Dask arrays.
    out : str or path
        Where the output group goes (local path or fsspec URL).
    stride, padding, dilation : optional
        As for :func:`dconv.conv2d_backward`. When None, taken from the input
        group's ``hparameters`` attribute, else 1, 0, 1.
    batch_chunk : int, optional
        Samples per task; dA_prev is chunked the same way. Default 256, or
        with ``max_memory`` the largest chunk that fits, rounded down to a
        multiple of the input's Zarr chunk along m where one fits.
    max_memory : int or str, optional
        Memory one task may use, in bytes or as ``"512MiB"``, ``"2GB"``; see
        :func:`task_memory`. A ``batch_chunk`` that needs more is refused.
    split_every : int
        Fan-in of the dW/db tree reduction.
    client : distributed.Client, optional
        Run on this client's cluster.
    scheduler : {"threads", "synchronous"}, optional
        Run in this process on a local Dask scheduler instead of a cluster.
    cluster : ClusterOptions, optional
        With neither ``client`` nor ``scheduler``: which cluster to start or
        reach. Default: the embedded local cluster.
    overwrite, resume : bool
        Replace an existing ``out``, or continue an interrupted job there.
    storage_options : dict, optional
        fsspec options for ``inputs`` and ``out`` (never recorded).
    check_finite : bool
        Fail on NaN or Inf in the inputs instead of propagating them.
    simd : str, optional
        The SIMD level of the kernel's compiled loops on every worker: a
        ``DCONV_SIMD`` word (``auto``, ``avx512``, ``avx2``, ``neon``,
        ``baseline``, ``numpy``). Default: this process's ``DCONV_SIMD``, else
        ``auto`` (each worker's best). A level some worker lacks is refused
        before any task runs (:class:`~dconv.errors.SimdLevelError`).
    progress : bool
        Show a progress bar on stderr.
    quiet : bool
        Do not print the cluster's dashboard link.

    Returns
    -------
    JobResult
    """
    if scheduler is not None and scheduler not in LOCAL_SCHEDULERS:
        raise InputError(f"scheduler must be one of {LOCAL_SCHEDULERS}; got {scheduler!r} instead.")
    if scheduler is not None and client is not None:
        raise InputError("give either client or scheduler, not both.")
    plan = plan_job(
        inputs,
        out,
        stride=stride,
        padding=padding,
        dilation=dilation,
        batch_chunk=batch_chunk,
        max_memory=max_memory,
        split_every=split_every,
        overwrite=overwrite,
        resume=resume,
        storage_options=storage_options,
        check_finite=check_finite,
        simd=simd,
    )
    if client is not None or scheduler is not None:
        return run_job(plan, client=client, scheduler=scheduler, progress=progress)
    with connect(cluster or ClusterOptions(), quiet=quiet) as new_client:
        return run_job(plan, client=new_client, progress=progress)

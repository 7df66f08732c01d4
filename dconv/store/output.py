"""The output group: its safety checks, creation or resume, chunk writes, the finish.

An output is a Zarr v3 group laid out by :data:`dconv.store.layout.OUTPUT_LAYOUT`::

    dA_prev   (m, H, W, C_prev)      chunks (batch_chunk, H, W, C_prev)    BLOCK
    dW        (fh, fw, C_prev, C)                                          SUM
    db        (1, 1, 1, C)                                                 SUM
    _progress/dW_partial  (n_chunks, fh, fw, C_prev, C)   float64, one SUM record per chunk
    _progress/db_partial  (n_chunks, C)                   float64
    _progress/nonfinite   (n_chunks,)      int64, NaN/Inf count of the chunk's dA_prev block
    _progress/level       (n_chunks,)      uint8, the SIMD level the chunk ran at (LEVEL_CODES)
    _progress/done        (n_chunks,)      uint8, 1 once chunk i is durable

and a group attribute ``dconv`` with the provenance and the ``status``
("running", "failed", "interrupted" or "complete"; "complete" is written last). A chunk's
completion is its ``done`` flag, written after its blocks, its records and its
level: never inferred from a chunk file, since Zarr does not write chunks that
equal the fill value.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.simd import LEVELS
from dconv.store.layout import OUTPUT_LAYOUT, PROGRESS, Kind, OutputLayout
from dconv.store.locations import is_local, open_group, public_location, store_exists

__all__ = ["ATTR", "LEVEL_CODES", "OutputStore", "fingerprint", "read_levels", "open_output", "open_result"]

ATTR = "dconv"
"""The group attribute that holds the provenance and the status."""

LEVEL_CODES = ("unknown", *LEVELS, "numpy")
"""``_progress/level`` values: code ``i`` is ``LEVEL_CODES[i]``. 0, the fill value, is a chunk
not done, or done by a dconv that did not record levels. The table is stored with the
array (its ``codes`` attribute), and read from there."""


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A short hash of a job's resume identity (JSON-friendly), stored in its provenance."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    """The time, as the provenance records it (UTC, ISO 8601, whole seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class OutputStore:
    """A picklable handle on an output group; the workers write their chunks through it.

    Attributes
    ----------
    url : str
        Local path or fsspec URL of the output group.
    storage_options : dict
        fsspec options (may hold credentials: never written anywhere).
    layout : OutputLayout, optional
        What the job writes; needed to create, write and finish, not to read.
    """

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)
    layout: OutputLayout | None = field(default=None, repr=False)

    @property
    def location(self) -> str:
        return public_location(self.url)

    def group(self, mode: str = "r+") -> zarr.Group:
        try:
            return open_group(self.url, mode, self.storage_options)
        except FileNotFoundError as e:
            if mode == "w":
                raise
            raise FileNotFoundError(
                f"output {self.location!r} is not there: it was never created, or this worker "
                "cannot see it (local paths must be on storage every worker shares)."
            ) from e

    def provenance(self) -> dict[str, Any] | None:
        """The ``dconv`` attribute of an existing output, or None if ``url`` is not a dconv output."""
        try:
            stored = self.group("r").attrs.get(ATTR)
        except Exception:  # missing, not a group, unreadable metadata
            return None
        return dict(stored) if isinstance(stored, Mapping) else None

    # ----------------------------------------------------------------------- before the job

    def check_target(self, input_location: str | None, *, overwrite: bool, resume: bool) -> None:
        """Refuse an ``out`` that would lose data: one inside (or around) the input, or an
        existing one without ``overwrite`` or ``resume``, or anything that is not a dconv output.

        Raises
        ------
        InputError
        """
        _check_apart_from_input(self.url, input_location)
        if overwrite and resume:
            raise InputError("give overwrite=True or resume=True, not both.")
        if not store_exists(self.url, self.storage_options):
            return
        if not overwrite and not resume:
            raise InputError(
                f"out {self.location!r} already exists; pass overwrite=True to replace it or resume=True to continue it."
            )
        if self.provenance() is None and not _is_empty_dir(self.url):
            raise InputError(
                f"out {self.location!r} exists and is not a dconv output; refusing to "
                f"{'overwrite' if overwrite else 'resume'} it. Choose another path."
            )

    def open(
        self,
        identity: Mapping[str, Any],
        provenance: Mapping[str, Any],
        *,
        resume: bool,
        resumed: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Create the output, or reopen it to resume; return the mask of finished chunks.

        Parameters
        ----------
        identity : mapping
            What a resumed output must match (its :func:`fingerprint` is compared).
        provenance : mapping
            The rest of the ``dconv`` attribute, written when the output is created.
        resume : bool
            Continue an existing output of the same identity; create one if there is none.
        resumed : mapping, optional
            Entries of the provenance replaced when an output is resumed.

        Returns
        -------
        ndarray of bool, shape (n_chunks,)

        Raises
        ------
        InputError
            ``resume`` and the existing output was made by another job.
        """
        stored = self.provenance() if resume else None
        if stored is not None:
            finished = self._resume(identity, stored)
            if finished is not None:
                self.update_provenance(status="running", resumed=now(), **dict(resumed or {}))
                return finished
        self.create({**identity, **provenance, "fingerprint": fingerprint(identity), "started": now()})
        return np.zeros(self.layout.n_chunks, dtype=bool)

    def _resume(self, identity: Mapping[str, Any], stored: Mapping[str, Any]) -> np.ndarray | None:
        """The finished-chunk mask of a matching output; None if it was killed while being created."""
        if stored.get("fingerprint") != fingerprint(identity):
            differences = [
                f"{key}: {value!r} here, {stored.get(key)!r} in out"
                for key, value in identity.items()
                if stored.get(key) != value
            ]
            raise InputError(
                f"cannot resume {self.location!r}: it was made by another job ("
                + ("; ".join(differences) or "its fingerprint differs")
                + "). Use overwrite=True to start again."
            )
        try:
            finished = self.done_chunks()
        except (KeyError, FileNotFoundError):  # killed while creating the layout: nothing is done
            return None
        if finished.size != self.layout.n_chunks:
            return None
        progress = self.group()[PROGRESS]
        if "level" not in progress:  # made by a dconv that did not record levels
            _create_level_array(progress, finished.size)
        return finished

    def create(self, provenance: Mapping[str, Any]) -> None:
        """Create the layout (replacing whatever is there) with status "running".

        The group and its provenance are one write, so a job killed at any point
        leaves either nothing or a group that ``resume`` recognises.
        """
        layout = self.layout
        group = open_group(self.url, "w", self.storage_options, attributes={ATTR: {**provenance, "status": "running"}})
        for entry in layout.arrays:
            group.create_array(
                entry.name,
                shape=entry.shape,
                chunks=entry.chunks,
                dtype=entry.dtype,
                fill_value=0,
                compressors=None,  # measured: Blosc LZ4 wrote dA_prev 3x slower for a 1.07 ratio
                dimension_names=entry.dims,
            )
        progress = group.create_group(PROGRESS)
        progress.create_array("done", shape=(layout.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, compressors=None)
        for entry in layout.of_kind(Kind.SUM):
            group.create_array(
                entry.record,
                shape=(layout.n_chunks, *entry.partial_shape),
                chunks=(1, *entry.partial_shape),
                dtype=entry.partial_dtype,
                fill_value=0,
            )
        _create_level_array(progress, layout.n_chunks)

    # ----------------------------------------------------------------------- chunk tasks

    def write_chunk(self, index: int, start: int, values: Mapping[str, np.ndarray], level: str) -> None:
        """Write one chunk's values and SIMD level, then mark it done (last).

        Parameters
        ----------
        index, start : int
            The chunk's index, and its first sample.
        values : mapping
            One value per BLOCK entry (written at rows ``start:start + b``) and per
            SUM entry (written as the chunk's record), in the entry's partial dtype.
        level : str
            The SIMD level the kernel ran at, one of :data:`LEVEL_CODES`.
        """
        group = self.group()
        for entry in self.layout.of_kind(Kind.BLOCK):
            # Every block is stored, zeros too: zarr's default first compares a block with the fill
            # value, to skip empty chunks, which took 7 of 23 ms per 17 MB block.
            block = values[entry.name]
            group[entry.name].with_config({"write_empty_chunks": True})[start : start + block.shape[0]] = block
        for entry in self.layout.of_kind(Kind.SUM):
            group[entry.record][index] = values[entry.name]
        group[f"{PROGRESS}/level"][index] = LEVEL_CODES.index(level)
        group[f"{PROGRESS}/done"][index] = 1

    def read_partial(self, index: int) -> tuple[dict[str, np.ndarray], str]:
        """The SUM records and the SIMD level of a chunk an earlier run finished."""
        group = self.group("r")
        sums = {entry.name: np.asarray(group[entry.record][index]) for entry in self.layout.of_kind(Kind.SUM)}
        return sums, read_levels(group, index)[0]

    def done_chunks(self) -> np.ndarray:
        """Boolean mask of durably finished chunks, shape (n_chunks,)."""
        return self.group("r")[f"{PROGRESS}/done"][:] == 1

    # ----------------------------------------------------------------------- after the job

    def finish(self, values: Mapping[str, Any], **provenance: Any) -> None:
        """Write the stored SUM arrays and the figures, then set status "complete" (the last write of a job).

        ``values`` holds each stored SUM entry's array (in its output dtype and
        shape) and each FIGURE entry's figure.
        """
        group = self.group()
        for entry in self.layout.of_kind(Kind.SUM):
            if entry.stored:
                group[entry.name][...] = values[entry.name]
        figures = {entry.name: values[entry.name] for entry in self.layout.of_kind(Kind.FIGURE)}
        group.attrs[ATTR] = {**group.attrs[ATTR], **figures, **provenance, "status": "complete"}

    def update_provenance(self, **entries: Any) -> None:
        group = self.group()
        group.attrs[ATTR] = {**group.attrs[ATTR], **entries}

    def mark_failed(self, error: BaseException) -> None:
        """Record ``status: "failed"`` and the error that stopped the job."""
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.update_provenance(status="failed", reason=reason[:2000], failed=now())

    def mark_interrupted(self, signal: str) -> None:
        """Record ``status: "interrupted"``, the signal that stopped the job (``"SIGINT"``, ``"SIGTERM"``) and when."""
        self.update_provenance(status="interrupted", signal=signal, interrupted=now())

    def read_values(self) -> dict[str, Any]:
        """The finished values of a complete output, as the job that finished it returned them.

        Each stored SUM entry's array, each unstored one's per-chunk records
        summed in chunk order (a count), and each FIGURE from the provenance.
        """
        group = self.group("r")
        values: dict[str, Any] = {}
        for entry in self.layout.of_kind(Kind.SUM):
            if entry.stored:
                values[entry.name] = np.asarray(group[entry.name][...])
            else:
                values[entry.name] = np.asarray(group[entry.record][:]).sum(axis=0).item()
        stored = group.attrs[ATTR]
        return {**values, **{entry.name: stored.get(entry.name) for entry in self.layout.of_kind(Kind.FIGURE)}}


def _check_apart_from_input(out: str, input_location: str | None) -> None:
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


def _is_empty_dir(url: str) -> bool:
    path = Path(url)
    return is_local(url) and path.is_dir() and not any(path.iterdir())


def _create_level_array(progress: zarr.Group, n_chunks: int) -> None:
    progress.create_array(
        "level",
        shape=(n_chunks,),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=None,
        attributes={"codes": list(LEVEL_CODES)},
    )


def read_levels(group: zarr.Group, index: int | None = None) -> list[str]:
    """The SIMD level each chunk of an output ran at (only chunk ``index``'s, if given).

    "unknown" where none is recorded: a chunk not done, or an output written
    before levels were recorded.
    """
    try:
        array = group[f"{PROGRESS}/level"]
    except KeyError:
        return ["unknown"] * (group[f"{PROGRESS}/done"].shape[0] if index is None else 1)
    codes = list(array.attrs.get("codes", LEVEL_CODES))
    stored = array[:] if index is None else array[index : index + 1]
    return [codes[code] if code < len(codes) else "unknown" for code in np.asarray(stored).tolist()]


def read_done(group: zarr.Group) -> np.ndarray:
    """The finished-chunk mask of an output group, shape (n_chunks,)."""
    return np.asarray(group[f"{PROGRESS}/done"][:]) == 1


def output_arrays(group: zarr.Group) -> list[str]:
    """The names of the layout's arrays that ``group`` holds, in table order."""
    return [entry.name for entry in OUTPUT_LAYOUT if entry.has_array and entry.name in group]


def open_output(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[zarr.Group, dict[str, Any]]:
    """An existing dconv output group, read-only, and its provenance, whatever its status.

    Raises
    ------
    InputError
        ``url`` does not exist, or is not a dconv output.
    """
    location = public_location(url)
    try:
        group = open_group(url, "r", storage_options)
    except FileNotFoundError as e:
        raise InputError(f"output {location!r} does not exist or is not a Zarr group.") from e
    provenance = group.attrs.get(ATTR)
    if not isinstance(provenance, Mapping):
        raise InputError(f"{location!r} is not a dconv output (it has no {ATTR!r} attribute).")
    return group, dict(provenance)


def open_result(url: str, *, allow_incomplete: bool = False, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a job's output group, refusing one whose status is not "complete".

    Parameters
    ----------
    allow_incomplete : bool
        Open a running, failed or killed job's output anyway.

    Raises
    ------
    InputError
        ``url`` is not a dconv output, or the job did not complete.
    """
    group, provenance = open_output(url, storage_options)
    location = public_location(url)
    if provenance.get("status") != "complete" and not allow_incomplete:
        raise InputError(
            f"output {location!r} has status {provenance.get('status')!r}, not 'complete'; "
            "resume the job, or pass allow_incomplete=True to read it anyway."
        )
    return group

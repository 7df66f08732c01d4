"""The output group: its safety checks, creation or resume, chunk writes, the finish.

An output is a Zarr v3 group laid out by :data:`dconv.store.layout.OUTPUT_LAYOUT`::

    dA_prev   (m, H, W, C_prev)      chunks (batch_chunk, H, W, C_prev)    BLOCK   (not with --no-dA-prev)
    dW        (fh, fw, C_prev, C)                                          REDUCE
    db        (1, 1, 1, C)                                                 REDUCE
    stats/    with --stats: sample_grad_norm2 (m,) BLOCK; dW_sq, db_sq REDUCE (float64)
    _progress/tree/<depth>-<index>.npy   while the job runs: one record per node of the
                                         reduction tree (:mod:`dconv.store.records`)
    _progress/level   (n_chunks,)        once it is complete: uint8, the SIMD level each chunk
                                         ran at (LEVEL_CODES), one Zarr chunk

and a group attribute ``dconv`` with the provenance and the ``status``
("running", "failed", "interrupted" or "complete"; "complete" is written last).

A chunk's completion is its leaf record, written after its blocks (never
inferred from a block, since Zarr does not write chunks that equal the fill
value). A combine task's record replaces its children's, so the records of a
running job are a small frontier, and a resumed job reads back that frontier.
At the finish the levels are written as one array and the records are removed
(kept with ``keep_partials``): a complete output's bookkeeping is three stored
objects, whatever the number of chunks.

Outputs written by dconv before the records (``_progress/done`` and one array
per partial, one Zarr chunk per batch chunk) are still read; an unfinished one
cannot be resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property, lru_cache
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.simd import LEVELS
from dconv.store import fastwrite
from dconv.store.layout import OUTPUT_LAYOUT, PROGRESS, Kind, OutputLayout
from dconv.store.lease import LEASE_NAME
from dconv.store.locations import create_group, is_local, open_group, public_location
from dconv.store.ownership import OUTPUT_MARKER, check_replaceable, is_vacant, remove_own
from dconv.store.records import RecordStore
from dconv.tree import Node, covered, frontier, node_chunks

__all__ = [
    "ATTR", "LEVEL_CODES", "OutputStore", "ChunkProgress", "fingerprint", "level_code", "level_counts", "open_output",
    "open_result",
]

ATTR = OUTPUT_MARKER
"""The group attribute that holds the provenance and the status ("dconv"); it marks an output as dconv's."""

LEVEL_CODES = ("unknown", *LEVELS, "numpy")
"""Level codes in records and in ``_progress/level``: code ``i`` is ``LEVEL_CODES[i]``. 0 is a
chunk not done, or done by a dconv that did not record levels. The table is stored with
the ``level`` array (its ``codes`` attribute), and read from there."""

LEVEL_ARRAY = f"{PROGRESS}/level"
LEGACY_DONE = f"{PROGRESS}/done"
"""Present only in outputs written before the records: one flag per chunk."""


def level_code(level: str) -> int:
    """The code of SIMD level ``level`` (a name of :data:`LEVEL_CODES`) in records and in ``_progress/level``."""
    return LEVEL_CODES.index(level)


def level_counts(codes: np.ndarray) -> dict[str, int]:
    """``{level: chunks}`` from level codes (uint8, one per chunk), levels in name order."""
    values, counts = np.unique(np.asarray(codes, dtype=np.uint8), return_counts=True)
    found = {_level_name(LEVEL_CODES, code): int(n) for code, n in zip(values.tolist(), counts)}
    return dict(sorted(found.items()))


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A short hash of a job's resume identity (JSON-friendly), stored in its provenance."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    """The time, as the provenance records it (UTC, ISO 8601, whole seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusGroup:
    """A dconv group whose attribute :attr:`ATTRIBUTE` holds its provenance and status: an output, a model
    output, a score output. A subclass is a dataclass with ``url`` and ``storage_options``."""

    ATTRIBUTE: ClassVar[str]
    url: str
    storage_options: dict

    @property
    def location(self) -> str:
        return public_location(self.url)

    def group(self, mode: str = "r+") -> zarr.Group:
        return open_group(self.url, mode, self.storage_options)

    def provenance(self) -> dict[str, Any] | None:
        """The group's attribute :attr:`ATTRIBUTE`, or None if ``url`` is not such a group."""
        try:
            stored = self.group("r").attrs.get(self.ATTRIBUTE)
        except Exception:  # missing, not a group, unreadable metadata
            return None
        return dict(stored) if isinstance(stored, Mapping) else None

    def update(self, **entries: Any) -> None:
        """Set ``entries`` in the attribute, keeping the others."""
        group = self.group()
        group.attrs[self.ATTRIBUTE] = {**group.attrs[self.ATTRIBUTE], **entries}

    def mark_failed(self, error: BaseException) -> None:
        """Record ``status: "failed"`` and the error that stopped the job."""
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.update(status="failed", reason=reason[:2000], failed=now())

    def mark_interrupted(self, signal: str) -> None:
        """Record ``status: "interrupted"``, the signal that stopped the job (``"SIGINT"``, ``"SIGTERM"``) and when."""
        self.update(status="interrupted", signal=signal, interrupted=now())


@dataclass(frozen=True)
class OutputStore(StatusGroup):
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

    ATTRIBUTE: ClassVar[str] = ATTR

    def group(self, mode: str = "r+") -> zarr.Group:
        """The group; a missing one says where a worker looked (the paths must be shared)."""
        try:
            return open_group(self.url, mode, self.storage_options)
        except FileNotFoundError as e:
            if mode == "w":
                raise
            raise FileNotFoundError(
                f"output {self.location!r} is not there: it was never created, or this worker "
                "cannot see it (local paths must be on storage every worker shares)."
            ) from e

    # ----------------------------------------------------------------------- before the job

    def check_target(self, input_location: str | None, *, overwrite: bool, resume: bool) -> None:
        """Refuse an ``out`` that would lose data: one inside (or around) the input, an
        existing one without ``overwrite`` or ``resume``, or, to resume, anything that is not
        a dconv output, and, to overwrite, anything but a dconv output and nothing more
        (:func:`dconv.store.ownership.check_replaceable`, the rule of every writer).

        Raises
        ------
        InputError
        """
        check_output_target(self, input_location, overwrite=overwrite, resume=resume, kind="output")

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
            What a resumed output must match (the caller checked that it does:
            :meth:`dconv.plan.JobPlan.check_resumable`); stored with its :func:`fingerprint`.
        provenance : mapping
            The rest of the ``dconv`` attribute, written when the output is created.
        resume : bool
            Continue the existing output; create one if it was killed while being created.
        resumed : mapping, optional
            Entries of the provenance replaced when an output is resumed.

        Returns
        -------
        ndarray of bool, shape (n_chunks,)

        Raises
        ------
        InputError
            ``resume`` and the existing output was written by a dconv whose bookkeeping this one does not continue.
        """
        finished = self._resume() if resume else None
        if finished is not None:
            self.update(status="running", resumed=now(), **dict(resumed or {}))
            return finished
        self.create({**identity, **provenance, "fingerprint": fingerprint(identity), "started": now()})
        return np.zeros(self.layout.n_chunks, dtype=bool)

    def _resume(self) -> np.ndarray | None:
        """The finished-chunk mask of the output; None if it was killed while being created."""
        group = self.group("r")
        if LEGACY_DONE in group:
            raise InputError(
                f"cannot resume {self.location!r}: it was written by an earlier dconv, whose per-chunk "
                "bookkeeping (_progress/done) this one does not continue. Use overwrite=True to start again."
            )
        if PROGRESS not in group:  # killed while creating the layout: nothing is done
            return None
        return self.done_chunks()

    def create(self, provenance: Mapping[str, Any]) -> None:
        """Create the layout (replacing whatever is there, but the lease) with status "running".

        The group and its provenance are one write, so a job killed at any point
        leaves either nothing or a group that ``resume`` recognises. The job's
        lease (:data:`dconv.store.lease.LEASE_NAME`) stays: the old members are
        removed one by one, then the group is created without a wipe (Zarr's
        mode "w" would remove the lease too). An output being replaced says so
        first (status "replacing"), so that one whose replacement is cut short
        never claims to be complete.
        """
        if self.provenance() is not None:
            self.update(status="replacing")
        remove_own(self.url, self.storage_options, "output", keep=(LEASE_NAME,))
        attributes = {ATTR: {**provenance, "status": "running"}}
        group = create_group(self.url, self.storage_options, attributes=attributes)
        for name in self.layout.groups:
            group.create_group(name)
        for entry in self.layout.arrays:
            group.create_array(
                entry.name,
                shape=entry.shape,
                chunks=entry.chunks,
                dtype=entry.dtype,
                fill_value=0,
                compressors=None,  # measured: Blosc LZ4 wrote dA_prev 3x slower for a 1.07 ratio
                dimension_names=entry.dims,
            )
        group.create_group(PROGRESS)

    # ----------------------------------------------------------------------- chunk tasks

    @cached_property
    def records(self) -> RecordStore:
        """The tree-node records of this output (:mod:`dconv.store.records`)."""
        return RecordStore(self.url, self.storage_options)

    def write_chunk(self, index: int, start: int, values: Mapping[str, np.ndarray], level: str) -> None:
        """Write one chunk's blocks, then its leaf record (its REDUCE partials and SIMD level), which marks it done.

        Parameters
        ----------
        index, start : int
            The chunk's index, and its first sample.
        values : mapping
            One value per BLOCK entry (written at rows ``start:start + b``) and per
            REDUCE entry (its partial, in the entry's partial dtype).
        level : str
            The SIMD level the kernel ran at, one of :data:`LEVEL_CODES`.
        """
        arrays = _block_arrays(self.url, _options_key(self.storage_options), self.layout)
        for entry in self.layout.of_kind(Kind.BLOCK):
            block, array = values[entry.name], arrays[entry.name]
            written = fastwrite.write_rows(array, start, block)
            if written < block.shape[0]:
                array[start + written : start + block.shape[0]] = block[written:]
        sums = {entry.name: values[entry.name] for entry in self.layout.of_kind(Kind.REDUCE)}
        self.records.write((0, index), sums, [level_code(level)])

    def write_node(self, depth: int, index: int, sums: Mapping[str, np.ndarray], levels: np.ndarray) -> None:
        """Write combine node ``(depth, index)``'s record (depth >= 1).

        Parameters
        ----------
        sums : mapping
            The node's REDUCE partials by entry name (a :class:`dconv.graph.Partial`'s ``reduced``).
        levels : ndarray of uint8, shape (chunks covered,)
            The level code of every chunk the node covers, in chunk order.
        """
        self.records.write((depth, index), sums, levels)

    def drop_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove the records of ``nodes`` (``(depth, index)`` pairs); ones already gone are ignored."""
        self.records.delete(nodes)

    def read_node(self, depth: int, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Node ``(depth, index)``'s REDUCE partials and the level codes (uint8) of the chunks it covers."""
        return self.records.read((depth, index))

    def read_partial(self, index: int) -> tuple[dict[str, np.ndarray], str]:
        """The REDUCE partials and the SIMD level of chunk ``index``, from its leaf record."""
        sums, levels = self.read_node(0, index)
        return sums, _level_name(LEVEL_CODES, int(levels[0]))

    def stored_nodes(self) -> set[Node]:
        """The nodes that have a record (one listing)."""
        return self.records.list()

    def frontier(self) -> list[Node]:
        """The stored nodes no stored node above covers, in chunk order: what a resumed job reads back."""
        return frontier(self.stored_nodes(), self.layout.n_chunks, self.layout.split_every)

    def done_chunks(self) -> np.ndarray:
        """Boolean mask of durably finished chunks, shape (n_chunks,)."""
        return self.progress(levels=False).done

    def progress(self, *, levels: bool = True) -> "ChunkProgress":
        """Which chunks are done and, with ``levels``, the SIMD level each ran at.

        Works on an output of any status (and on one written before the records),
        from the provenance, a listing and the level codes of the frontier's records.
        """
        group = self.group("r")
        provenance = dict(group.attrs.get(ATTR) or {})
        n_chunks = int(provenance.get("n_chunks") or (self.layout.n_chunks if self.layout else 0))
        if LEGACY_DONE in group:
            done = np.asarray(group[LEGACY_DONE][:]) == 1
            return ChunkProgress(done, _read_level_array(group, done.size) if levels else None)
        if provenance.get("status") == "complete" and LEVEL_ARRAY in group:
            done = np.ones(n_chunks, dtype=bool)
            return ChunkProgress(done, _read_level_array(group, n_chunks) if levels else None)
        split_every = int(provenance.get("split_every") or self.layout.split_every)
        nodes = frontier(self.records.list(), n_chunks, split_every)
        done = covered(nodes, n_chunks, split_every)
        if not levels:
            return ChunkProgress(done, None)
        codes = self._level_codes(nodes, n_chunks, split_every)
        return ChunkProgress(done, [_level_name(LEVEL_CODES, code) for code in codes.tolist()])

    def _level_codes(self, nodes: Iterable[Node], n_chunks: int, split_every: int) -> np.ndarray:
        """The level code of every chunk ``nodes`` cover (0 elsewhere), from their records, shape (n_chunks,)."""
        codes = np.zeros(n_chunks, dtype=np.uint8)
        for node in nodes:
            chunks = node_chunks(*node, split_every, n_chunks)
            codes[chunks.start : chunks.stop] = self.records.read_levels(node, len(chunks))
        return codes

    # ----------------------------------------------------------------------- after the job

    def finish(self, values: Mapping[str, Any], *, keep_partials: bool = False, **provenance: Any) -> None:
        """Write the stored REDUCE arrays, the chunks' levels and the figures, set status "complete"
        (the last write of a job), then remove the records unless ``keep_partials``.

        ``values`` holds each REDUCE entry's sum (a stored one as its array, in its
        output dtype and shape; an unstored one, a count, goes into the
        provenance's ``sums``) and each FIGURE entry's figure.
        """
        group = self.group()
        for entry in self.layout.of_kind(Kind.REDUCE):
            if entry.stored:
                group[entry.name][...] = values[entry.name]
        self._write_levels(group)
        unstored = {
            entry.name: values[entry.name]
            for entry in self.layout.of_kind(Kind.REDUCE)
            if not entry.stored and np.ndim(values[entry.name]) == 0  # a count; a partial such as the top feeds a figure
        }
        figures = {entry.name: values[entry.name] for entry in self.layout.of_kind(Kind.FIGURE)}
        group.attrs[ATTR] = {**group.attrs[ATTR], "sums": unstored, **figures, **provenance, "status": "complete"}
        if not keep_partials:
            self.records.remove_all()

    def _write_levels(self, group: zarr.Group) -> None:
        """The level code of every chunk, from the records that cover them all, as one array."""
        n_chunks = self.layout.n_chunks
        codes = self._level_codes(self.frontier(), n_chunks, self.layout.split_every)
        group.create_array(
            LEVEL_ARRAY,
            shape=(n_chunks,),
            chunks=(max(n_chunks, 1),),
            dtype="uint8",
            fill_value=0,
            attributes={"codes": list(LEVEL_CODES)},
            overwrite=True,
        )[...] = codes

    def read_values(self) -> dict[str, Any]:
        """The finished values of a complete output, as the job that finished it returned them.

        Each stored REDUCE entry's array, each unstored count (from the
        provenance), and each FIGURE from the provenance.
        """
        group = self.group("r")
        stored = group.attrs[ATTR]
        values: dict[str, Any] = {}
        for entry in self.layout.of_kind(Kind.REDUCE):
            if entry.stored:
                values[entry.name] = np.asarray(group[entry.name][...])
            elif entry.name in (stored.get("sums") or {}):
                values[entry.name] = stored["sums"][entry.name]
            elif entry.name == "nonfinite_dA_prev":  # written before the records: the per-chunk counts
                values[entry.name] = np.asarray(group[f"{PROGRESS}/nonfinite"][:]).sum(axis=0).item()
        return {**values, **{entry.name: stored.get(entry.name) for entry in self.layout.of_kind(Kind.FIGURE)}}


@dataclass(frozen=True)
class ChunkProgress:
    """How far an output got.

    Attributes
    ----------
    done : ndarray of bool, shape (n_chunks,)
    levels : list of str, optional
        The SIMD level each chunk ran at ("unknown" for a chunk not done, or done
        by a dconv that did not record levels); None when not asked for.
    """

    done: np.ndarray
    levels: list[str] | None


def _options_key(storage_options: Mapping[str, Any]) -> str:
    return json.dumps(dict(storage_options), sort_keys=True, default=str)


@lru_cache(maxsize=8)
def _block_arrays(url: str, options_key: str, layout: OutputLayout) -> dict[str, zarr.Array]:
    """The BLOCK arrays of the output at ``url``, opened once per process and job.

    Keyed by the layout too, so an output overwritten with another layout is
    opened afresh. Every block is stored, zeros too: zarr's default first
    compares a block with the fill value, to skip empty chunks, which took 7 of
    23 ms per 17 MB block.
    """
    try:
        group = open_group(url, "r+", json.loads(options_key))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"output {public_location(url)!r} is not there: it was never created, or this worker "
            "cannot see it (local paths must be on storage every worker shares)."
        ) from e
    return {
        entry.name: group[entry.name].with_config({"write_empty_chunks": True}) for entry in layout.of_kind(Kind.BLOCK)
    }


def check_output_target(
    out: Any, input_location: str | None, *, overwrite: bool, resume: bool, kind: str
) -> None:
    """:meth:`OutputStore.check_target` for an output of ``kind`` (``"output"``, ``"model_output"``): ``out``
    has ``url``, ``storage_options``, ``location`` and ``provenance()`` (None where it is not one of that kind)."""
    _check_apart_from_input(out.url, input_location)
    if overwrite and resume:
        raise InputError("give overwrite=True or resume=True, not both.")
    if is_vacant(out.url, out.storage_options):  # nothing, or only a job's lease
        return
    if not overwrite and not resume:
        raise InputError(
            f"out {out.location!r} already exists; pass overwrite=True to replace it or resume=True to continue it."
        )
    if overwrite:
        check_replaceable(out.url, out.storage_options, kind, name="out")
    elif out.provenance() is None:
        what = "a dconv model output" if kind == "model_output" else "a dconv output"
        raise InputError(f"out {out.location!r} exists and is not {what}; refusing to resume it. Choose another path.")


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


def _level_name(codes: list[str] | tuple[str, ...], code: int) -> str:
    return codes[code] if code < len(codes) else "unknown"


def _read_level_array(group: zarr.Group, n_chunks: int) -> list[str]:
    """``_progress/level`` as level names ("unknown" where none is recorded, or if there is no such array)."""
    if LEVEL_ARRAY not in group:
        return ["unknown"] * n_chunks
    array = group[LEVEL_ARRAY]
    codes = list(array.attrs.get("codes", LEVEL_CODES))
    return [_level_name(codes, code) for code in np.asarray(array[:]).tolist()]


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

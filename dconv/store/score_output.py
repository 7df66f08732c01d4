"""What ``dconv score`` reads (the sketches, dots and norms of backward outputs) and the score output it writes.

The inputs are complete backward outputs, one layer's or a model's::

    OUT/sketch/values              (m, k_in, k_out) float32 or float16: each sample's sketch
    OUT/sketch/P_in, P_out         (k_in, K + 1), (k_out, C) float64: the projections
    OUT/dots/sample_dot            (m, n_q) float64: exact inner products with the job's queries
    OUT/stats/sample_grad_norm2    (m,) float64: each sample's |g_i|^2

A model output holds one such output per layer under ``layers/<name>`` (its
``dconv_model_output`` attribute lists them) and, at its root, the model's
``stats/sample_grad_norm2`` and ``dots/sample_dot`` (summed over the layers). A
sample's feature vector is its sketches, raveled, concatenated in layer order.

The score output::

    SCORES/                        attrs["dconv_score"]: provenance and status
    SCORES/top/positive_index      (m_query, top) int64, -1 past the end of a short list
    SCORES/top/positive_score      (m_query, top) float64
    SCORES/top/negative_index      (m_query, top) int64
    SCORES/top/negative_score      (m_query, top) float64
    SCORES/scores                  (m_train, m_query) float32, chunks (block, m_query): with --full
    SCORES/_progress/tree/         while it runs: one record per tree node (dconv.store.records)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.store.lease import LEASE_NAME
from dconv.store.locations import child_url, create_group, open_group, public_location
from dconv.store.output import StatusGroup, _check_apart_from_input, now
from dconv.store.ownership import (
    MODEL_OUTPUT_MARKER,
    OUTPUT_MARKER,
    SCORE_MARKER,
    check_replaceable,
    is_vacant,
    remove_own,
)
from dconv.store.records import RecordStore

__all__ = ["ScoreSource", "ScoreOutput", "open_source", "SCORE_ATTR", "resume_command", "TOP_ARRAYS", "SKETCH", "DOTS", "NORMS"]

SCORE_ATTR = SCORE_MARKER
"""The group attribute of a score output: its provenance and status."""

SKETCH, P_IN, P_OUT = "sketch/values", "sketch/P_in", "sketch/P_out"
DOTS = "dots/sample_dot"
NORMS = "stats/sample_grad_norm2"

TOP_ARRAYS = ("positive_index", "positive_score", "negative_index", "negative_score")
"""The arrays under ``top/``, each (m_query, top), dims ("query", "rank")."""

SCORES = "scores"


@dataclass(frozen=True)
class ScoreSource:
    """A complete backward output (one layer's or a model's) as ``dconv score`` reads it (picklable).

    Attributes
    ----------
    url : str
    layers : tuple of (str, str)
        Each layer's name and output URL, in model order (one, named "", for a one-layer output).
    m : int
        Samples.
    sketch_shapes : tuple of (int, int), or None
        Each layer's ``(k_in, k_out)``; None without sketches.
    features : int
        Length of a sample's feature vector: ``sum k_in * k_out``.
    n_q : int or None
        Queries of ``dots/sample_dot``; None without dots.
    has_norms : bool
        ``stats/sample_grad_norm2`` is there.
    """

    url: str
    layers: tuple[tuple[str, str], ...]
    m: int
    sketch_shapes: tuple[tuple[int, int], ...] | None
    n_q: int | None
    has_norms: bool
    storage_options: dict = field(default_factory=dict, repr=False)

    @property
    def location(self) -> str:
        return public_location(self.url)

    @property
    def features(self) -> int:
        return sum(k_in * k_out for k_in, k_out in self.sketch_shapes or ())

    def _group(self, url: str) -> zarr.Group:
        return open_group(url, "r", self.storage_options)

    def read_features(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start`` to ``stop``'s feature vectors, (stop - start, features) float32."""
        parts = [np.asarray(self._group(url)[SKETCH][start:stop]) for _, url in self.layers]
        out = np.empty((stop - start, self.features), dtype=np.float32)
        column = 0
        for part in parts:
            width = part.shape[1] * part.shape[2]
            out[:, column : column + width] = part.reshape(stop - start, width)
            column += width
        return out

    def read_norms(self, start: int, stop: int) -> np.ndarray:
        """``stats/sample_grad_norm2[start:stop]`` (float64)."""
        return np.asarray(self._group(self.url)[NORMS][start:stop], dtype=np.float64)

    def read_dots(self, start: int, stop: int) -> np.ndarray:
        """``dots/sample_dot[start:stop]``, (stop - start, n_q) float64."""
        return np.asarray(self._group(self.url)[DOTS][start:stop], dtype=np.float64)

    def projections(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each layer's ``(P_in, P_out)``."""
        return [(np.asarray(self._group(url)[P_IN][...]), np.asarray(self._group(url)[P_OUT][...]))
                for _, url in self.layers]


def resume_command(location: str, provenance: Mapping[str, Any]) -> str:
    """``dconv score TRAIN QUERY OUT --resume`` (``-`` for no QUERY, ``--dots`` in dot mode) and the cluster flags."""
    from dconv.cluster import ClusterOptions

    try:
        cluster = ClusterOptions.from_dict(provenance.get("cluster") or {})
    except InputError:  # a recorded cluster this dconv no longer accepts: resume on the embedded one
        cluster = ClusterOptions()
    dots = ["--dots"] if provenance.get("mode") == "dot" else []
    return shlex.join(["dconv", "score", str(provenance.get("train")), str(provenance.get("query") or "-"), location,
                       "--resume", *dots, *cluster.flags()])


def _attrs(url: str, storage_options: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    try:
        return dict(open_group(url, "r", storage_options).attrs)
    except Exception as e:  # missing, not a group, not Zarr v3
        raise InputError(f"{name} must be a dconv backward output; {public_location(url)!r} is not a Zarr group.") from e


def _members(url: str, storage_options: Mapping[str, Any] | None) -> zarr.Group:
    return open_group(url, "r", storage_options)


def _has(group: zarr.Group, path: str) -> bool:
    try:
        group[path]
    except KeyError:
        return False
    return True


def open_source(url: str, storage_options: Mapping[str, Any] | None, name: str) -> ScoreSource:
    """Read what ``dconv score`` needs of the backward output at ``url`` (metadata only).

    Parameters
    ----------
    name : str
        The argument's name for messages (``"TRAIN_OUT"``).

    Raises
    ------
    InputError
        ``url`` is not a dconv output, or not complete; its layers' sketches are
        missing in some layers only, or have shapes that disagree with their projections.
    """
    options = dict(storage_options or {})
    location = public_location(url)
    attrs = _attrs(url, options, name)
    if isinstance(attrs.get(MODEL_OUTPUT_MARKER), Mapping):
        provenance = attrs[MODEL_OUTPUT_MARKER]
        layers = tuple((entry["name"], child_url(url, entry["path"])) for entry in provenance.get("layers_run", []))
    elif isinstance(attrs.get(OUTPUT_MARKER), Mapping):
        provenance = attrs[OUTPUT_MARKER]
        layers = (("", url),)
    else:
        raise InputError(f"{name} must be a dconv backward output; {location!r} has no 'dconv' attribute.")
    status = provenance.get("status", "unknown")
    if status != "complete":
        raise InputError(f"{name} must be a complete output; {location!r} is {status!r} instead.")
    root = _members(url, options)
    groups = [(layer, _members(layer_url, options)) for layer, layer_url in layers]
    sketched = [layer for layer, group in groups if _has(group, SKETCH)]
    if sketched and len(sketched) < len(groups):
        bare = next(layer for layer, _ in groups if layer not in sketched)
        raise InputError(f"{name} must have sketches in every layer or in none; layer {bare!r} of {location!r} has none.")
    shapes, sizes = [], set()
    for layer, group in groups if sketched else ():
        values = group[SKETCH]
        if values.ndim != 3 or values.dtype not in (np.float32, np.float16):
            raise InputError(f"{name} sketch/values must be (m, k_in, k_out) float32 or float16; got "
                             f"{values.shape} {values.dtype} instead (in {location!r} {layer}).")
        shapes.append((int(values.shape[1]), int(values.shape[2])))
        sizes.add(int(values.shape[0]))
    n_q = int(root[DOTS].shape[1]) if _has(root, DOTS) else None
    if n_q is not None:
        sizes.add(int(root[DOTS].shape[0]))
    if not sizes:
        raise InputError(f"{name} must hold sketches or dots (sketch/values, dots/sample_dot); {location!r} has neither.")
    if len(sizes) > 1:
        raise InputError(f"{name} must have one m in all its sketches and dots; {location!r} has {sorted(sizes)} instead.")
    m = sizes.pop()
    return ScoreSource(
        url=url, layers=layers, m=m, sketch_shapes=tuple(shapes) if shapes else None, n_q=n_q,
        has_norms=_has(root, NORMS), storage_options=options,
    )


@dataclass(frozen=True)
class ScoreOutput(StatusGroup):
    """A picklable handle on a score output group; the tasks write their records (and scores) through it."""

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)

    ATTRIBUTE: ClassVar[str] = SCORE_ATTR

    @property
    def records(self) -> RecordStore:
        return RecordStore(self.url, self.storage_options)

    def check_target(self, inputs: list[str], *, overwrite: bool, resume: bool) -> None:
        """Refuse an ``out`` that would lose data: inside (or around) an input; there already,
        unless ``resume`` (a score output) or ``overwrite`` (a score output and nothing more).

        Raises
        ------
        InputError
        """
        for location in inputs:
            _check_apart_from_input(self.url, location)
        if overwrite and resume:
            raise InputError("give overwrite=True or resume=True, not both.")
        if is_vacant(self.url, self.storage_options):
            return
        if not overwrite and not resume:
            raise InputError(
                f"out {self.location!r} already exists; pass overwrite=True to replace it or resume=True to continue it."
            )
        if overwrite:
            check_replaceable(self.url, self.storage_options, "score", name="out")
        elif self.provenance() is None:
            raise InputError(f"out {self.location!r} exists and is not a dconv score output; refusing to resume it.")

    def create(self, provenance: Mapping[str, Any], *, m_train: int, m_query: int, top: int,
               full: bool, block: int) -> None:
        """Replace a score output there (but the lease), and create this one with status "running"."""
        remove_own(self.url, self.storage_options, "score", keep=(LEASE_NAME,))
        group = create_group(self.url, self.storage_options, {SCORE_ATTR: {**provenance, "status": "running",
                                                                           "started": now()}})
        lists = group.create_group("top")
        for name in TOP_ARRAYS:
            lists.create_array(
                name, shape=(m_query, top), chunks=(m_query, top), dtype="int64" if "index" in name else "float64",
                fill_value=-1 if "index" in name else np.nan, dimension_names=["query", "rank"],
            )
        if full:
            group.create_array(
                SCORES, shape=(m_train, m_query), chunks=(block, m_query), dtype="float32", fill_value=np.nan,
                compressors=None, dimension_names=["train", "query"],
            )

    def write_scores(self, start: int, scores: np.ndarray) -> None:
        """Rows ``start`` to ``start + len(scores)`` of ``scores`` (a task writes its block: whole chunks)."""
        self.group()[SCORES][start : start + scores.shape[0]] = np.asarray(scores, dtype=np.float32)  # no copy of float32

    def finish(self, lists: Mapping[str, np.ndarray], **provenance: Any) -> None:
        """Write the top lists, remove the records, set status "complete" (the last write)."""
        group = self.group()
        for name in TOP_ARRAYS:
            group[f"top/{name}"][...] = lists[name]
        self.records.remove_all()
        self.update(**provenance, status="complete", finished=now())

    def read_top(self, name: str, queries: int | None = None) -> np.ndarray:
        """``top/<name>``, its first ``queries`` rows (all if None)."""
        array = self.group("r")[f"top/{name}"]
        return np.asarray(array[: array.shape[0] if queries is None else queries])

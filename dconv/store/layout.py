"""The output layout: one table of everything a job writes.

:data:`OUTPUT_LAYOUT` declares each output entry once: its name, its shape and
dtype rules, its dimension names, the job option it belongs to, and its *kind*:

- ``Kind.BLOCK``: an array along m; each chunk task writes its own rows
  (``dA_prev``, ``stats/sample_grad_norm2``).
- ``Kind.REDUCE``: a partial per chunk, reduced along the tree in chunk order
  (added, unless the entry has a ``combine`` of its own) and written at the
  finish (``dW``, ``db``, ``stats/dW_sq``). While the job runs, the partials of
  the tree's nodes are kept in ``_progress/tree`` (:mod:`dconv.store.records`)
  so a resumed job can read them back. An entry with ``stored=False`` has no
  output array: a count goes into the provenance (the NaN/Inf count of
  ``dA_prev``), anything else only feeds a figure (the top samples).
- ``Kind.FIGURE``: a figure computed at the finish from the reduced values,
  written into the provenance attribute under its name (the NaN/Inf counts,
  the gradient statistics).

An entry with ``part`` set is in a job's layout only when that job option is
on: ``dA_prev`` (on by default, off with ``--no-dA-prev``) and ``stats`` (off
by default, on with ``--stats``). Entry names are paths in the output group:
the statistics live in its ``stats/`` subgroup; their names, values and
figures are :mod:`dconv.statistics`'s.

Creating the output, a chunk task's write, resume, the finish, ``inspect`` and
``open_result`` all work over this table; the chunk function
(:func:`dconv.graph.chunk_partial`) returns one value per BLOCK and REDUCE entry.
Adding an output array means one entry here and one value there.

Shape rules take the job's input shapes, ``{"A_prev": (m, H, W, C_prev),
"dZ": (m, n_H, n_W, C), "W": (fh, fw, C_prev, C)}``. A dtype of ``"compute"``
is the job's compute dtype (float32 or float64).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from dconv.statistics import (
    DB_SQ,
    DW_SQ,
    SAMPLE_GRAD_NORM2,
    STATS,
    TOP,
    TOP_DTYPE,
    TOP_SAMPLES,
    gradient_figures,
    merge_top,
)

SAMPLE_DOT = "dots/sample_dot"
"""Each sample's exact inner products with the query gradients, ``<G_i, Q_j>``: float64, (m, n_q)."""

SKETCH_VALUES = "sketch/values"
"""Each sample's sketch ``P_in G_i P_out^T``: (m, k_in, k_out), float32 or float16."""

SKETCH_PROJECTIONS = ("sketch/P_in", "sketch/P_out")
"""The projections of the sketches, float64: (k_in, K + 1) and (k_out, C), written when the output is made."""

__all__ = [
    "SAMPLE_DOT",
    "SKETCH_VALUES",
    "SKETCH_PROJECTIONS",
    "Kind",
    "OutputEntry",
    "OUTPUT_LAYOUT",
    "PlacedEntry",
    "OutputLayout",
    "place_layout",
    "DIMENSIONS",
    "PROGRESS",
]

PROGRESS = "_progress"
"""The subgroup of bookkeeping: the tree-node records while a job runs, the chunks' SIMD levels once it is complete."""

Shapes = Mapping[str, tuple[int, ...]]


class Kind(enum.Enum):
    BLOCK = "block"
    REDUCE = "reduce"
    FIGURE = "figure"


@dataclass(frozen=True)
class OutputEntry:
    """One entry of the output layout.

    Attributes
    ----------
    name : str
        The array's path in the output group, and the key of its value in a
        chunk's partial and in the result.
    kind : Kind
    shape : callable, optional
        Input shapes -> the output array's shape (BLOCK and REDUCE).
    dims : tuple of str
        Dimension names, one per axis; shared names are shared dimensions in xarray.
    dtype : str
        ``"compute"`` (the job's dtype) or a NumPy dtype name.
    partial_shape : callable, optional
        REDUCE: input shapes -> the shape of one chunk's partial, if not ``shape``.
    partial_dtype : str or numpy.dtype
        REDUCE: the dtype partials are kept and reduced in.
    combine : callable, optional
        REDUCE: ``(left, right) -> partial``, the reduction of two consecutive
        partials (left first); default: their sum.
    stored : bool
        REDUCE: False keeps no output array; a scalar (a count) is kept in the
        provenance's ``sums``.
    figure : callable, optional
        FIGURE: ``figure(finished, sums, m)``, with ``finished`` the reduced
        values by name (a stored one in its output dtype and shape), ``sums``
        the same before that cast (float64 for ``dW`` and ``db``) and ``m`` the
        batch size -> a JSON-friendly figure.
    part : str, optional
        The job option (``"dA_prev"``, ``"stats"``) without which the entry is not in the layout.
    """

    name: str
    kind: Kind
    shape: Callable[[Shapes], tuple[int, ...]] | None = None
    dims: tuple[str, ...] = ()
    dtype: str = "compute"
    partial_shape: Callable[[Shapes], tuple[int, ...]] | None = None
    partial_dtype: Any = "float64"
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    stored: bool = True
    figure: Callable[[Mapping[str, Any], Mapping[str, np.ndarray], int], Any] | None = None
    part: str | None = None

    @property
    def has_array(self) -> bool:
        """Whether the output group holds an array of this name."""
        return self.kind is Kind.BLOCK or (self.kind is Kind.REDUCE and self.stored)


def count_nonfinite(array: np.ndarray) -> int:
    """The number of NaN and Inf values in ``array``."""
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def _nonfinite_counts(finished: Mapping[str, Any], sums: Mapping[str, np.ndarray], m: int) -> dict[str, int]:
    """NaN and Inf values in each gradient (``dA_prev`` only when the job wrote it)."""
    counts = {"dA_prev": int(finished["nonfinite_dA_prev"])} if "nonfinite_dA_prev" in finished else {}
    return {**counts, "dW": count_nonfinite(finished["dW"]), "db": count_nonfinite(finished["db"])}


A_PREV_DIMS = ("m", "n_H_prev", "n_W_prev", "C_prev")
"""Dimension names of ``A_prev`` and ``dA_prev`` (``n_H_prev``, not ``H`` or ``W``: no dimension is named as an
array is, or xarray would make that array a coordinate)."""
W_DIMS = ("fh", "fw", "C_prev", "C")
B_DIMS = ("b_h", "b_w", "b_c", "C")

OUTPUT_LAYOUT: tuple[OutputEntry, ...] = (
    OutputEntry("dA_prev", Kind.BLOCK, shape=lambda s: s["A_prev"], dims=A_PREV_DIMS, part="dA_prev"),
    OutputEntry("dW", Kind.REDUCE, shape=lambda s: s["W"], dims=W_DIMS),
    OutputEntry(
        "db",
        Kind.REDUCE,
        shape=lambda s: (1, 1, 1, s["W"][3]),
        dims=B_DIMS,
        partial_shape=lambda s: (s["W"][3],),
    ),
    OutputEntry(
        "nonfinite_dA_prev",
        Kind.REDUCE,
        partial_shape=lambda s: (),
        partial_dtype="int64",
        stored=False,
        part="dA_prev",
    ),
    OutputEntry("nonfinite", Kind.FIGURE, figure=_nonfinite_counts),
    OutputEntry(
        SAMPLE_GRAD_NORM2, Kind.BLOCK, shape=lambda s: s["A_prev"][:1], dims=("m",), dtype="float64",
        part=STATS,
    ),
    OutputEntry(
        DW_SQ, Kind.REDUCE, shape=lambda s: s["W"], dims=W_DIMS, dtype="float64",
        part=STATS,
    ),
    OutputEntry(
        DB_SQ, Kind.REDUCE, shape=lambda s: (1, 1, 1, s["W"][3]), dims=B_DIMS,
        dtype="float64", part=STATS,
    ),
    OutputEntry(
        TOP,
        Kind.REDUCE,
        partial_shape=lambda s: (TOP_SAMPLES,),
        partial_dtype=TOP_DTYPE,
        combine=merge_top,
        stored=False,
        part=STATS,
    ),
    OutputEntry(STATS, Kind.FIGURE, figure=gradient_figures, part=STATS),
    OutputEntry(
        SAMPLE_DOT, Kind.BLOCK, shape=lambda s: (s["A_prev"][0], s["queries"][0]), dims=("m", "query"),
        dtype="float64", part="dot",
    ),
    OutputEntry(
        SKETCH_VALUES, Kind.BLOCK, shape=lambda s: (s["A_prev"][0], *s["sketch"]), dims=("m", "k_in", "k_out"),
        dtype="sketch", part="sketch",
    ),
)
"""What a backward job writes. See the module docstring for the kinds."""

INPUT_DIMENSIONS = {
    "A_prev": A_PREV_DIMS,
    "dZ": ("m", "n_H", "n_W", "C"),
    "W": W_DIMS,
    "b": B_DIMS,
}

DIMENSIONS: dict[str, tuple[str, ...]] = {
    **INPUT_DIMENSIONS,
    **{entry.name: entry.dims for entry in OUTPUT_LAYOUT if entry.dims},
}
"""Dimension names of every input and output array: one name per axis, shared across arrays, none an array's name.

Groups written by earlier versions of dconv name the height and width of ``A_prev`` and ``dA_prev``
``H`` and ``W``; dimension names are never checked on read, so they are read as before."""


@dataclass(frozen=True)
class PlacedEntry:
    """An :class:`OutputEntry` with its shapes and dtypes worked out for one job (plain data: tasks get it).

    ``chunks`` is the output array's Zarr chunks (None for entries with no output
    array), and ``has_array`` whether the output group holds an array of this name.
    """

    name: str
    kind: Kind
    shape: tuple[int, ...] | None
    dtype: str
    chunks: tuple[int, ...] | None
    dims: tuple[str, ...]
    partial_shape: tuple[int, ...] | None
    partial_dtype: Any
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
    stored: bool
    has_array: bool
    figure: Callable[[Mapping[str, Any], Mapping[str, np.ndarray], int], Any] | None = None


@dataclass(frozen=True)
class OutputLayout:
    """The layout of one job's output: the placed entries, and how the batch is cut.

    Attributes
    ----------
    entries : tuple of PlacedEntry
    batch_chunk : int
        Samples per chunk task; BLOCK arrays are chunked the same way along m.
    n_chunks : int
    split_every : int
        The reduction tree's fan-in: its nodes are the records' nodes (:mod:`dconv.store.records`).
    m : int
        The batch size.
    bias : bool
        The layer has a bias. Without one, a sample's gradient is ``dW_i`` alone: the statistics
        and their figures leave ``db`` out.
    """

    entries: tuple[PlacedEntry, ...]
    batch_chunk: int
    n_chunks: int
    split_every: int = 8
    m: int = 0
    bias: bool = True

    def of_kind(self, kind: Kind) -> tuple[PlacedEntry, ...]:
        return tuple(entry for entry in self.entries if entry.kind is kind)

    def has(self, name: str) -> bool:
        """Whether the job writes entry ``name`` (an entry of a ``part`` it has not is not in its layout)."""
        return any(entry.name == name for entry in self.entries)

    @property
    def groups(self) -> tuple[str, ...]:
        """The subgroups its arrays live in (``"stats"``), in table order."""
        return tuple(dict.fromkeys(entry.name.rpartition("/")[0] for entry in self.arrays if "/" in entry.name))

    @property
    def arrays(self) -> tuple[PlacedEntry, ...]:
        """The entries that are arrays in the output group, in table order."""
        return tuple(entry for entry in self.entries if entry.has_array)


def place_layout(
    shapes: Shapes,
    compute_dtype: Any,
    batch_chunk: int,
    split_every: int = 8,
    table: tuple[OutputEntry, ...] = OUTPUT_LAYOUT,
    *,
    dA_prev: bool = True,
    stats: bool = False,
    bias: bool = True,
    queries: int | None = None,
    sketch: tuple[int, int] | None = None,
    sketch_dtype: str = "float32",
) -> OutputLayout:
    """Work out ``table`` for one job: the entries of the parts it has, with their shapes and dtypes.

    Parameters
    ----------
    shapes : mapping
        The input shapes, ``A_prev`` (m, H, W, C_prev), ``dZ`` (m, n_H, n_W, C), ``W`` (fh, fw, C_prev, C).
    compute_dtype : dtype
    batch_chunk : int
        Samples per chunk task.
    split_every : int
        The reduction tree's fan-in.
    dA_prev, stats : bool
        The job writes dA_prev, and the gradient statistics (the entries of those ``part``\\ s).
    bias : bool
        The layer has a bias (:attr:`OutputLayout.bias`).
    queries : int, optional
        With ``n_q`` query gradients: ``dots/sample_dot`` (m, n_q).
    sketch : (k_in, k_out), optional
        With sketches: ``sketch/values`` (m, k_in, k_out) in ``sketch_dtype``.
    """
    m = shapes["A_prev"][0]
    compute = str(np.dtype(compute_dtype))
    parts = {"dA_prev": dA_prev, STATS: stats, "dot": queries is not None, "sketch": sketch is not None}
    shapes = {**shapes, "queries": (queries or 0,), "sketch": tuple(sketch or (0, 0))}
    placed = []
    for entry in table:
        if entry.part is not None and not parts[entry.part]:
            continue
        shape = tuple(entry.shape(shapes)) if entry.shape else None
        chunks = None
        if entry.kind is Kind.BLOCK:
            chunks = (min(batch_chunk, m), *shape[1:])
        elif entry.kind is Kind.REDUCE and entry.stored:
            chunks = shape
        partial_shape = None
        if entry.kind is Kind.REDUCE:
            partial_shape = tuple(entry.partial_shape(shapes)) if entry.partial_shape else shape
        placed.append(
            PlacedEntry(
                name=entry.name,
                kind=entry.kind,
                shape=shape,
                dtype={"compute": compute, "sketch": sketch_dtype}.get(entry.dtype, entry.dtype),
                chunks=chunks,
                dims=entry.dims,
                partial_shape=partial_shape,
                partial_dtype=entry.partial_dtype,
                combine=entry.combine,
                stored=entry.stored,
                has_array=entry.has_array,
                figure=entry.figure,
            )
        )
    return OutputLayout(tuple(placed), batch_chunk, -(-m // batch_chunk), split_every, m, bias)


def figures(layout: OutputLayout, finished: Mapping[str, Any], sums: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The FIGURE entries of ``layout``, computed from the reduced values (see :class:`OutputEntry`).

    For a layer without a bias the figures see ``db`` as zero: it is no part of a sample's gradient.
    """
    if not layout.bias and "db" in sums:
        sums = {**sums, "db": np.zeros_like(sums["db"])}
    return {entry.name: entry.figure(finished, sums, layout.m) for entry in layout.of_kind(Kind.FIGURE)}

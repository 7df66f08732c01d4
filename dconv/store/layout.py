"""The output layout: one table of everything a job writes.

:data:`OUTPUT_LAYOUT` declares each output entry once: its name, its shape and
dtype rules, its dimension names, and its *kind*:

- ``Kind.BLOCK``: an array along m; each chunk task writes its own rows (``dA_prev``).
- ``Kind.SUM``: a float64 partial per chunk, summed in chunk order by the tree
  reduction and written at the finish in the job's dtype (``dW``, ``db``). While
  the job runs, the partials of the tree's nodes are kept in ``_progress/tree``
  (:mod:`dconv.store.records`) so a resumed job can read them back. An entry
  with ``stored=False`` has no output array: its sum goes into the provenance
  (the NaN/Inf count of ``dA_prev``).
- ``Kind.FIGURE``: a figure computed at the finish from the sums, written into
  the provenance attribute under its name (the NaN/Inf counts).

Creating the output, a chunk task's write, resume, the finish, ``inspect`` and
``open_result`` all work over this table; the chunk function
(:func:`dconv.graph.chunk_partial`) returns one value per BLOCK and SUM entry.
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

__all__ = [
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
    SUM = "sum"
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
        Input shapes -> the output array's shape (BLOCK and SUM).
    dims : tuple of str
        Dimension names, one per axis; shared names are shared dimensions in xarray.
    dtype : str
        ``"compute"`` (the job's dtype) or a NumPy dtype name.
    partial_shape : callable, optional
        SUM: input shapes -> the shape of one chunk's partial, if not ``shape``.
    partial_dtype : str
        SUM: the dtype partials are kept and summed in.
    stored : bool
        SUM: False keeps only the sum (in the provenance), with no output array.
    figure : callable, optional
        FIGURE: ``{name: value}`` of the finished SUM entries (a stored one in its
        output dtype and shape) -> a JSON-friendly figure.
    """

    name: str
    kind: Kind
    shape: Callable[[Shapes], tuple[int, ...]] | None = None
    dims: tuple[str, ...] = ()
    dtype: str = "compute"
    partial_shape: Callable[[Shapes], tuple[int, ...]] | None = None
    partial_dtype: str = "float64"
    stored: bool = True
    figure: Callable[[Mapping[str, np.ndarray]], Any] | None = None

    @property
    def has_array(self) -> bool:
        """Whether the output group holds an array of this name."""
        return self.kind is Kind.BLOCK or (self.kind is Kind.SUM and self.stored)


def count_nonfinite(array: np.ndarray) -> int:
    """The number of NaN and Inf values in ``array``."""
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def _nonfinite_counts(sums: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {"dA_prev": int(sums["nonfinite_dA_prev"]), "dW": count_nonfinite(sums["dW"]), "db": count_nonfinite(sums["db"])}


OUTPUT_LAYOUT: tuple[OutputEntry, ...] = (
    OutputEntry("dA_prev", Kind.BLOCK, shape=lambda s: s["A_prev"], dims=("m", "H", "W", "C_prev")),
    OutputEntry("dW", Kind.SUM, shape=lambda s: s["W"], dims=("fh", "fw", "C_prev", "C")),
    OutputEntry(
        "db",
        Kind.SUM,
        shape=lambda s: (1, 1, 1, s["W"][3]),
        dims=("b_h", "b_w", "b_c", "C"),
        partial_shape=lambda s: (s["W"][3],),
    ),
    OutputEntry(
        "nonfinite_dA_prev",
        Kind.SUM,
        partial_shape=lambda s: (),
        partial_dtype="int64",
        stored=False,
    ),
    OutputEntry("nonfinite", Kind.FIGURE, figure=_nonfinite_counts),
)
"""What a backward job writes. See the module docstring for the kinds."""

INPUT_DIMENSIONS = {
    "A_prev": ("m", "H", "W", "C_prev"),
    "dZ": ("m", "n_H", "n_W", "C"),
    "W": ("fh", "fw", "C_prev", "C"),
    "b": ("b_h", "b_w", "b_c", "C"),
}

DIMENSIONS: dict[str, tuple[str, ...]] = {
    **INPUT_DIMENSIONS,
    **{entry.name: entry.dims for entry in OUTPUT_LAYOUT if entry.dims},
}
"""Dimension names of every input and output array: one name per axis, shared across arrays."""


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
    partial_dtype: str
    stored: bool
    has_array: bool


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
    """

    entries: tuple[PlacedEntry, ...]
    batch_chunk: int
    n_chunks: int
    split_every: int = 8

    def of_kind(self, kind: Kind) -> tuple[PlacedEntry, ...]:
        return tuple(entry for entry in self.entries if entry.kind is kind)

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
) -> OutputLayout:
    """Work out ``table`` for one job.

    Parameters
    ----------
    shapes : mapping
        The input shapes, ``A_prev`` (m, H, W, C_prev), ``dZ`` (m, n_H, n_W, C), ``W`` (fh, fw, C_prev, C).
    compute_dtype : dtype
    batch_chunk : int
        Samples per chunk task.
    split_every : int
        The reduction tree's fan-in.
    """
    m = shapes["A_prev"][0]
    compute = str(np.dtype(compute_dtype))
    placed = []
    for entry in table:
        shape = tuple(entry.shape(shapes)) if entry.shape else None
        chunks = None
        if entry.kind is Kind.BLOCK:
            chunks = (min(batch_chunk, m), *shape[1:])
        elif entry.kind is Kind.SUM and entry.stored:
            chunks = shape
        partial_shape = None
        if entry.kind is Kind.SUM:
            partial_shape = tuple(entry.partial_shape(shapes)) if entry.partial_shape else shape
        placed.append(
            PlacedEntry(
                name=entry.name,
                kind=entry.kind,
                shape=shape,
                dtype=compute if entry.dtype == "compute" else entry.dtype,
                chunks=chunks,
                dims=entry.dims,
                partial_shape=partial_shape,
                partial_dtype=entry.partial_dtype,
                stored=entry.stored,
                has_array=entry.has_array,
            )
        )
    return OutputLayout(tuple(placed), batch_chunk, -(-m // batch_chunk), split_every)


def figures(sums: Mapping[str, np.ndarray], table: tuple[OutputEntry, ...] = OUTPUT_LAYOUT) -> dict[str, Any]:
    """The FIGURE entries of ``table``, computed from the finished SUM entries (see :class:`OutputEntry`)."""
    return {entry.name: entry.figure(sums) for entry in table if entry.kind is Kind.FIGURE}

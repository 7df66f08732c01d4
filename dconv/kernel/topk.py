"""Per-query top lists: the ``top`` largest and smallest scores of each query, with their train indices.

For every query the *positive* list is its ``top`` largest scores, the *negative* list its
``top`` smallest, each ordered by score (descending, resp. ascending), ties by train index
(ascending)::

    positive[q] = first top of sorted((-score[q, i], i) for every train sample i)
    negative[q] = first top of sorted(( score[q, i], i) for every train sample i)

NaN scores are in neither list. A list with fewer than ``top`` samples is padded
with index -1 and score NaN. Each list is the first ``top`` of one total order
(score, then index) over the train samples, so merging lists (:func:`merge_top`)
is associative and commutative, and any tree of merges over any cut of the train
samples gives the same bits.

:class:`RunningTop` keeps the lists of a run of train samples given a panel at a time,
in increasing index: a score joins a query's list only if it reaches the list's
current ``top``-th score (its *bound*), so after the first panels almost every
query's row of a panel is passed over after one look at its largest and smallest
score. Where the compiled loops run (:mod:`dconv.simd`), ``_flatconv.top_add`` does the same
in one pass over the panel, with the same result; else NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dconv import simd
from dconv.simd import _flatconv  # the compiled loops, or None

__all__ = ["TopLists", "RunningTop", "merge_top", "dense_top"]


@dataclass(frozen=True)
class TopLists:
    """The positive and negative lists of every query.

    Attributes
    ----------
    positive_index, negative_index : ndarray, shape (n_q, top), int64
        Train indices, -1 past the end of a short list.
    positive_score, negative_score : ndarray, shape (n_q, top), float64
        Their scores, NaN past the end of a short list.
    """

    positive_index: np.ndarray
    positive_score: np.ndarray
    negative_index: np.ndarray
    negative_score: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The four arrays by name (as a record stores them)."""
        return {
            "positive_index": self.positive_index,
            "positive_score": self.positive_score,
            "negative_index": self.negative_index,
            "negative_score": self.negative_score,
        }


def _select(query: np.ndarray, index: np.ndarray, score: np.ndarray, n_q: int, top: int, largest: bool):
    """The first ``top`` candidates of each query by (score, index): ``(index, score)``, each (n_q, top).

    ``query``, ``index``, ``score`` (n,) are candidates, without NaN scores.
    """
    # lexsort: the last key is the primary one
    order = np.lexsort((index, -score if largest else score, query))
    return _first(query[order], index[order], score[order], n_q, top)


def _first(query: np.ndarray, index: np.ndarray, score: np.ndarray, n_q: int, top: int):
    """The first ``top`` of each query's run of sorted candidates, as (n_q, top) arrays padded with -1 and NaN."""
    first = np.searchsorted(query, np.arange(n_q))             # each query's first candidate
    rank = np.arange(query.size) - first[query]
    keep = rank < top
    out_index = np.full((n_q, top), -1, dtype=np.int64)
    out_score = np.full((n_q, top), np.nan, dtype=np.float64)
    out_index[query[keep], rank[keep]] = index[keep]
    out_score[query[keep], rank[keep]] = score[keep]
    return out_index, out_score


class _RunningSide:
    """One side of :class:`RunningTop`: every query's list (its bound, the last score of a full list, is read from it)."""

    def __init__(self, n_q: int, top: int, largest: bool):
        self.top, self.largest = top, largest
        self.index = np.full((n_q, top), -1, dtype=np.int64)
        self.score = np.full((n_q, top), np.nan)

    def _bound(self, dtype: np.dtype) -> np.ndarray:
        """Each list's last score where it is full; -inf (+inf) where it is short: every score reaches it."""
        short = -np.inf if self.largest else np.inf
        return np.where(self.index[:, -1] >= 0, self.score[:, -1], short).astype(dtype)

    def _reaching(self, panel: np.ndarray, bound: np.ndarray) -> np.ndarray:
        """The queries one of whose scores in ``panel`` may join their list (those with a NaN too)."""
        if self.largest:
            return np.flatnonzero(~(panel.max(axis=1) < bound))
        return np.flatnonzero(~(panel.min(axis=1) > bound))

    def _thresholds(self, rows: np.ndarray, scores: np.ndarray, bound: np.ndarray) -> np.ndarray:
        """The least score that may join each of ``rows``' lists: its bound, or for a short list the
        ``top``-th score of its row of the panel (``top`` scores there are at least that), NaN left out."""
        threshold = bound[rows]
        width = scores.shape[1]
        short = np.flatnonzero(self.index[rows, -1] < 0)
        if short.size and width > self.top:
            far = -np.inf if self.largest else np.inf
            keys = np.where(np.isnan(scores[short]), far, scores[short])
            kth = width - self.top if self.largest else self.top - 1
            threshold[short] = np.partition(keys, kth, axis=1)[:, kth]
        return threshold

    def add(self, panel: np.ndarray, first: int) -> None:
        bound = self._bound(panel.dtype)
        rows = self._reaching(panel, bound)
        if rows.size == 0:
            return
        scores = panel[rows]                                          # (r, width)
        threshold = self._thresholds(rows, scores, bound)[:, None]
        row, column = np.nonzero(scores >= threshold if self.largest else scores <= threshold)  # NaN never
        if row.size == 0:
            return
        held = np.unique(row)                                         # the rows that get candidates
        queries = rows[held]
        old_index, old_score = self.index[queries], self.score[queries]
        old_row, old_slot = np.nonzero(old_index >= 0)
        local = np.concatenate([old_row, np.searchsorted(held, row)])
        index = np.concatenate([old_index[old_row, old_slot], first + column.astype(np.int64)])
        score = np.concatenate([old_score[old_row, old_slot], scores[row, column].astype(np.float64)])
        new_index, new_score = _select(local, index, score, queries.size, self.top, self.largest)
        self.index[queries], self.score[queries] = new_index, new_score


def _compiled_rows(panel: np.ndarray) -> np.ndarray | None:
    """``panel``'s rows as one contiguous 1-D view from its first score to its last (the gaps between rows
    included), for ``_flatconv.top_add``; None where the compiled loops do not run or the layout does not fit."""
    if _flatconv is None or simd.active_level() == "numpy" or panel.dtype not in (np.float32, np.float64):
        return None
    n_q, width = panel.shape
    if panel.strides[1] != panel.itemsize or panel.strides[0] % panel.itemsize or panel.strides[0] < width * panel.itemsize:
        return None
    span = (n_q - 1) * (panel.strides[0] // panel.itemsize) + width
    return np.lib.stride_tricks.as_strided(panel, shape=(span,), strides=(panel.itemsize,))


class RunningTop:
    """Every query's two lists over a run of train samples given a panel at a time, in increasing index.

    Parameters
    ----------
    n_q : int
        Queries.
    top : int
        Length of each list (>= 1).
    dtype : dtype
        The scores' dtype (float32 or float64): every panel's.

    Examples
    --------
    >>> scores = np.array([[3.0, 1.0, 2.0, 5.0]])                 # one query, four train samples
    >>> running = RunningTop(1, 2, np.float64)
    >>> running.add(scores[:, :2], first=0); running.add(scores[:, 2:], first=2)
    >>> running.lists().positive_index.tolist(), running.lists().negative_index.tolist()
    ([[3, 0]], [[1, 2]])
    """

    def __init__(self, n_q: int, top: int, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.sides = (_RunningSide(n_q, top, True), _RunningSide(n_q, top, False))
        self.next = None

    def add(self, panel: np.ndarray, first: int) -> None:
        """Take ``panel`` (n_q, width): ``panel[q, j]`` is query ``q``'s score against train sample ``first + j``.

        Train samples must come in increasing index: ``first`` at least the last panel's ``first + width``.
        """
        if self.next is not None and first < self.next:
            raise ValueError(f"RunningTop.add: first must be >= {self.next} (panels in increasing index); got {first}")
        self.next = first + panel.shape[1]
        if panel.dtype != self.dtype:
            raise ValueError(f"RunningTop.add: panel must be {self.dtype}; got {panel.dtype}")
        if panel.size == 0:
            return
        rows = _compiled_rows(panel)
        if rows is None:
            for side in self.sides:
                side.add(panel, first)
            return
        positive, negative = self.sides
        _flatconv.top_add(rows, panel.shape[0], panel.shape[1], panel.strides[0] // panel.itemsize, first,
                          positive.top, positive.index, positive.score, negative.index, negative.score)

    def lists(self) -> TopLists:
        """The lists so far (copies), each (n_q, top)."""
        positive, negative = self.sides
        return TopLists(positive.index.copy(), positive.score.copy(), negative.index.copy(), negative.score.copy())


def merge_top(parts: list[TopLists], top: int) -> TopLists:
    """The lists of the union of the train samples that ``parts`` cover (disjoint), each (n_q, top).

    Each query's row of the parts' lists side by side is sorted on its own by (empty last, score, index).
    """
    lists = []
    for side, largest in (("positive", True), ("negative", False)):
        index = np.concatenate([getattr(part, f"{side}_index") for part in parts], axis=1)   # (n_q, parts * top)
        score = np.concatenate([getattr(part, f"{side}_score") for part in parts], axis=1)
        empty = index < 0
        order = np.lexsort((index, -score if largest else score, empty), axis=1)[:, :top]  # the last key first
        lists.append((np.take_along_axis(index, order, axis=1), np.take_along_axis(score, order, axis=1)))
    return TopLists(*lists[0], *lists[1])


def dense_top(scores: np.ndarray, top: int) -> TopLists:
    """The oracle: the lists of ``scores`` (m_train, n_q) by a full sort of each query's column."""
    m, n_q = scores.shape
    lists = []
    for largest in (True, False):
        out_index = np.full((n_q, top), -1, dtype=np.int64)
        out_score = np.full((n_q, top), np.nan)
        for j in range(n_q):
            column = scores[:, j].astype(np.float64)
            finite = np.flatnonzero(~np.isnan(column))
            order = sorted(finite.tolist(), key=lambda i: (-column[i] if largest else column[i], i))[:top]
            out_index[j, : len(order)] = order
            out_score[j, : len(order)] = column[order]
        lists.append((out_index, out_score))
    return TopLists(*lists[0], *lists[1])

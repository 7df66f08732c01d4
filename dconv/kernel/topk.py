"""Per-query top lists: the ``top`` largest and smallest scores of each query, with their train indices.

A score tile holds the scores of ``n_q`` queries against a run of train samples,
cut into panels of ``P`` samples (:func:`tile_top`). For every query the *positive* list is its
``top`` largest scores, the *negative* list its ``top`` smallest, each ordered by
score (descending, resp. ascending), ties by train index (ascending)::

    positive[q] = first top of sorted((-score[q, i], i) for every train sample i)
    negative[q] = first top of sorted(( score[q, i], i) for every train sample i)

NaN scores are in neither list. A list with fewer than ``top`` samples is padded
with index -1 and score NaN. Each list is the first ``top`` of one total order
(score, then index) over the train samples, so merging lists (:func:`merge_top`)
is associative and commutative, and any tree of merges over any cut of the train
samples into tiles gives the same bits. NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TopLists", "tile_top", "panel_extremes", "merge_top", "dense_top"]




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


def _select_float32(query: np.ndarray, index: np.ndarray, score: np.ndarray, n_q: int, top: int, largest: bool):
    """:func:`_select` for float32 scores whose candidates are in index order within each query: one stable
    sort of a uint64 key, ``query`` in the high half, the score's order-preserving bits in the low half
    (-0.0 taken as 0.0, as the comparison of :func:`_select` does)."""
    bits = (score + np.float32(0)).view(np.uint32)            # -0.0 + 0.0 = 0.0
    ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # larger score, larger key
    if largest:
        ordered = ~ordered
    key = (query.astype(np.uint64) << np.uint64(32)) | ordered.astype(np.uint64)
    order = np.argsort(key, kind="stable")                    # ties keep the index order
    return _first(query[order], index[order], score[order].astype(np.float64), n_q, top)


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


def _group_extreme(tile: np.ndarray, largest: bool, extreme: np.ndarray | None = None) -> np.ndarray:
    """Each group's largest (smallest) score, NaN left out; -inf (+inf) for a group of NaN only.

    ``tile`` (n_panels, n_q, P): group ``(q, j)`` is ``tile[:, q, j]``. Returns (n_q, P).
    ``extreme``: ``tile.max(axis=0)`` (``min``) if the caller has it already (it is completed in place).
    """
    if extreme is None:
        extreme = tile.max(axis=0) if largest else tile.min(axis=0)   # elementwise over whole panels
    nan = np.isnan(extreme)                                   # a NaN in the group: look again, without it
    if nan.any():
        query, column = np.nonzero(nan)
        again = (np.fmax if largest else np.fmin).reduce(tile[:, query, column], axis=0)
        extreme[nan] = np.where(np.isnan(again), -np.inf if largest else np.inf, again)
    return extreme


def _candidates(
    tile: np.ndarray, top: int, largest: bool, extreme: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(panel, query, column)`` of the scores of ``tile`` (n_panels, n_q, P) that may be in a list.

    Group ``(q, j)`` is query ``q``'s scores in column ``j`` of every panel. The
    ``top``-th largest group maximum ``t`` of a query bounds its list: ``top``
    scores are at least ``t``, so the list holds only scores ``>= t``, and those
    lie in groups whose maximum is ``>= t`` (usually ``top`` groups): only those
    are read again. Ties at ``t`` are all kept (the index decides among them
    later). NaN compares false: it is never a candidate. (For the smallest scores,
    the same with minima and ``<=``.)
    """
    n_panels, n_q, width = tile.shape
    if width <= top:                                          # fewer groups than the list: every score
        return np.nonzero(~np.isnan(tile))
    extreme = _group_extreme(tile, largest, extreme)          # (n_q, P)
    kth = width - top if largest else top - 1
    bound = np.partition(extreme, kth, axis=1)[:, kth]        # (n_q,)
    query, column = np.nonzero(extreme >= bound[:, None] if largest else extreme <= bound[:, None])
    values = tile[:, query, column]                           # (n_panels, pairs)
    keep = values >= bound[query] if largest else values <= bound[query]
    panel, pair = np.nonzero(keep)
    return panel, query[pair], column[pair]


def tile_top(
    tile: np.ndarray, first: int, top: int, extremes: tuple[np.ndarray, np.ndarray] | None = None
) -> TopLists:
    """The lists of a score tile.

    Parameters
    ----------
    tile : ndarray, shape (n_panels, n_q, P)
        ``tile[p, q, j]`` is the score of query ``q`` against train sample
        ``first + p * P + j``; NaN where there is none (padding).
    first : int
        The train index of ``tile[0, :, 0]``.
    top : int
        Length of each list (>= 1).
    extremes : (ndarray, ndarray), optional
        ``tile.max(axis=0)`` and ``tile.min(axis=0)`` (n_q, P), NaN propagated, if the caller made
        them while the panels were in cache (:func:`panel_extremes`); they are overwritten.

    Returns
    -------
    TopLists
        Each array (n_q, top); scores as float64 (exact for a float32 tile).
    """
    n_q, width = tile.shape[1], tile.shape[2]
    lists = []
    for largest, extreme in zip((True, False), extremes or (None, None)):
        panel, query, column = _candidates(tile, top, largest, extreme)   # in index order within a query
        score = tile[panel, query, column]
        index = first + panel.astype(np.int64) * width + column
        if score.dtype == np.float32:
            lists.append(_select_float32(query, index, score, n_q, top, largest))
        else:
            lists.append(_select(query, index, score.astype(np.float64), n_q, top, largest))
    return TopLists(*lists[0], *lists[1])


def panel_extremes(tile: np.ndarray, p: int, extremes: tuple[np.ndarray, np.ndarray] | None):
    """Fold panel ``p`` of ``tile`` into the running ``(max, min)`` over panels (new arrays for ``p == 0``)."""
    if extremes is None:
        return tile[p].copy(), tile[p].copy()
    np.maximum(extremes[0], tile[p], out=extremes[0])
    np.minimum(extremes[1], tile[p], out=extremes[1])
    return extremes


def merge_top(parts: list[TopLists], top: int) -> TopLists:
    """The lists of the union of the train samples that ``parts`` cover (disjoint), each (n_q, top)."""
    n_q = parts[0].positive_index.shape[0]
    lists = []
    for side, largest in (("positive", True), ("negative", False)):
        index = np.concatenate([getattr(part, f"{side}_index") for part in parts], axis=1)
        score = np.concatenate([getattr(part, f"{side}_score") for part in parts], axis=1)
        query, slot = np.nonzero(index >= 0)
        lists.append(_select(query, index[query, slot], score[query, slot], n_q, top, largest))
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

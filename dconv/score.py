"""``score_job``: score train samples against query samples by their gradient sketches, keep each query's top lists.

Two modes:

- **sketch**: ``scores = F_train @ F_query.T``, where a sample's feature vector is
  its sketches in layer order (:mod:`dconv.store.score_output`), as a float32 GEMM.
- **dot**: TRAIN's ``dots/sample_dot`` (m_train, n_q) already are the scores
  against the queries of its job.

The train samples are cut into blocks of ``block`` rows. Block task ``i`` reads its
rows' features, multiplies them by the query matrix (one shared graph key, fetched
once per worker) in panels of :data:`PANEL` train rows aligned to multiples of
``PANEL`` (so a score's bits do not depend on the block: every GEMM has the same
shape), passes each panel of scores to every query's running top lists
(:class:`dconv.kernel.topk.RunningTop`, which looks again only at the queries whose
lists a panel reaches), writes its record and, with ``full``, its rows of ``scores``. The lists are merged along
the tree of :mod:`dconv.tree` (fan-in :data:`SPLIT_EVERY`), each combine writing its
record and deleting its children's, so an interrupted job resumes from the stored
frontier. The merge keeps the first ``top`` of one total order (score, then index),
so the result has the same bits for every block size, tree and worker count::

    block 0 ... block 7     read -> per panel: GEMM (n_q, 256) -> running lists; -> record
         \\   ...   /
      combine (1, 0)         merge the lists -> record, delete the children's
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Iterator, Mapping

import dask
import numpy as np
from dask.delayed import Delayed

from dconv.cluster import ClusterOptions, connect, wait_for_workers
from dconv.errors import InputError, JobInterrupted
from dconv.graph import CHUNK_PREFIX
from dconv.kernel.topk import RunningTop, TopLists, merge_top
from dconv.option_fields import positive_number
from dconv.progress import report_chunk_done
from dconv.store.lease import DEFAULT_TIMEOUT, check_unheld, hold
from dconv.store.locations import absolute_location
from dconv.store.output import now
from dconv.store.score_output import ScoreOutput, ScoreSource, open_source, resume_command
from dconv import tree

__all__ = ["ScorePlan", "ScoreResult", "plan_score", "run_score", "score_job", "choose_block", "resume_command", "PANEL"]

PANEL = 256
"""Train rows per GEMM: every product is computed in a GEMM of this shape, so its bits never depend on the block."""

BLOCK_BYTES = 128 * 2**20
"""What a block task's train rows may hold: their features, or their dots, and their rows of ``scores`` with
``full``, in bytes."""

BLOCK_PANELS = 128
"""The most panels a default block holds: enough that a block's first panels, which fill every list, are a
small part of its work; few enough that a job has tasks for every worker and a progress bar that moves."""

SPLIT_EVERY = 8
"""Fan-in of the tree that merges the blocks' lists."""

DEFAULT_TOP = 10

BLOCK_PREFIX = f"{CHUNK_PREFIX}-score"
"""Block task keys start with the chunk prefix, so the local progress counts them."""

MODES = ("sketch", "dot")


def choose_block(m_train: int, m_query: int, features: int, mode: str, full: bool) -> int:
    """The default block: as many :data:`PANEL` s of train rows as :data:`BLOCK_BYTES` hold, at least one and
    at most :data:`BLOCK_PANELS`.

    A train row costs ``4 * features`` (its features) in sketch mode, or ``16 * m_query``
    in dot mode (its dots read as float64, and scaled with ``normalize``); ``full`` adds
    ``4 * m_query`` (the rows written). Beside the block, a task holds one panel of
    scores, ``4 * m_query * PANEL`` bytes (``8 *`` in dot mode). Never more than ``m_train``.
    """
    per_row = 4 * features if mode == "sketch" else 16 * m_query
    per_row += 4 * m_query if full else 0
    panels = min(BLOCK_PANELS, max(1, BLOCK_BYTES // max(1, per_row) // PANEL))
    return max(1, min(panels * PANEL, m_train))


@dataclass(frozen=True)
class ScorePlan:
    """A validated score job (:func:`plan_score`): nothing written yet. Picklable: it travels with the tasks.

    Attributes
    ----------
    train, query : ScoreSource
        The backward outputs; ``query`` None in dot mode without QUERY_OUT.
    out : ScoreOutput
    mode : {"sketch", "dot"}
    top, block : int
    normalize, full, resume : bool
    m_query : int
        Queries: QUERY's m in sketch mode, TRAIN's n_q in dot mode.
    """

    train: ScoreSource
    query: ScoreSource | None
    out: ScoreOutput
    mode: str
    top: int
    normalize: bool
    full: bool
    block: int
    m_query: int
    resume: bool = False
    lease_timeout: float = DEFAULT_TIMEOUT

    @property
    def m_train(self) -> int:
        return self.train.m

    @property
    def n_blocks(self) -> int:
        return -(-self.m_train // self.block)

    def bounds(self, index: int) -> tuple[int, int]:
        """Block ``index``'s train rows ``[start, stop)``."""
        return index * self.block, min((index + 1) * self.block, self.m_train)

    def identity(self) -> dict[str, Any]:
        """What a resume must match."""
        return {
            "train": self.train.location, "query": None if self.query is None else self.query.location,
            "mode": self.mode, "top": self.top, "normalize": self.normalize, "full": self.full,
            "block": self.block, "m_train": self.m_train, "m_query": self.m_query,
        }

    def done_blocks(self) -> int:
        """Blocks whose lists are stored (a record of theirs or of a node above)."""
        stored = self.out.records.list()
        return int(tree.covered(tree.frontier(stored, self.n_blocks, SPLIT_EVERY), self.n_blocks, SPLIT_EVERY).sum())

    def describe(self) -> str:
        """One line: the mode, the sizes, the blocks."""
        return (f"dconv: score ({self.mode}) {self.m_train} train x {self.m_query} query samples, top {self.top}"
                f"{', cosine' if self.normalize else ''}{', full scores' if self.full else ''}; "
                f"{self.n_blocks} blocks of {self.block} train rows")


@dataclass(frozen=True)
class ScoreResult:
    """What a finished score job returns: each query's lists (:class:`TopLists`), where they went, how long."""

    lists: TopLists
    out: str
    n_blocks: int
    computed_blocks: int
    seconds: float
    already_complete: bool = False

    def describe(self) -> str:
        if self.already_complete:
            return f"dconv: {self.out} is already complete, nothing to do"
        return (f"dconv: wrote {self.out}: {self.computed_blocks} of {self.n_blocks} blocks computed in "
                f"{self.seconds:.2f} s")


# --------------------------------------------------------------------------- planning


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value > high
    ):
        within = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise InputError(f"{name} must be {within}; got {value!r} instead.")
    return int(value)


def _check_same_sketches(train: ScoreSource, query: ScoreSource) -> None:
    """Refuse a QUERY whose layers, sketch shapes or projections differ from TRAIN's, in one line."""
    names = [name for name, _ in train.layers], [name for name, _ in query.layers]
    if names[0] != names[1]:
        raise InputError(f"TRAIN_OUT and QUERY_OUT must have the same layers; got {names[0]} and {names[1]} instead.")
    if train.sketch_shapes != query.sketch_shapes:
        raise InputError(f"TRAIN_OUT and QUERY_OUT must have the same sketch shapes (k_in, k_out); got "
                         f"{list(train.sketch_shapes)} and {list(query.sketch_shapes)} instead.")
    for name, (a, b) in zip(names[0], zip(train.projections(), query.projections())):
        for label, x, y in (("P_in", a[0], b[0]), ("P_out", a[1], b[1])):
            if x.shape != y.shape or not np.array_equal(x, y):
                where = f" of layer {name!r}" if name else ""
                raise InputError(f"TRAIN_OUT and QUERY_OUT must share their sketch projections; their sketch/{label}"
                                 f"{where} differ, so their sketches cannot be compared.")


def _mode(train: ScoreSource, query: ScoreSource | None, dots: bool) -> str:
    if dots or train.sketch_shapes is None:
        if train.n_q is None:
            raise InputError(f"TRAIN_OUT must hold sketches or dots/sample_dot; {train.location!r} has "
                             f"{'no dots (--dots)' if dots else 'neither'}.")
        return "dot"
    if query is None:
        raise InputError("QUERY_OUT must be given to score by sketches (give --dots to score by TRAIN_OUT's dots).")
    if query.sketch_shapes is None:
        raise InputError(f"QUERY_OUT must hold sketches like TRAIN_OUT; {query.location!r} has none.")
    return "sketch"


def plan_score(
    train: str | PathLike,
    query: str | PathLike | None,
    out: str | PathLike,
    *,
    top: int | None = DEFAULT_TOP,
    normalize: bool | None = False,
    full: bool | None = False,
    block: int | None = None,
    dots: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    lease_timeout: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ScorePlan:
    """Validate a score job and resolve its options; nothing is written.

    With ``resume``, ``top``, ``block``, ``normalize`` and ``full`` None take the values
    the output recorded (else 10, the default block, False, False); a value that
    contradicts them is refused.

    Raises
    ------
    InputError
        One line: an input that is not a complete dconv output, or lacks what the
        mode needs; layers, sketch shapes or projections that differ; ``normalize``
        without the norms; ``top`` < 1 or > m_train; ``out`` inside an input, or
        there already (without ``overwrite``/``resume``), or held by another job.
    """
    options = dict(storage_options or {})
    train_url, out_url = absolute_location(train), absolute_location(out)
    query_url = None if query in (None, "-") else absolute_location(query)
    train_src = open_source(train_url, options, "TRAIN_OUT")
    query_src = None if query_url is None else open_source(query_url, options, "QUERY_OUT")
    mode = _mode(train_src, query_src, dots)
    if mode == "sketch":
        _check_same_sketches(train_src, query_src)
        m_query = query_src.m
    else:
        m_query = train_src.n_q
        if query_src is not None and query_src.m != m_query:
            raise InputError(f"QUERY_OUT must have the n_q = {m_query} queries of TRAIN_OUT's dots; "
                             f"got m = {query_src.m} instead.")
    scores = ScoreOutput(out_url, options)
    scores.check_target([train_src.location] + ([query_src.location] if query_src else []),
                        overwrite=overwrite, resume=resume)
    check_unheld(out_url, options)
    recorded = scores.provenance() if resume else None
    if recorded is not None:  # what is not given is the recorded job's
        top, block = (recorded.get("top") if top is None else top), (recorded.get("block") if block is None else block)
        normalize = recorded.get("normalize") if normalize is None else normalize
        full = recorded.get("full") if full is None else full
    normalize, full = bool(normalize), bool(full)
    if normalize:
        for name, source in (("TRAIN_OUT", train_src), ("QUERY_OUT", query_src)):
            if source is None:
                raise InputError("normalize=True needs the queries' norms: give QUERY_OUT, the output of the queries "
                                 "(with stats/sample_grad_norm2).")
            if not source.has_norms:
                raise InputError(f"normalize=True needs {name}'s stats/sample_grad_norm2 (a job with --stats); "
                                 f"{source.location!r} has none.")
    top = _check_int("top", DEFAULT_TOP if top is None else top, 1, train_src.m)
    features = train_src.features
    block = choose_block(train_src.m, m_query, features, mode, full) if block is None else _check_int("block", block, 1)
    lease_timeout = positive_number("lease_timeout")(DEFAULT_TIMEOUT if lease_timeout is None else lease_timeout)
    plan = ScorePlan(train=train_src, query=query_src, out=scores, mode=mode, top=top, normalize=normalize,
                     full=full, block=min(block, train_src.m), m_query=m_query, resume=recorded is not None,
                     lease_timeout=lease_timeout)
    if recorded is not None:
        differ = {key: (recorded.get(key), value) for key, value in plan.identity().items() if recorded.get(key) != value}
        if differ:
            said = ", ".join(f"{key} {old!r} (now {new!r})" for key, (old, new) in differ.items())
            raise InputError(f"resume=True must continue the same scoring; {scores.location!r} recorded {said}.")
    return plan


# --------------------------------------------------------------------------- the tasks


def _hold_blas_to_one_thread() -> None:
    """Hold BLAS to one thread in this process from now on, if it is not already.

    A task runs on a worker thread of its own: a limit set and restored by each task
    would race with the others'. On a distributed worker the limit stays (the embedded
    cluster's workers start with one BLAS thread anyway); a local run sets it once
    around the whole computation (:func:`_local_blas`), so its tasks find it set.
    """
    from dconv.kernel.threads import _blas_controller, blas_threads

    if blas_threads() > 1:
        _blas_controller().limit(limits=1, user_api="blas")


@contextlib.contextmanager
def _local_blas(scheduler: str | None):
    """One BLAS thread while a local scheduler runs the tasks in this process, restored afterwards."""
    if scheduler is None:
        yield
        return
    from dconv.kernel.threads import _blas_controller

    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def _scale(norms: np.ndarray) -> np.ndarray:
    """``1 / sqrt(norm)``; NaN where the norm is not positive (such a sample has no cosine: NaN scores)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > 0, 1.0 / np.sqrt(norms), np.nan)


def load_queries(plan: ScorePlan) -> np.ndarray | None:
    """The shared graph value: sketch mode, the query features (m_query, F) float32 (scaled to unit norm with
    ``normalize``); dot mode, ``1 / sqrt`` of the queries' norms (m_query,) with ``normalize``, else None."""
    if plan.mode == "dot":
        return _scale(plan.query.read_norms(0, plan.m_query)) if plan.normalize else None
    features = plan.query.read_features(0, plan.m_query)
    if plan.normalize:
        features *= _scale(plan.query.read_norms(0, plan.m_query)).astype(np.float32)[:, None]
    return features


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 buffer of ``shape`` this thread keeps for its next block: a panel of scores, allocated
    anew for each task, would cost its page faults each time."""
    held = getattr(_SCRATCH, "panel", None)
    if held is None or held.shape != shape:
        _SCRATCH.panel = held = None  # let the old one go first
        _SCRATCH.panel = held = np.empty(shape, dtype=np.float32)
    return held


_SCRATCH = threading.local()


def block_panels(plan: ScorePlan, queries: np.ndarray | None, index: int) -> Iterator[tuple[np.ndarray, int]]:
    """Block ``index``'s scores, a panel at a time: ``(panel, first)``, ``panel`` (m_query, width) holding the
    scores against train rows ``first .. first + width - 1``, in increasing ``first``.

    Sketch mode: each panel is one GEMM of :data:`PANEL` train rows aligned to a multiple of ``PANEL``
    (rows outside the block are zeros, their columns left out), into this thread's scratch buffer: valid
    until the next panel. Dot mode: the block's dots, transposed a panel at a time.
    """
    start, stop = plan.bounds(index)
    if plan.mode == "dot":
        rows = plan.train.read_dots(start, stop)
        if plan.normalize:
            rows = rows * _scale(plan.train.read_norms(start, stop))[:, None] * queries[None, :]
        for lo in range(start, stop, PANEL):
            yield np.ascontiguousarray(rows[lo - start : lo - start + PANEL].T), lo
        return
    first = start // PANEL * PANEL
    n_panels = -(-(stop - first) // PANEL)
    features = np.zeros((n_panels * PANEL, plan.train.features), dtype=np.float32)
    features[start - first : stop - first] = plan.train.read_features(start, stop)
    if plan.normalize:
        features[start - first : stop - first] *= _scale(plan.train.read_norms(start, stop)).astype(np.float32)[:, None]
    panel = _scratch((plan.m_query, PANEL))
    _hold_blas_to_one_thread()
    for p in range(n_panels):
        # panel[q, j] = sum_f queries[q, f] * features[p * PANEL + j, f]
        np.matmul(queries, features[p * PANEL : (p + 1) * PANEL].T, out=panel)
        lo, hi = max(start, first + p * PANEL), min(stop, first + (p + 1) * PANEL)
        yield panel[:, lo - first - p * PANEL : hi - first - p * PANEL], lo


def run_block(plan: ScorePlan, queries: np.ndarray | None, index: int) -> TopLists:
    """Block task ``index``: its scores a panel at a time into the running lists (and, with ``full``, its rows
    of ``scores``), then its record."""
    start, stop = plan.bounds(index)
    running = RunningTop(plan.m_query, plan.top, np.float64 if plan.mode == "dot" else np.float32)
    rows = np.empty((stop - start, plan.m_query), dtype=np.float32) if plan.full else None
    for panel, first in block_panels(plan, queries, index):
        if rows is not None:
            rows[first - start : first - start + panel.shape[1]] = panel.T
        running.add(panel, first)
    if rows is not None:
        plan.out.write_scores(start, rows)
    lists = running.lists()
    plan.out.records.write((0, index), lists.arrays(), np.zeros(1, np.uint8))
    report_chunk_done(plan.out.url, index)
    return lists


def run_combine(plan: ScorePlan, node: tree.Node, *parts: TopLists) -> TopLists:
    """Combine task: merge the children's lists (in chunk order), write the node's record, delete the children's."""
    lists = merge_top(list(parts), plan.top)
    plan.out.records.write(node, lists.arrays(), np.zeros(1, np.uint8))
    plan.out.records.delete(tree.children(node, plan.n_blocks, SPLIT_EVERY))
    return lists


def read_node(plan: ScorePlan, node: tree.Node) -> TopLists:
    """A stored node's lists (on resume)."""
    arrays, _ = plan.out.records.read(node)
    return TopLists(**arrays)


def build_graph(plan: ScorePlan, stored: set[tree.Node]) -> tuple[Any, int]:
    """The Dask collection of the whole tree (stored nodes read back, what they cover left out), and the
    number of block tasks in it."""
    token = dask.base.tokenize(plan.out.url, plan.identity())
    plan_key, query_key = f"dconv-score-plan-{token}", f"dconv-score-query-{token}"
    graph: dict[Any, Any] = {plan_key: plan, query_key: (load_queries, plan_key)}
    blocks = 0

    def add(node: tree.Node) -> Any:
        nonlocal blocks
        depth, index = node
        key = (f"{BLOCK_PREFIX}-{token}", index) if depth == 0 else (f"dconv-score-node-{token}", depth, index)
        if node in stored:
            graph[key] = (read_node, plan_key, node)
        elif depth == 0:
            graph[key] = (run_block, plan_key, query_key, index)
            blocks += 1
        else:
            graph[key] = (run_combine, plan_key, node, *[add(child) for child in tree.children(node, plan.n_blocks,
                                                                                                  SPLIT_EVERY)])
        return key

    root = add((tree.tree_height(plan.n_blocks, SPLIT_EVERY), 0))
    return Delayed(root, graph), blocks


# --------------------------------------------------------------------------- running


def _open(plan: ScorePlan, where: Mapping[str, Any]) -> set[tree.Node]:
    """Create the output (or reopen it to resume); the stored nodes."""
    if plan.resume:
        plan.out.update(status="running", resumed=now(), cluster=dict(where))
        return plan.out.records.list()
    from dconv.plan import _versions

    provenance = {**plan.identity(), "split_every": SPLIT_EVERY, "cluster": dict(where), "versions": _versions()}
    plan.out.create(provenance, m_train=plan.m_train, m_query=plan.m_query, top=plan.top, full=plan.full,
                    block=plan.block)
    return set()


def _compute(plan: ScorePlan, client: Any, scheduler: str | None, progress: bool, where: Mapping[str, Any],
             lease: Any) -> ScoreResult:
    from dconv.waves import compute_with_progress

    t0 = time.perf_counter()
    stored = _open(plan, where)
    try:
        graph, blocks = build_graph(plan, stored)
        with _local_blas(scheduler):
            lists = compute_with_progress(graph, plan.out.url, blocks, client=client, scheduler=scheduler,
                                          show=progress and blocks > 0)
        lease.check()
        seconds = time.perf_counter() - t0
        plan.out.finish(lists.arrays(), seconds=round(seconds, 3))
        return ScoreResult(lists=lists, out=plan.out.location, n_blocks=plan.n_blocks, computed_blocks=blocks,
                           seconds=seconds)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, a lost lease
        lease.check()
        name = getattr(e, "signal", "SIGINT")
        with contextlib.suppress(Exception):
            plan.out.mark_interrupted(name)
        command = resume_command(plan.out.location, {**plan.identity(), "cluster": where})
        raise JobInterrupted(name, out=plan.out.location, total=plan.n_blocks, resume_command=command) from e
    except BaseException as e:
        if lease.lost is None:
            with contextlib.suppress(Exception):
                plan.out.mark_failed(e)
        raise


def _stored_result(plan: ScorePlan) -> ScoreResult | None:
    """With ``resume``, a complete output of this very job: its lists read back; else None."""
    stored = plan.out.provenance() if plan.resume else None
    if not stored or stored.get("status") != "complete":
        return None
    lists = TopLists(**{name: plan.out.read_top(name) for name in TopLists.__dataclass_fields__})
    return ScoreResult(lists=lists, out=plan.out.location, n_blocks=plan.n_blocks, computed_blocks=0, seconds=0.0,
                       already_complete=True)


def run_score(
    plan: ScorePlan,
    *,
    client: Any = None,
    scheduler: str | None = None,
    cluster: ClusterOptions | None = None,
    progress: bool = False,
    quiet: bool = True,
    debug: bool = False,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> ScoreResult:
    """Run a planned score job, as :func:`dconv.job.run_job` runs a backward job: on ``client``'s cluster,
    a local ``scheduler`` ("threads", "synchronous"), or the cluster ``cluster`` names (default: the
    embedded one), holding the output's lease; Ctrl-C or SIGTERM marks it "interrupted" and raises
    :class:`JobInterrupted` with the resume command.

    Raises
    ------
    InputError
        Two places to run are given; another job holds the lease.
    JobInterrupted
    LeaseLost
    """
    from dconv.job import _client_place, _local_scheduler, _signals_interrupt

    cluster = cluster or ClusterOptions()
    scheduler = _local_scheduler(scheduler, client, cluster)
    stored = _stored_result(plan)
    if stored is not None:
        return stored
    with _signals_interrupt(), hold(plan.out.url, plan.out.storage_options, plan.lease_timeout, say) as lease:
        try:
            if scheduler is not None:
                return _compute(plan, None, scheduler, progress, {"scheduler": scheduler}, lease)
            if client is not None:
                wait_for_workers(client, cluster.wait_workers, cluster.wait_timeout, say)
                return _compute(plan, client, None, progress, _client_place(client), lease)
            with connect(cluster, quiet=quiet, debug=debug) as new_client:
                if not cluster.embedded:
                    wait_for_workers(new_client, cluster.wait_workers, cluster.wait_timeout, say)
                return _compute(plan, new_client, None, progress, cluster.recorded_place(), lease)
        except JobInterrupted as e:
            with contextlib.suppress(Exception):
                e.done = plan.done_blocks()
            raise


def score_job(
    train: str | PathLike,
    query: str | PathLike | None,
    out: str | PathLike,
    *,
    top: int | None = DEFAULT_TOP,
    normalize: bool = False,
    full: bool = False,
    block: int | None = None,
    dots: bool = False,
    client: Any = None,
    scheduler: str | None = None,
    cluster: ClusterOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    lease_timeout: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ScoreResult:
    """Score the train samples of ``train`` against the queries, keep each query's ``top`` largest and smallest.

    ``score_job(...)`` is ``run_score(plan_score(...), ...)``.

    Parameters
    ----------
    train : str or path
        A complete backward output (one layer's or a model's) with sketches, or with
        ``dots/sample_dot`` for dot mode.
    query : str, path or None
        The queries' backward output, with sketches made with the same projections.
        In dot mode (``dots=True``, or TRAIN without sketches) it may be None (or
        ``"-"``); given, it supplies the queries' norms for ``normalize``.
    out : str or path
        The score output group (:mod:`dconv.store.score_output`).
    top : int
        Length of each list, 1 to m_train (default 10; None on resume: the recorded one).
    normalize : bool
        Cosine scores: each score divided by ``sqrt(|g_i|^2 |g_j|^2)`` (both outputs'
        ``stats/sample_grad_norm2``). A sample whose norm is 0 gets NaN scores.
    full : bool
        Also write ``scores`` (m_train, m_query) float32.
    block : int, optional
        Train rows per task (default :func:`choose_block`: up to 32,768, about 128 MiB of features at most).
    dots : bool
        Dot mode: TRAIN's ``dots/sample_dot`` are the scores.
    client, scheduler, cluster, progress
        Where to run and whether to show the progress: see :func:`run_score`.
    overwrite, resume : bool
        Replace a score output there (only dconv's), or continue it from its records.
    lease_timeout : float
        Seconds without a heartbeat after which another job may take SCORES_OUT's lease over
        (default 60; the job renews it every quarter of this).
    storage_options : dict, optional
        fsspec options for the three stores (never recorded).

    Returns
    -------
    ScoreResult
        ``result.lists``: (m_query, top) arrays ``positive_index``, ``positive_score``,
        ``negative_index``, ``negative_score`` (:class:`dconv.kernel.topk.TopLists`).
    """
    plan = plan_score(train, query, out, top=top, normalize=normalize, full=full, block=block, dots=dots,
                      overwrite=overwrite, resume=resume, lease_timeout=lease_timeout, storage_options=storage_options)
    return run_score(plan, client=client, scheduler=scheduler, cluster=cluster, progress=progress)

"""The progress bar of a job: one tick per finished chunk task.

On a distributed cluster each chunk task announces itself on an event topic
(:func:`report_chunk_done`, on the worker) and the client's subscription ticks
the bar; on a local Dask scheduler a scheduler callback ticks it as chunk
tasks finish. :func:`compute_with_progress` hides which.
"""

from __future__ import annotations

import sys
from typing import Any

import dask
from dask.callbacks import Callback

__all__ = ["compute_with_progress", "report_chunk_done", "progress_topic", "CHUNK_PREFIX"]

CHUNK_PREFIX = "dconv-chunk"
"""The key prefix of chunk tasks (see :mod:`dconv.graph`)."""


def progress_topic(url: str) -> str:
    """The distributed event topic on which the chunk tasks of the output at ``url`` announce completion."""
    return f"dconv-progress-{dask.base.tokenize(url)}"


def report_chunk_done(url: str, index: int) -> None:
    """On a distributed worker, announce that chunk ``index`` of the output at ``url`` is done; elsewhere nothing."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker
        return
    worker.log_event(progress_topic(url), index)


class _LocalChunkProgress(Callback):
    """Ticks a progress bar as chunk tasks finish on a local Dask scheduler."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith(CHUNK_PREFIX):
            self.bar.update(1)


def compute_with_progress(
    graph: Any, url: str, total: int, *, client: Any = None, scheduler: str | None = None, show: bool = False
) -> Any:
    """Compute ``graph`` on ``client`` (or the local ``scheduler``), with a bar of ``total`` chunks on stderr.

    Parameters
    ----------
    url : str
        The job's output, whose chunk tasks announce themselves (:func:`report_chunk_done`).
    show : bool
        Draw the bar; False computes the same way, silently.
    """
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="chunk", desc="dconv", file=sys.stderr, disable=not show) as bar:
        if scheduler is not None:
            with _LocalChunkProgress(bar):
                return dask.compute(graph, scheduler=scheduler)[0]
        topic = progress_topic(url)
        client.subscribe_topic(topic, lambda event: bar.update(1))
        try:
            return client.compute(graph).result()
        finally:
            client.unsubscribe_topic(topic)

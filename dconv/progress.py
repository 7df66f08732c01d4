"""The progress of a job: one tick per finished chunk task.

On a distributed cluster each chunk task announces itself on an event topic
(:func:`report_chunk_done`, on the worker) and the client's subscription ticks
the progress; on a local Dask scheduler a scheduler callback ticks it as chunk
tasks finish. :func:`dconv.waves.compute_with_progress` hides which.

On a terminal the progress is a tqdm bar. Anywhere else (a log file, a pipe, a
batch system's output) a bar's carriage-return updates pile up (135 KB for a
job of 4,096 chunks), so :class:`PlainProgress` writes one plain line every
``interval`` seconds and one at the end::

    dconv: 120 of 4096 chunks, 35.2 chunks/s, ETA 1m53s
    dconv: 4096 of 4096 chunks, 35.1 chunks/s, done in 1m57s
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Any, TextIO

import dask

__all__ = [
    "report_chunk_done",
    "progress_topic",
    "PlainProgress",
    "progress_display",
    "format_duration",
    "PLAIN_INTERVAL",
]

PLAIN_INTERVAL = 10.0
"""Seconds between two plain progress lines (when the stream is not a terminal)."""


@lru_cache(maxsize=16)
def progress_topic(url: str) -> str:
    """The distributed event topic on which the chunk tasks of the output at ``url`` announce completion."""
    return f"dconv-progress-{dask.base.tokenize(url)}"


def report_chunk_done(url: str, index: int) -> None:
    """On a distributed worker, announce that chunk ``index`` of the output at ``url`` is done; elsewhere nothing.

    Cheap next to a chunk task (figures in benchmarks/README.md). The scheduler keeps the
    last 1000 events of a topic.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker
        return
    worker.log_event(progress_topic(url), index)


def format_duration(seconds: float) -> str:
    """``42s``, ``1m52s``, ``3h05m`` (rounded to whole seconds, or minutes from an hour up)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


class PlainProgress:
    """Progress as plain lines: every ``interval`` seconds while chunks run, and once at the end.

    Each line is ``dconv: DONE of TOTAL chunks, RATE chunks/s, ETA T`` (the last
    one ``..., done in T``). It has the two methods of a tqdm bar that
    :func:`dconv.waves.compute_with_progress` uses (``update`` and the context manager), and
    ``update`` may be called from any thread. A line is written by a timer
    thread, so one appears even while no chunk finishes.

    Parameters
    ----------
    total : int
        Chunks to run.
    file : text stream
        Where the lines go.
    interval : float
        Seconds between two lines.
    """

    def __init__(self, total: int, file: TextIO, interval: float = PLAIN_INTERVAL) -> None:
        self.total, self.file, self.interval = total, file, interval
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._timer = threading.Thread(target=self._tick, name="dconv-progress", daemon=True)

    def __enter__(self) -> PlainProgress:
        self._start = time.perf_counter()
        self._timer.start()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._stop.set()
        self._timer.join()
        if kind is None:
            self.write(final=True)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def line(self, final: bool = False) -> str:
        """The progress line as of now."""
        elapsed = time.perf_counter() - self._start
        with self._lock:
            done = self.done
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"  # 0.0412, 35.2, 1429: never 1.43e+03
        text = f"dconv: {done} of {self.total} chunks, {speed} chunks/s"
        if final:
            return f"{text}, done in {format_duration(elapsed)}"
        eta = format_duration((self.total - done) / rate) if done else "unknown"
        return f"{text}, ETA {eta}"

    def write(self, final: bool = False) -> None:
        print(self.line(final), file=self.file, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()


class _Silent:
    """No progress at all (``show=False``)."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def progress_display(total: int, file: TextIO, show: bool, interval: float = PLAIN_INTERVAL) -> Any:
    """A tqdm bar on a terminal, :class:`PlainProgress` lines elsewhere, nothing if not ``show``."""
    if not show:
        return _Silent()
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="chunk", desc="dconv", file=file)
    return PlainProgress(total, file, interval)

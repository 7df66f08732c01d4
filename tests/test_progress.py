"""dconv.progress: the progress display of a job, plain lines off a terminal and a bar on one."""

from __future__ import annotations

import io
import re
import threading
import time

import dask
import pytest

from dconv.graph import CHUNK_PREFIX
from dconv.progress import PlainProgress, format_duration
from dconv.waves import compute_with_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def chunk_graph(n: int, step=lambda index: index):
    """``n`` tasks keyed as dconv's chunk tasks, summed."""
    parts = [dask.delayed(step, pure=True)(i, dask_key_name=(f"{CHUNK_PREFIX}-test", i)) for i in range(n)]
    return dask.delayed(sum)(parts)


PLAIN_LINE = r"dconv: \d+ of 5 chunks, [\d.e+-]+ chunks/s, (ETA (\d+s|\d+m\d\ds|\d+h\d\dm|unknown)|done in \d+s)"


def test_progress_off_a_terminal_is_plain_lines(tmp_path):
    stream = io.StringIO()
    first_line = threading.Event()

    def step(index: int) -> int:
        if index == 0:  # hold the first chunk until the timer has written a line
            deadline = time.monotonic() + 30
            while not stream.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            first_line.set()
        return index

    total = compute_with_progress(
        chunk_graph(5, step), "url", 5, scheduler="threads", show=True, file=stream, interval=0.05
    )
    assert total == 10 and first_line.is_set()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2, text
    assert all(re.fullmatch(PLAIN_LINE, line) for line in lines), text
    assert re.fullmatch(r"dconv: 5 of 5 chunks, [\d.e+-]+ chunks/s, done in \d+s", lines[-1]), text


def test_progress_on_a_terminal_is_a_bar():
    stream = Terminal()
    compute_with_progress(chunk_graph(5), "url", 5, scheduler="threads", show=True, file=stream)
    assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()


def test_progress_line_counts_rate_and_eta():
    progress = PlainProgress(4096, io.StringIO())
    assert progress.line().endswith("ETA unknown")
    progress.update(120)
    assert re.fullmatch(r"dconv: 120 of 4096 chunks, [\d.e+]+ chunks/s, ETA .+", progress.line())
    assert [format_duration(s) for s in (0.4, 42, 112, 3 * 3600 + 299)] == ["0s", "42s", "1m52s", "3h05m"]


def test_no_progress_when_not_shown():
    stream = io.StringIO()
    assert compute_with_progress(chunk_graph(3), "url", 3, scheduler="threads", show=False, file=stream) == 3
    assert stream.getvalue() == ""

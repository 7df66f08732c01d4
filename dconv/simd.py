"""Which instruction-set level the kernel's compiled loops run at.

``dconv/_flatconv.c`` is compiled for several targets inside one extension: on
x86-64 ``avx512`` (AVX-512F), ``avx2`` (AVX2 + FMA) and ``baseline`` (SSE2, which
every x86-64 CPU runs); on aarch64 ``neon``. The best level this CPU reports is
chosen at first use. The environment variable ``DCONV_SIMD`` overrides it:

======== ==================================================================
auto     the best compiled level this CPU runs (the default)
avx512   AVX-512F loops                         (x86-64 with AVX-512F)
avx2     AVX2 + FMA loops                       (x86-64 with AVX2 and FMA)
baseline SSE2 loops, no FMA                     (every x86-64 CPU)
neon     NEON/ASIMD loops                       (aarch64)
numpy    no compiled loops: the NumPy path only
======== ==================================================================

A level this CPU cannot run, or an unknown word, raises
:class:`~dconv.errors.SimdLevelError` (a ``ValueError``); dconv never falls back
silently. This module imports nothing but the standard library, the compiled
extension and :mod:`dconv.errors` (it is part of the kernel layer).

A job carries its client's ``DCONV_SIMD`` word to every chunk task, which makes
it that worker's level with :func:`use_level`; before the job starts, each
worker answers :func:`level_report`, so that a level one of them lacks is
refused up front.
"""

from __future__ import annotations

import os
from typing import Any

from dconv.errors import SimdLevelError

try:  # optional: built at install when a C compiler is there
    from dconv import _flatconv
except ImportError:
    _flatconv = None

__all__ = [
    "LEVELS",
    "level_text",
    "missing_loops_reason",
    "warn_if_missing",
    "ENV_VAR",
    "simd_levels",
    "parse_word",
    "resolve_level",
    "active_level",
    "set_level",
    "use_level",
    "level_report",
]

LEVELS = ("avx512", "avx2", "neon", "baseline")
"""Every compiled level dconv knows, best first (a build holds those of its architecture)."""

ENV_VAR = "DCONV_SIMD"

CHOICES = ("auto", *LEVELS, "numpy")
"""What ``DCONV_SIMD`` accepts."""

MISSING_SLOWDOWN = "30%"
"""How much slower the kernel runs on the NumPy path than with the compiled loops, as the warning says it
(benchmarks/README.md has the figures)."""

_active: str | None = None


def simd_levels() -> list[str]:
    """The compiled levels this machine can run, best first.

    Never lists ``"numpy"``, which is always available. Empty when the
    extension was not built (no C compiler at install).
    """
    return list(_flatconv.levels()) if _flatconv is not None else []


def parse_word(requested: str | None, name: str = ENV_VAR) -> str:
    """A ``DCONV_SIMD`` value normalised to one of :data:`CHOICES` (None and "" are ``"auto"``).

    Checks the word only, not whether this machine runs the level: a client
    checks its job's word with this, and each worker resolves it. ``name`` is
    where the word came from, for the error (the variable, or the option ``simd``).

    Raises
    ------
    SimdLevelError
        ``requested`` is not one of :data:`CHOICES`.
    """
    word = (requested or "auto").strip().lower()
    if word not in CHOICES:
        raise SimdLevelError(f"{name} must be one of {', '.join(CHOICES)}; got {requested!r} instead.")
    return word


def resolve_level(requested: str | None) -> str:
    """The level to run for a ``DCONV_SIMD`` value: ``"auto"`` (or None, or "") picks the best.

    Returns
    -------
    str
        One of :func:`simd_levels`, or ``"numpy"``.

    Raises
    ------
    SimdLevelError
        ``requested`` is not one of :data:`CHOICES`, or names a level this
        machine cannot run. A ``ValueError``.
    """
    word = parse_word(requested)
    available = simd_levels()
    if word == "auto":
        return available[0] if available else "numpy"
    if word == "numpy" or word in available:
        return word
    runs = ", ".join(available + ["numpy"])
    why = "the compiled loops were not built" if _flatconv is None else "this CPU lacks it"
    raise SimdLevelError(f"{ENV_VAR}={word}: {why}; this machine runs {runs}.")


def active_level() -> str:
    """The level the kernel runs at in this process: ``DCONV_SIMD`` resolved once, or :func:`set_level`'s."""
    global _active
    if _active is None:
        _active = resolve_level(os.environ.get(ENV_VAR))
    return _active


def set_level(level: str | None) -> str:
    """Run the kernel at ``level`` from now on in this process (None: ``DCONV_SIMD`` again); returns the level."""
    global _active
    _active = None if level is None else resolve_level(level)
    return active_level()


def use_level(requested: str | None) -> str:
    """Make a job's ``DCONV_SIMD`` word this process's level; returns the level now active.

    A chunk task calls this before the kernel. The job's word wins over this
    process's own ``DCONV_SIMD`` (which is not even read).

    Raises
    ------
    SimdLevelError
        As :func:`resolve_level`.
    """
    level = resolve_level(requested)
    if level != _active:
        set_level(level)
    return active_level()


def level_report(requested: str | None) -> dict[str, Any]:
    """What this process runs and what ``requested`` resolves to here; never raises for a bad level.

    A job's preflight runs this on every worker (``client.run``).

    Returns
    -------
    dict
        ``runs``: :func:`simd_levels` and ``"numpy"``, best first; ``level``:
        the level ``requested`` resolves to, or None; ``error``: the one-line
        reason when ``level`` is None.
    """
    try:
        level, error = resolve_level(requested), None
    except SimdLevelError as e:
        level, error = None, str(e)
    return {"runs": simd_levels() + ["numpy"], "level": level, "error": error}


def level_text() -> str:
    """The SIMD level ``DCONV_SIMD`` picks here, and the levels this machine runs, for ``dconv --version``.

    A bad ``DCONV_SIMD`` is reported in place of the level, not raised.
    """
    word = os.environ.get(ENV_VAR) or "auto"
    levels = simd_levels()
    runs = ", ".join(levels + ["numpy"])
    built = "" if levels else f"; {missing_loops_reason()}"
    try:
        level = f"SIMD level {resolve_level(word)} ({ENV_VAR}={word}; this machine runs {runs}{built})"
    except ValueError as e:
        level = f"no SIMD level: {e}"
    return level


def missing_loops_reason() -> str:
    """Why the compiled loops are absent, and what to do: a source checkout shadowing the installed
    package, a source checkout that was never built, or an install without a C compiler."""
    from importlib import metadata
    from pathlib import Path

    here = Path(__file__).resolve().parent
    # a checkout's own dconv.egg-info (from pip's build) is a distribution too: look past it
    installed = [Path(dist.locate_file("dconv/__init__.py")).resolve() for dist in metadata.distributions(name="dconv")]
    elsewhere = [path.parent for path in installed if path.is_file() and path.parent != here]
    if (here / "_flatconv.c").is_file() and elsewhere:
        return (
            f"the compiled loops are not in {here}: Python imported dconv from this source checkout, not the "
            f"installed package ({elsewhere[0]}); run from another directory, or with python -P"
        )
    if (here / "_flatconv.c").is_file():
        return (
            f"dconv is running from a source checkout without a build ({here}); build it with pip install -e ."
        )
    return "the compiled loops were not built at install (no C compiler?); reinstall with one to get them"


def warn_if_missing() -> None:
    """Say once, on the ``dconv`` logger at WARNING, that the compiled loops are missing and why.

    Silent when they are there, and when ``DCONV_SIMD=numpy`` asks for the NumPy path anyway. With
    no logging configured, Python prints the line on stderr.
    """
    if _flatconv is not None or os.environ.get(ENV_VAR, "").strip().lower() == "numpy":
        return
    import logging

    logging.getLogger("dconv").warning(
        f"dconv: warning: the kernel runs without its compiled loops, about {MISSING_SLOWDOWN} slower: "
        f"{missing_loops_reason()}"
    )


warn_if_missing()

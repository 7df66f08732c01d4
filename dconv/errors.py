"""Exceptions raised by dconv.

Every error that is the caller's fault derives from :class:`InputError` (a
``ValueError``) or :class:`InputDtypeError` (a ``TypeError``), so plain
``except ValueError`` / ``except TypeError`` keep working. The CLI maps both to
exit code 2 and everything else to exit code 1.
"""

from __future__ import annotations

__all__ = ["InputError", "InputDtypeError", "JobFailedError"]


class InputError(ValueError):
    """An input array, parameter, store or option is invalid; nothing was computed."""


class InputDtypeError(InputError, TypeError):
    """An input array has a dtype other than float32 or float64."""


class JobFailedError(RuntimeError):
    """A backward job failed while running (not because of its inputs)."""

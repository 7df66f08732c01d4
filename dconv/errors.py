"""Exceptions raised by dconv.

Every error that is the caller's fault derives from :class:`InputError` (a
``ValueError``) or :class:`InputDtypeError` (a ``TypeError``), so plain
``except ValueError`` / ``except TypeError`` keep working. The CLI maps both to
exit code 2; anything else raised while a job runs (I/O, a lost cluster) keeps
its own type and maps to exit code 1.
"""

from __future__ import annotations

__all__ = ["InputError", "InputDtypeError", "SimdLevelError"]


class InputError(ValueError):
    """An input array, parameter, store or option is invalid."""


class InputDtypeError(InputError, TypeError):
    """An input array has a dtype other than float32 or float64."""


class SimdLevelError(InputError):
    """``DCONV_SIMD`` is an unknown word, or names a level this machine (or a worker) cannot run."""

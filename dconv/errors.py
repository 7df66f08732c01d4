"""Exceptions raised by dconv.

Every error that is the caller's fault derives from :class:`InputError` (a
``ValueError``) or :class:`InputDtypeError` (a ``TypeError``), so plain
``except ValueError`` / ``except TypeError`` keep working. The CLI maps both to
exit code 2; anything else raised while a job runs (I/O, a lost cluster) keeps
its own type and maps to exit code 1. A job stopped by Ctrl-C or SIGTERM raises
:class:`JobInterrupted`, a ``KeyboardInterrupt`` (so ``except Exception`` lets it
through), which the CLI maps to 128 + the signal's number: 130 and 143.
"""

from __future__ import annotations

import signal as _signal

__all__ = ["InputError", "SpecError", "InputDtypeError", "NonFiniteInput", "SimdLevelError", "JobInterrupted", "LeaseLost"]


class InputError(ValueError):
    """An input array, parameter, store or option is invalid."""


class SpecError(InputError):
    """A pipeline spec is invalid. Its message names the spec's TOML keys, which the CLI
    leaves as they are (other errors name options as Python keywords, ``overwrite=True``,
    which the CLI prints as flags, ``--overwrite``)."""


class InputDtypeError(InputError, TypeError):
    """An input array has a dtype other than float32 or float64."""


class NonFiniteInput(InputError):
    """A chunk of the inputs holds NaN or Inf, and the job was asked to refuse them (``check_finite``)."""


class SimdLevelError(InputError):
    """``DCONV_SIMD`` is an unknown word, or names a level this machine (or a worker) cannot run."""


class JobInterrupted(KeyboardInterrupt):
    """A job stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (a batch scheduler's time limit, ``kill``).

    If the job had opened its output, the output has status "interrupted" (with
    the signal and the time in its provenance), and a run of the same job with
    ``resume=True`` (``--resume``) computes only the chunks that are missing.

    Attributes
    ----------
    signal : str
        ``"SIGINT"`` or ``"SIGTERM"``.
    out : str or None
        The output (without credentials), if the job had opened it.
    done, total : int or None
        Chunks finished, and chunks in the job.
    resume_command : str or None
        The ``dconv backward ... --resume`` command line that continues the job
        (None for in-memory inputs).
    """

    def __init__(
        self,
        signal: str = "SIGINT",
        *,
        out: str | None = None,
        done: int | None = None,
        total: int | None = None,
        resume_command: str | None = None,
    ) -> None:
        self.signal, self.out, self.done, self.total, self.resume_command = signal, out, done, total, resume_command
        super().__init__(signal)

    def __str__(self) -> str:  # from the attributes: ``done`` is counted once the job's cluster has closed
        message = f"interrupted by {self.signal}"
        if self.out is not None:
            count = "?" if self.done is None else self.done  # None: the output could not be read
            message += f" with {count} of {self.total} chunks of {self.out!r} done; run it again with resume=True to finish it"
        return message

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process it stopped: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(_signal.Signals[self.signal])


class LeaseLost(RuntimeError):
    """Another job took over the lease on the output this job was writing (:mod:`dconv.store.lease`):
    the job stopped, and wrote nothing more to the output, which is now the other job's."""

"""The ``dconv`` command: parses arguments, then calls dconv's public functions.

The job's flags are generated from :class:`dconv.JobOptions` and
:class:`dconv.ClusterOptions`, and make-inputs' from :class:`dconv.InputRecipe`,
so each option's default, validation and help live in one place.

Exit codes: 0 success; 1 a failure while running; 2 bad input or usage (a bad
``DCONV_SIMD`` too); 3 ``inspect`` found an output that is not complete; 130
stopped by Ctrl-C (SIGINT) and 143 by SIGTERM, 128 + the signal's number as a
shell reports it (a job's output is then marked "interrupted", and the one line
on stderr, like ``inspect``, gives the command that resumes it).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

import dconv

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``. ``true``, ``false``, ``null`` and JSON objects or lists are parsed;
    every other value stays a string (so a numeric secret stays a string).

    The value is never echoed in an error: it may be a credential.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (the argument is not shown: it may hold a secret)")
    if value in ("true", "false", "null") or value[:1] in ("{", "["):
        try:
            return key, json.loads(value)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"the value of {key!r} is not valid JSON") from None
    return key, value


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), not a usage block."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """``--version``: prints :func:`dconv.version_text` on one line (argparse's own action wraps it) and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version, the SIMD level in use and the levels this machine runs; exit")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(dconv.version_text())
        parser.exit(EXIT_OK)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors, and the cluster's logs")
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        type=storage_option,
        action="append",
        default=[],
        help="fsspec option for the stores, repeatable (e.g. endpoint_url=http://127.0.0.1:9000); "
        "true/false and JSON objects are parsed, other values are strings",
    )


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    conv = parser.add_argument_group("convolution (default: the input's hparameters attribute, else 1, 0, 1)")
    job = parser.add_argument_group("job")
    cluster = parser.add_argument_group("cluster (default: a local cluster, one worker per core)")
    dconv.JobOptions.add_arguments({"conv": conv, "job": job, "output": job})
    dconv.ClusterOptions.add_arguments({"cluster": cluster})
    job.add_argument("--dry-run", action="store_true", help="validate and print the plan; compute nothing")
    job.add_argument("--quiet", action="store_true", help="no progress bar or dashboard link")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dconv",
        description="Conv2d backward (dA_prev, dW, db) for large batches, on Dask, with Zarr storage.",
    )
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backward = commands.add_parser(
        "backward",
        help="run a backward job on an input group, or on every layer of a model input group",
        description="Compute dA_prev, dW and db of a conv layer over a whole batch, chunk by chunk, on Dask. "
        "Given a model input group (dconv.capture), run every layer (or those --layers names) in one job: "
        "each layer's output goes to OUT/layers/<name>, and with --stats the model's per-sample |g_i|^2 to "
        "OUT/stats/sample_grad_norm2 and its noise scale and per-layer table to the provenance.",
    )
    backward.add_argument("inputs", metavar="INPUTS", help="input Zarr group, or model input group (path or fsspec URL)")
    backward.add_argument("out", metavar="OUT", help="output Zarr group (path or fsspec URL)")
    _add_job_options(backward)
    _add_common(backward)
    backward.set_defaults(handler=cmd_backward)

    run = commands.add_parser("run", help="run a pipeline spec (TOML); options override the spec")
    run.add_argument("spec", metavar="SPEC.toml", help="the pipeline spec; relative paths in it are relative to "
                     "the directory dconv runs in")
    _add_job_options(run)
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    make = commands.add_parser("make-inputs", help="write a synthetic, seeded input group")
    make.add_argument("out", metavar="OUT", help="the input group to write (path or fsspec URL)")
    dconv.InputRecipe.add_arguments({"input.make": make})
    make.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it is an input group dconv wrote (else refused)"
    )
    _add_common(make)
    make.set_defaults(handler=cmd_make_inputs)

    queries = commands.add_parser(
        "queries",
        help="write a query group for --dot: a few samples' per-sample gradients, or an output's batch gradient",
        description="Write a query group (QUERIES/dW (n_q, fh, fw, C_prev, C), QUERIES/db (n_q, C); for a model, "
        "one pair per layer under layers/<name>) for dconv backward --dot QUERIES, which writes each sample's "
        "exact inner products <g_i, q_j> to dots/sample_dot.",
    )
    queries.add_argument("out", metavar="QUERIES", help="the query group to write (path or fsspec URL)")
    source = queries.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-inputs", metavar="INPUTS", help="an input group or model input group of at most "
                        "4096 samples: one query per sample, its own gradient")
    source.add_argument("--from-output", metavar="OUT", help="a complete output (or model output): one query, its "
                        "dW and db, the batch gradient")
    queries.add_argument("--overwrite", action="store_true", help="replace QUERIES if it is a query group dconv wrote")
    _add_common(queries)
    queries.set_defaults(handler=cmd_queries)

    score = commands.add_parser(
        "score",
        help="score train samples against queries by their gradient sketches (or exact dots); keep the top lists",
        description="For every query sample, the --top train samples with the largest and the smallest scores "
        "(index and score), the score being the inner product of the samples' gradient sketches (the backward "
        "outputs' sketch/values, layers concatenated), or with --dots TRAIN_OUT's exact dots/sample_dot against "
        "its job's queries (QUERY_OUT is then '-', or the queries' output for --normalize). Ties break by train "
        "index; NaN scores are in no list. Resume an interrupted run with --resume.",
    )
    score.add_argument("train", metavar="TRAIN_OUT", help="backward output (one layer's or a model's) of the train samples")
    score.add_argument("query", metavar="QUERY_OUT", help="backward output of the query samples, same projections; "
                       "'-' with --dots")
    score.add_argument("out", metavar="SCORES_OUT", help="the score output group to write")
    job = score.add_argument_group("scoring")
    job.add_argument("--top", type=int, default=None, help="list length per query (default 10)")
    job.add_argument("--normalize", action="store_true", default=None,
                     help="cosine scores: divide by sqrt(|g_i|^2 |g_j|^2) from both outputs' stats/sample_grad_norm2")
    job.add_argument("--full", action="store_true", default=None,
                     help="also write scores (m_train, m_query) float32")
    job.add_argument("--block", type=int, default=None, help="train rows per task (default: up to 32768, about 128 MiB of features at most)")
    job.add_argument("--dots", action="store_true", help="score by TRAIN_OUT's dots/sample_dot")
    job.add_argument("--overwrite", action="store_true", help="replace SCORES_OUT if it is a score output dconv wrote")
    job.add_argument("--resume", action="store_true", help="continue an interrupted SCORES_OUT from its records")
    job.add_argument("--quiet", action="store_true", help="no progress bar or dashboard link")
    job.add_argument("--lease-timeout", type=float, default=None, metavar="SECONDS",
                     help="seconds without a heartbeat after which another job takes over SCORES_OUT's lease (the "
                     "job renews it every quarter of this; default 60, as for backward)")
    cluster = score.add_argument_group("cluster (default: a local cluster, one worker per core)")
    dconv.ClusterOptions.add_arguments({"cluster": cluster})
    _add_common(score)
    score.set_defaults(handler=cmd_score)

    inspect = commands.add_parser(
        "inspect",
        help="summarise an output group (exit 3 if incomplete)",
        description="Summarise a dconv output group: status, arrays, SIMD levels, norms of dW and db, NaN/Inf "
        "counts, provenance; for a --stats job, the gradient noise scale, its terms and the 10 samples with the "
        "largest |g_i|^2 (from the provenance: the m norms are not read). For a model job's output: a line per "
        "layer (status, chunks, norms, its share of the model's sum_i |g_i|^2 and |S|^2) and the model's figures. "
        "Exit 3 if the job is not complete.",
    )
    inspect.add_argument("out", metavar="OUT", help="a dconv output group, or model output (path or fsspec URL)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _add_common(inspect)
    inspect.set_defaults(handler=cmd_inspect)
    return parser


# --------------------------------------------------------------------------- commands


def _run_job(
    inputs: str, out: str, base: Any, given: dict, cluster: Any, storage: dict, args: argparse.Namespace
) -> int:
    """Plan and run the job of ``base`` (a spec's options, or None) with the flags ``given`` over it:
    given separately, so that a resume knows which options the command line set."""
    plan = dconv.plan_backward(inputs, out, base, storage_options=storage, **given)
    if args.dry_run:
        print(as_flags(dconv.describe_job(plan, cluster)))
        return EXIT_OK
    result = dconv.run_job(
        plan,
        cluster=cluster,
        progress=not args.quiet,
        quiet=args.quiet,
        debug=args.debug,
        say=lambda line: print(as_flags(line), file=sys.stderr),
    )
    print(result.describe())
    return EXIT_OK


def _lasting(name: str, url: str) -> str:
    """``url``, if its store outlives this command; a ``memory://`` one does not.

    Raises
    ------
    dconv.InputError
        ``url`` is a ``memory://`` URL; the message names the argument ``name``.
    """
    from dconv.store.locations import is_memory

    if is_memory(url):
        raise dconv.InputError(
            f"{name} must be a path or a URL of lasting storage; got {url!r} instead "
            "(a memory:// store is gone when dconv exits)."
        )
    return url


def cmd_backward(args: argparse.Namespace) -> int:
    _lasting("INPUTS", args.inputs)
    _lasting("OUT", args.out)
    given = dconv.JobOptions.given(args)
    cluster = dconv.ClusterOptions.build(None, **dconv.ClusterOptions.given(args))
    return _run_job(args.inputs, args.out, None, given, cluster, dict(args.storage_options), args)


def cmd_run(args: argparse.Namespace) -> int:
    """A spec, with the options given on the command line over it."""
    spec = dconv.load_spec(args.spec)
    _lasting("[input] path", spec.inputs)
    _lasting("[output] path", spec.out)
    spec.check_input()
    given = dconv.JobOptions.given(args)
    options = dconv.JobOptions.build(spec.options, **given)
    cluster = dconv.ClusterOptions.build(spec.cluster, **dconv.ClusterOptions.given(args))
    storage = {**spec.storage, **dict(args.storage_options)}
    cluster.check_simd(options.simd)  # before the input is made
    if spec.make is not None and not dconv.store_exists(spec.inputs, storage):
        plan = dconv.plan_recipe(spec.make, spec.inputs, spec.out, options, storage_options=storage)
        described = dconv.describe_job(plan, cluster)  # refuses what the job would, before the input is made
        if args.dry_run:
            print(as_flags(described))
            return EXIT_OK
        if not args.quiet:
            print(f"dconv: making synthetic input {spec.inputs} ({spec.make.describe()})", file=sys.stderr)
        dconv.make_inputs(spec.inputs, spec.make, storage_options=storage)
    return _run_job(spec.inputs, spec.out, spec.options, given, cluster, storage, args)


def cmd_make_inputs(args: argparse.Namespace) -> int:
    _lasting("OUT", args.out)
    recipe = dconv.InputRecipe.build(None, **dconv.InputRecipe.given(args))
    dconv.make_inputs(args.out, recipe, overwrite=args.overwrite, storage_options=dict(args.storage_options))
    print(f"dconv: wrote input group {args.out} ({recipe.describe()})")
    return EXIT_OK


def cmd_queries(args: argparse.Namespace) -> int:
    from dconv.store.queries import queries_from_inputs, queries_from_output

    _lasting("QUERIES", args.out)
    storage = dict(args.storage_options)
    if args.from_inputs is not None:
        queries_from_inputs(args.from_inputs, args.out, overwrite=args.overwrite, storage_options=storage)
    else:
        queries_from_output(args.from_output, args.out, overwrite=args.overwrite, storage_options=storage)
    from dconv.store.locations import open_group

    n_q = open_group(args.out, "r", storage).attrs["dconv_queries"]["n_q"]
    print(f"dconv: wrote query group {args.out} ({n_q} {'query' if n_q == 1 else 'queries'})")
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    for name, url in (("TRAIN_OUT", args.train), ("QUERY_OUT", args.query), ("SCORES_OUT", args.out)):
        if url != "-":
            _lasting(name, url)
    cluster = dconv.ClusterOptions.build(None, **dconv.ClusterOptions.given(args))
    plan = dconv.plan_score(
        args.train, args.query, args.out, top=args.top, normalize=args.normalize, full=args.full, block=args.block,
        dots=args.dots, overwrite=args.overwrite, resume=args.resume, lease_timeout=args.lease_timeout,
        storage_options=dict(args.storage_options),
    )
    if not args.quiet:
        print(plan.describe(), file=sys.stderr)
    result = dconv.run_score(plan, cluster=cluster, progress=not args.quiet, quiet=args.quiet, debug=args.debug)
    print(result.describe())
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = dconv.summarize(args.out, dict(args.storage_options))
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else dconv.format_summary(summary))
    return EXIT_OK if summary["complete"] else EXIT_INCOMPLETE


# --------------------------------------------------------------------------- entry point


def as_flags(message: str) -> str:
    """A library message in the command line's words: the options it names become flags.

    The library names an option as its Python keyword: ``overwrite=True``, or a
    name with an underscore such as ``batch_chunk``. Here those read
    ``--overwrite`` and ``--batch-chunk``. Names inside paths are left alone, and so
    is the name of an option that is on by default (``dA_prev``, whose flag is
    ``--no-dA-prev``): it is also the name of an array.
    """
    for options in (dconv.JobOptions, dconv.ClusterOptions, dconv.InputRecipe):
        for spec in dataclasses.fields(options):
            name, flag = spec.name, "--" + spec.name.replace("_", "-")
            edge = r"(?<![\w./\-'\"])", r"(?![\w/\-'\"]|\.\w)"
            message = re.sub(edge[0] + name + r"=True" + edge[1], flag, message)
            message = re.sub(r"^" + name + r"(?= must )", flag, message)  # "simd must be one of ..."
            if "_" in name and spec.default is not True:  # an on-by-default option's flag is --no-...; its
                message = re.sub(edge[0] + name + edge[1], flag, message)  # name (dA_prev) is an array's too
    return message


def _fail(message: str, code: int, debug: bool, label: str = "error: ") -> int:
    if debug:
        traceback.print_exc()
    print(f"dconv: {label}{message}", file=sys.stderr)
    return code


def _interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``error``, if any: ``error`` itself, or one it was raised while handling.

    A :class:`dconv.errors.JobInterrupted` (which says how far the job got) before a plain
    KeyboardInterrupt: a second Ctrl-C while the cluster shuts down reports the first, which
    the job recorded; an error in that shutdown, or an import that Ctrl-C broke, reports the Ctrl-C.
    """
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    interrupts = [e for e in chain if isinstance(e, KeyboardInterrupt)]
    return next((e for e in interrupts if getattr(e, "out", None) is not None), interrupts[-1] if interrupts else None)


def _interrupted(error: KeyboardInterrupt, debug: bool) -> int:
    """One line for Ctrl-C or SIGTERM, with how far the job got and how to resume it; 128 + the signal's number."""
    name = getattr(error, "signal", "SIGINT")
    message = f"by {name}"
    if getattr(error, "out", None) is not None:
        done = "?" if error.done is None else error.done  # None: the output could not be read
        message += f" with {done} of {error.total} chunks of {error.out} done"
        if error.resume_command:
            message += f"; resume with: {error.resume_command}"
    return _fail(message, 128 + int(signal.Signals[name]), debug, label="interrupted ")


def run() -> None:
    """The ``dconv`` command and ``python -m dconv``: :func:`main`, then the process ends at once.

    When :func:`main` returns, the job's files are written, its cluster closed
    and its lease released; what is left of a normal exit is the interpreter's
    teardown of the 1,100-odd modules a job imports (dask, distributed, zarr,
    NumPy), measured at 0.36-0.47 s of CPU after every job on an AMD EPYC Zen 4.
    So this runs what an exit must run, in its order (the wait for other threads,
    then the exit handlers: Dask's, zarr's, multiprocessing's, logging's),
    flushes stdout and stderr, and leaves with ``os._exit``. Where those hooks
    are missing (not CPython), and for argparse's own exits (``--help``,
    ``--version``, a usage error), it exits as usual.
    """
    code = main()
    wait_for_threads = getattr(threading, "_shutdown", None)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if wait_for_threads is None or run_exit_handlers is None:
        sys.exit(code)
    try:
        wait_for_threads()
        run_exit_handlers()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that left (`| head`), a stream closed
                pass
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
        logging.getLogger("dconv").setLevel(logging.DEBUG)
    else:
        logging.getLogger("dconv").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except dconv.SpecError as e:  # names the spec's keys
        return _fail(str(e), EXIT_USAGE, args.debug)
    except (dconv.InputError, FileExistsError) as e:
        return _fail(as_flags(str(e)), EXIT_USAGE, args.debug)
    except dconv.LeaseLost as e:  # before the interruption it caused: the lease is why the job stopped
        return _fail(f"{type(e).__name__}: {e}", EXIT_FAILED, args.debug)
    except BrokenPipeError:  # `dconv inspect OUT | head`: the reader left; say nothing more
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM too while a job runs
        return _interrupted(_interruption(e), args.debug)
    except Exception as e:  # a failure while running: one line unless --debug
        interruption = _interruption(e)
        if interruption is not None:
            return _interrupted(interruption, args.debug)
        return _fail(f"{type(e).__name__}: {e}", EXIT_FAILED, args.debug)

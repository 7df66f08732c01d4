"""The ``dconv`` command: parses arguments, then calls dconv's public functions.

The job's flags are generated from :class:`dconv.JobOptions` and
:class:`dconv.ClusterOptions`, and make-inputs' from :class:`dconv.InputRecipe`,
so each option's default, validation and help live in one place.

Exit codes: 0 success; 1 a failure while running; 2 bad input or usage (a bad
``DCONV_SIMD`` too); 3 ``inspect`` found an output that is not complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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

    backward = commands.add_parser("backward", help="run a backward job on an input group")
    backward.add_argument("inputs", metavar="INPUTS", help="input Zarr group (path or fsspec URL)")
    backward.add_argument("out", metavar="OUT", help="output Zarr group (path or fsspec URL)")
    _add_job_options(backward)
    _add_common(backward)
    backward.set_defaults(handler=cmd_backward)

    run = commands.add_parser("run", help="run a pipeline spec (TOML); options override the spec")
    run.add_argument("spec", metavar="SPEC.toml")
    _add_job_options(run)
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    make = commands.add_parser("make-inputs", help="write a synthetic, seeded input group")
    make.add_argument("out", metavar="OUT")
    dconv.InputRecipe.add_arguments({"input.make": make})
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_common(make)
    make.set_defaults(handler=cmd_make_inputs)

    inspect = commands.add_parser("inspect", help="summarise an output group (exit 3 if incomplete)")
    inspect.add_argument("out", metavar="OUT")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _add_common(inspect)
    inspect.set_defaults(handler=cmd_inspect)
    return parser


# --------------------------------------------------------------------------- commands


def _run_job(inputs: str, out: str, options: Any, cluster: Any, storage: dict, args: argparse.Namespace) -> int:
    plan = dconv.plan_job(inputs, out, options, storage_options=storage)
    if args.dry_run:
        print(plan.describe())
        return EXIT_OK
    result = dconv.run_job(plan, cluster=cluster, progress=not args.quiet, quiet=args.quiet, debug=args.debug)
    print(result.describe())
    return EXIT_OK


def cmd_backward(args: argparse.Namespace) -> int:
    options = dconv.JobOptions.build(None, **dconv.JobOptions.given(args))
    cluster = dconv.ClusterOptions.build(None, **dconv.ClusterOptions.given(args))
    return _run_job(args.inputs, args.out, options, cluster, dict(args.storage_options), args)


def cmd_run(args: argparse.Namespace) -> int:
    """A spec, with the options given on the command line over it."""
    spec = dconv.load_spec(args.spec)
    options = dconv.JobOptions.build(spec.options, **dconv.JobOptions.given(args))
    cluster = dconv.ClusterOptions.build(spec.cluster, **dconv.ClusterOptions.given(args))
    storage = {**spec.storage, **dict(args.storage_options)}
    cluster.check_simd(options.simd)  # before the input is made
    if spec.make is not None and not dconv.store_exists(spec.inputs, storage):
        if args.dry_run:
            print(f"input   {spec.inputs} does not exist yet; the run would first make it: {spec.make.describe()}")
            return EXIT_OK
        if not args.quiet:
            print(f"dconv: making synthetic input {spec.inputs} ({spec.make.describe()})", file=sys.stderr)
        dconv.make_inputs(spec.inputs, spec.make, storage_options=storage)
    return _run_job(spec.inputs, spec.out, options, cluster, storage, args)


def cmd_make_inputs(args: argparse.Namespace) -> int:
    recipe = dconv.InputRecipe.build(None, **dconv.InputRecipe.given(args))
    dconv.make_inputs(args.out, recipe, overwrite=args.overwrite, storage_options=dict(args.storage_options))
    print(f"dconv: wrote input group {args.out} ({recipe.describe()})")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = dconv.summarize(args.out, dict(args.storage_options))
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else dconv.format_summary(summary))
    return EXIT_OK if summary["complete"] else EXIT_INCOMPLETE


# --------------------------------------------------------------------------- entry point


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"dconv: error: {message}", file=sys.stderr)
    return code


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
    except (dconv.InputError, FileExistsError) as e:
        return _fail(str(e), EXIT_USAGE, args.debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FAILED, args.debug)
    except Exception as e:  # a failure while running: one line unless --debug
        return _fail(f"{type(e).__name__}: {e}", EXIT_FAILED, args.debug)

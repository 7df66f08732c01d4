"""The ``dconv`` command: parses arguments, then calls the library.

Exit codes: 0 success; 1 a failure while running; 2 bad input or usage (a bad
``DCONV_SIMD`` too); 3 ``inspect`` found an output that is not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from typing import Any, Callable, Sequence

from dconv.errors import InputError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


# --------------------------------------------------------------------------- value parsers


def int_list(text: str) -> int | list[int]:
    """``"2"`` -> 2, ``"2,1"`` -> [2, 1]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def padding_value(text: str) -> Any:
    """``same``, ``valid``, ``1``, ``1,2`` (h,w) or ``1,2,0,1`` (top,bottom,left,right)."""
    if text.strip().lower() in ("same", "valid"):
        return text.strip().lower()
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2, 4):
        raise argparse.ArgumentTypeError(
            f"expected P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, 'same' or 'valid'; got {text!r}"
        )
    return values[0] if len(values) == 1 else values


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


# --------------------------------------------------------------------------- parser


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), not a usage block."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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
    conv.add_argument("--stride", type=int_list, help="S or SH,SW")
    conv.add_argument("--padding", type=padding_value, help="P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, same or valid")
    conv.add_argument("--dilation", type=int_list, help="D or DH,DW")
    job = parser.add_argument_group("job")
    job.add_argument("--batch-chunk", type=int, help="samples per task (default 256, or the most --max-memory allows, "
                     "rounded down to whole input chunks)")
    job.add_argument("--max-memory", metavar="SIZE", help="memory one task may use, e.g. 512MiB or 2GB")
    job.add_argument("--split-every", type=int, help="fan-in of the dW/db tree reduction (default 8)")
    job.add_argument("--check-finite", action="store_true", default=None, help="fail on NaN/Inf inputs")
    job.add_argument("--overwrite", action="store_true", default=None, help="replace OUT if it exists")
    job.add_argument("--resume", action="store_true", default=None, help="continue an interrupted job in OUT")
    job.add_argument("--dry-run", action="store_true", help="validate and print the plan; compute nothing")
    job.add_argument("--quiet", action="store_true", help="no progress bar or dashboard link")
    cluster = parser.add_argument_group("cluster (default: a local cluster, one worker per core)")
    where = cluster.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, help="worker processes of the local cluster")
    where.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786")
    cluster.add_argument("--tls-ca-file", help="CA certificate for a tls:// scheduler")
    cluster.add_argument("--tls-cert", help="client certificate for a tls:// scheduler")
    cluster.add_argument("--tls-key", help="client private key for a tls:// scheduler")


def version_text() -> str:
    """``dconv X.Y.Z``, the SIMD level ``DCONV_SIMD`` picks here, and the levels this machine runs.

    A bad ``DCONV_SIMD`` is reported in place of the level, not raised.
    """
    import dconv
    from dconv import simd

    word = os.environ.get(simd.ENV_VAR) or "auto"
    levels = simd.simd_levels()
    runs = ", ".join(levels + ["numpy"])
    built = "" if levels else "; the compiled loops were not built at install"
    try:
        level = f"SIMD level {simd.resolve_level(word)} ({simd.ENV_VAR}={word}; this machine runs {runs}{built})"
    except ValueError as e:
        level = f"no SIMD level: {e}"
    return f"dconv {dconv.__version__}; {level}"


class VersionAction(argparse.Action):
    """``--version``: prints :func:`version_text` on one line (argparse's own action wraps it) and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version, the SIMD level in use and the levels this machine runs; exit")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(version_text())
        parser.exit(EXIT_OK)


def check_simd_here(cluster: Any) -> None:
    """Refuse a bad ``DCONV_SIMD`` before any work: an unknown word always, and a level this
    CPU lacks when the workers run here (the local cluster). An existing cluster's workers
    are asked when the job starts (:func:`dconv.job.check_simd`)."""
    from dconv import simd

    word = os.environ.get(simd.ENV_VAR)
    if cluster.scheduler is None:
        simd.resolve_level(word)
    else:
        simd.parse_word(word)


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
    make.add_argument("--m", type=positive_int, required=True, help="batch size")
    make.add_argument("--height", type=positive_int, default=32)
    make.add_argument("--width", type=positive_int, default=32)
    make.add_argument("--in-channels", type=positive_int, default=16)
    make.add_argument("--out-channels", type=positive_int, default=32)
    make.add_argument("--kernel", type=int_list, default=3, help="F or FH,FW (default 3)")
    make.add_argument("--stride", type=int_list, default=1)
    make.add_argument("--padding", type=padding_value, default=1)
    make.add_argument("--dilation", type=int_list, default=1)
    make.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    make.add_argument("--chunk", type=positive_int, default=256, help="Zarr chunk along m")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true")
    _add_common(make)
    make.set_defaults(handler=cmd_make_inputs)

    inspect = commands.add_parser("inspect", help="summarise an output group (exit 3 if incomplete)")
    inspect.add_argument("out", metavar="OUT")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _add_common(inspect)
    inspect.set_defaults(handler=cmd_inspect)
    return parser


# --------------------------------------------------------------------------- commands


def _job_arguments(args: argparse.Namespace, spec: Any = None) -> dict[str, Any]:
    """Merge a spec (if any) with command-line options; options given on the command line win."""
    from dconv.cluster import ClusterOptions

    def pick(option: str, from_spec: Any) -> Any:
        value = getattr(args, option, None)
        return value if value is not None else from_spec

    s = spec
    storage = {**(s.storage if s else {}), **dict(args.storage_options)}
    cluster = ClusterOptions(
        workers=pick("workers", s.cluster.workers if s and not args.scheduler else None),
        scheduler=pick("scheduler", s.cluster.scheduler if s and not args.workers else None),
        tls_ca_file=pick("tls_ca_file", s.cluster.tls_ca_file if s else None),
        tls_cert=pick("tls_cert", s.cluster.tls_cert if s else None),
        tls_key=pick("tls_key", s.cluster.tls_key if s else None),
    )
    return {
        "inputs": s.input.path if s else args.inputs,
        "out": s.output.path if s else args.out,
        "stride": pick("stride", s.conv.stride if s else None),
        "padding": pick("padding", s.conv.padding if s else None),
        "dilation": pick("dilation", s.conv.dilation if s else None),
        "batch_chunk": pick("batch_chunk", s.job.batch_chunk if s else None),
        "max_memory": pick("max_memory", s.job.max_memory if s else None),
        "split_every": pick("split_every", s.job.split_every if s else 8),
        "check_finite": bool(pick("check_finite", s.job.check_finite if s else False)),
        # --resume on the command line overrides a spec's overwrite = true, and --overwrite its resume = true
        "overwrite": bool(args.overwrite) if args.resume else bool(pick("overwrite", s.output.overwrite if s else False)),
        "resume": bool(args.resume) if args.overwrite else bool(pick("resume", s.output.resume if s else False)),
        "storage_options": storage,
        "cluster": cluster,
    }


def _run_job(arguments: dict[str, Any], args: argparse.Namespace) -> int:
    from dconv.job import plan_job, run_job
    from dconv.cluster import connect
    from dconv.summary import format_levels

    cluster = arguments.pop("cluster")
    plan = plan_job(**arguments)
    if args.dry_run:
        print(plan.describe())
        return EXIT_OK
    with connect(cluster, quiet=args.quiet, debug=args.debug) as client:
        result = run_job(plan, client=client, progress=not args.quiet)
    seconds = result.seconds
    print(
        f"dconv: wrote {result.out}: {result.computed_chunks} of {result.n_chunks} chunks computed in "
        f"{seconds['total']:.2f} s (kernel {seconds.get('kernel', 0.0):.2f} s summed over tasks); "
        f"|dW| = {float((result.dW.astype('float64') ** 2).sum() ** 0.5):.6g}, "
        f"|db| = {float((result.db.astype('float64') ** 2).sum() ** 0.5):.6g}; "
        f"SIMD {format_levels(result.simd)}"
    )
    return EXIT_OK


def cmd_backward(args: argparse.Namespace) -> int:
    arguments = _job_arguments(args)
    check_simd_here(arguments["cluster"])
    return _run_job(arguments, args)


def cmd_run(args: argparse.Namespace) -> int:
    from dconv.spec import load_spec
    from dconv.store import make_inputs, store_exists

    spec = load_spec(args.spec)
    arguments = _job_arguments(args, spec)
    check_simd_here(arguments["cluster"])
    make = spec.input.make
    if make is not None and not store_exists(spec.input.path, arguments["storage_options"]):
        if args.dry_run:
            print(f"input   {spec.input.path} does not exist yet; the run would first make it with {make}")
            return EXIT_OK
        if not args.quiet:
            print(f"dconv: making synthetic input {spec.input.path} (m={make.m})", file=sys.stderr)
        make_inputs(spec.input.path, storage_options=arguments["storage_options"], **asdict(make))
    return _run_job(arguments, args)


def cmd_make_inputs(args: argparse.Namespace) -> int:
    from dconv.store import make_inputs

    make_inputs(
        args.out,
        m=args.m,
        height=args.height,
        width=args.width,
        in_channels=args.in_channels,
        out_channels=args.out_channels,
        kernel=args.kernel,
        stride=args.stride,
        padding=args.padding,
        dilation=args.dilation,
        dtype=args.dtype,
        chunk=args.chunk,
        seed=args.seed,
        overwrite=args.overwrite,
        storage_options=dict(args.storage_options),
    )
    print(f"dconv: wrote input group {args.out} (m={args.m})")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from dconv.summary import format_summary, summarize

    summary = summarize(args.out, dict(args.storage_options))
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else format_summary(summary))
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
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (InputError, FileExistsError) as e:
        return _fail(str(e), EXIT_USAGE, args.debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FAILED, args.debug)
    except Exception as e:  # a failure while running: one line unless --debug
        return _fail(f"{type(e).__name__}: {e}", EXIT_FAILED, args.debug)

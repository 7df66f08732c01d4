"""Frozen, validated option objects, each field declared once.

:class:`JobOptions` says how a backward job computes, :class:`InputRecipe` what
``make-inputs`` writes (and :class:`dconv.cluster.ClusterOptions` where a job
runs). The Python API, the ``dconv`` command line and pipeline specs all build
these objects, and all three read each field's declaration here:

- its default, once;
- its validation (a ``parse`` function that normalises the value or raises
  :class:`~dconv.errors.InputError` naming the field);
- its spec table and the TOML types it accepts;
- its command-line flag and help;
- whether an output records it (``record``): part of the identity a resumed job
  must match, or carried over to a resumed job that does not give it.

What an output records is generated from these declarations (:meth:`Options.to_dict`,
:meth:`Options.from_dict`), and so are the flags of the resume command
(:meth:`Options.flags`). Adding an option means adding one field here (and, if
tasks need it, passing it to the chunk function).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
from dask.utils import parse_bytes

from dconv.errors import InputError, SpecError
from dconv.params import padding_from_flat, parse_float_dtype, parse_padding, parse_pair
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word

__all__ = ["JobOptions", "InputRecipe", "Options", "option"]


# --------------------------------------------------------------------------- command-line text


def int_list(text: str) -> int | list[int]:
    """``"2"`` -> 2, ``"2,1"`` -> [2, 1]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def padding_text(text: str) -> Any:
    """``same``, ``valid``, ``1``, ``1,2`` (h,w) or ``1,2,0,1`` (top,bottom,left,right)."""
    if text.strip().lower() in ("same", "valid"):
        return text.strip().lower()
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2, 4):
        raise argparse.ArgumentTypeError(f"expected P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, 'same' or 'valid'; got {text!r}")
    return values[0] if len(values) == 1 else values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def positive_float(text: str) -> float:
    """Command-line text -> a number > 0 (``argparse`` ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}")
    return value


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def whole_number(name: str, minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise InputError(f"{name} must be an int >= {minimum}; got {value!r} instead.")
        return int(value)

    return parse


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse``, with None passed through (an option left to a later default)."""
    return lambda value: None if value is None else parse(value)


def non_negative(name: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            0 <= value < float("inf")
        ):
            raise InputError(f"{name} must be a number >= 0; got {value!r} instead.")
        return float(value)

    return parse


def positive_number(name: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            0 < value < float("inf")
        ):
            raise InputError(f"{name} must be a number > 0; got {value!r} instead.")
        return float(value)

    return parse


def flag(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False; got {value!r} instead.")
        return value

    return parse


def size_in_bytes(name: str) -> Callable[[Any], int]:
    """A size in bytes from an int or a string such as ``"512MiB"``, ``"2GB"``, ``"1e9"`` (dask.utils.parse_bytes)."""

    def parse(value: Any) -> int:
        try:
            size = parse_bytes(value) if isinstance(value, str) else value
        except (ValueError, TypeError):
            size = None
        if not _is_int(size) or size <= 0:
            raise InputError(f"{name} must be a size such as 512MiB, 2GB or 1e9 bytes; got {value!r} instead.")
        return int(size)

    return parse


def any_string(name: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise InputError(f"{name} must be a non-empty string; got {value!r} instead.")
        return value

    return parse


def _path(spec: dataclasses.Field) -> tuple[str, ...]:
    return spec.metadata.get("path") or (spec.name,)


def _plain(value: Any) -> Any:
    """``value`` in JSON types: tuples (pairs, pads) become lists, NumPy scalars Python ones."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _flag_text(value: Any) -> str:
    """A recorded value as its flag takes it: ``2``, ``2,1``, pads as ``top,bottom,left,right``, words as they are."""
    value = _plain(value)
    if isinstance(value, list):
        flat = [item for part in value for item in (part if isinstance(part, list) else [part])]
        if len(set(flat)) == 1:
            return str(flat[0])
        if isinstance(value[0], list) and value[0][0] == value[0][1] and value[1][0] == value[1][1]:
            flat = [value[0][0], value[1][0]]
        return ",".join(map(str, flat))
    return str(value)


# --------------------------------------------------------------------------- declaring fields


def option(
    default: Any,
    *,
    help: str,
    parse: Callable[[Any], Any],
    table: str | None,
    toml: tuple[type, ...] = (),
    cli: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    record: str | None = None,
    path: tuple[str, ...] | None = None,
    excludes: str | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field declared with everything the API, the CLI and the spec need.

    Parameters
    ----------
    default
        The default, here and only here.
    help : str
        One line for ``--help`` and the docs.
    parse : callable
        Value -> normalised value, or :class:`InputError` naming the field.
    table : str or None
        The spec table that holds the key (``"job"``, ``"conv"``, ...); None keeps it out of specs.
    toml : tuple of type
        The TOML value types the spec accepts.
    cli : callable, optional
        Flag text -> value (``argparse`` ``type``); with ``bool`` defaults the
        flag takes no value. No flag when None and the default is not a bool.
    record : {"identity", "carried"}, optional
        What an output records of it, in its provenance, so that ``resume``
        continues with the same value: ``"identity"``, a value a resumed job
        must match (a different one given is refused, since the chunks already
        written would not fit it); ``"carried"``, a value a resumed job takes
        when none is given. None: not recorded.
    path : tuple of str, optional
        Where in the provenance it is recorded: ``(name,)`` by default,
        ``("params", "stride")`` for a conv parameter.
    excludes : str, optional
        A field that giving this one on the command line clears (``resume`` clears
        a spec's ``overwrite``).
    required : bool
        The default is a placeholder: the flag is required.
    """
    metadata = {
        "help": help,
        "parse": parse,
        "table": table,
        "toml": toml,
        "cli": cli,
        "metavar": metavar,
        "record": record,
        "path": path,
        "excludes": excludes,
        "required": required,
    }
    return dataclasses.field(default=default, metadata=metadata)


def suggest(key: str, known: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def toml_type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names[t] for t in types)


class Options:
    """Mixin for frozen option dataclasses declared with :func:`option`."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            if "parse" in spec.metadata:
                object.__setattr__(self, spec.name, spec.metadata["parse"](getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields; override."""

    @classmethod
    def build(cls, base: Options | None = None, **values: Any) -> Any:
        """``base`` (default: all defaults) with ``values`` replaced; an unknown name is an InputError.

        Giving a field clears the one it ``excludes`` unless that is given too,
        so ``resume=True`` over a base with ``overwrite=True`` resumes.
        """
        known = [spec.name for spec in fields(cls)]
        for key in values:
            if key not in known:
                raise InputError(f"unknown option {key!r}; known options: {', '.join(known)}.{suggest(key, known)}")
        declared = {spec.name: spec for spec in fields(cls)}
        for key, value in list(values.items()):
            partner = declared[key].metadata.get("excludes")
            if partner and value and partner not in values:
                values[partner] = declared[partner].default
        return dataclasses.replace(base, **values) if base is not None else cls(**values)

    @classmethod
    def table_keys(cls, table: str) -> dict[str, dataclasses.Field]:
        """The fields a spec table holds, by key."""
        return {spec.name: spec for spec in fields(cls) if spec.metadata.get("table") == table}

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values of spec table ``[where]`` that belong to this class, type-checked.

        Keys in ``extra`` belong to the spec itself and are skipped; any other
        unknown key is an InputError that suggests the closest known one.
        """
        declared = cls.table_keys(where)
        known = [*extra, *declared]
        values = {}
        for key, value in table.items():
            if key in extra:
                continue
            if key not in declared:
                raise SpecError(
                    f"unknown key {key!r} in [{where}]; known keys: {', '.join(known)}.{suggest(key, known)}"
                )
            types = declared[key].metadata["toml"]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise SpecError(f"{where}.{key} must be {toml_type_name(types)}; got {value!r} instead.")
            values[key] = value
        return values

    @classmethod
    def add_arguments(cls, groups: Mapping[str | None, Any]) -> None:
        """Add a flag per field to the argparse group of its table (``groups[table]``).

        Every flag defaults to None, so that :meth:`given` tells what the command line set.
        """
        for spec in fields(cls):
            if spec.metadata.get("cli") is None and not isinstance(spec.default, bool):
                continue
            group = groups[spec.metadata["table"]]
            name = "--" + spec.name.replace("_", "-")
            help_text = spec.metadata["help"]
            if spec.default is True:  # on by default: the flag turns it off
                name = "--no-" + spec.name.replace("_", "-")
                group.add_argument(name, action="store_false", dest=spec.name, default=None, help=help_text)
            elif isinstance(spec.default, bool):
                group.add_argument(name, action="store_true", default=None, help=help_text)
            else:
                default = f" (default {spec.default})" if spec.default is not None and "default" not in help_text else ""
                group.add_argument(
                    name,
                    type=spec.metadata["cli"],
                    metavar=spec.metadata["metavar"],
                    help=help_text + default,
                    required=spec.metadata["required"],
                )

    @classmethod
    def given(cls, namespace: argparse.Namespace) -> dict[str, Any]:
        """The fields the command line set (flags left out are None)."""
        return {
            spec.name: getattr(namespace, spec.name)
            for spec in fields(cls)
            if getattr(namespace, spec.name, None) is not None
        }

    # ------------------------------------------------------------------- what an output records

    @classmethod
    def recorded(cls, kind: str | None = None) -> list[dataclasses.Field]:
        """The fields an output records (``record="identity"`` or ``"carried"``; ``kind``: only those)."""
        return [
            spec
            for spec in fields(cls)
            if spec.metadata.get("record") and kind in (None, spec.metadata["record"])
        ]

    @classmethod
    def recorded_keys(cls) -> list[str]:
        """The top-level provenance keys the recorded fields go under, in declaration order."""
        return list(dict.fromkeys(_path(spec)[0] for spec in cls.recorded()))

    def to_dict(self, kind: str | None = None) -> dict[str, Any]:
        """The recorded fields, nested by their ``path``, in JSON types (tuples become lists).

        A field at None, and an on/off field at its default, are left out: an
        output written before such an option existed reads back the same.
        """
        found: dict[str, Any] = {}
        for spec in self.recorded(kind):
            value = getattr(self, spec.name)
            if value is None or (isinstance(spec.default, bool) and value == spec.default):
                continue
            *parents, key = _path(spec)
            node = found
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = _plain(value)
        return found

    @classmethod
    def from_dict(cls, recorded: Mapping[str, Any]) -> Any:
        """The options ``recorded`` holds (:meth:`to_dict`, or a whole provenance), the others at their defaults.

        """
        values = {}
        for spec in cls.recorded():
            node: Any = recorded
            for key in _path(spec):
                node = node.get(key) if isinstance(node, Mapping) else None
            if node is not None:
                values[spec.name] = node
        return cls(**values)

    def flags(self, kind: str | None = None) -> list[str]:
        """The command-line words that give the recorded fields set here (:meth:`to_dict`'s), in declaration order."""
        words: list[str] = []
        for spec in self.recorded(kind):
            value = getattr(self, spec.name)
            if value is None or value == spec.default:
                continue
            name = spec.name.replace("_", "-")
            if isinstance(spec.default, bool):
                words.append(f"--{name}" if value else f"--no-{name}")
            else:
                words += [f"--{name}", _flag_text(value)]
        return words


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class JobOptions(Options):
    """How a backward job computes. Every field has a default; see :func:`dconv.backward_job`.

    Build one with ``JobOptions(batch_chunk=256)`` or :meth:`build`; values are
    validated and normalised (``max_memory="512MiB"`` becomes bytes, ``stride=2``
    becomes ``(2, 2)``).
    """

    stride: Any = option(
        None,
        help="S or SH,SW (default: the input's hparameters, else 1)",
        parse=optional(lambda v: parse_pair("stride", v, minimum=1)),
        table="conv",
        toml=(int, list),
        cli=int_list,
        record="identity",
        path=("params", "stride"),
    )
    padding: Any = option(
        None,
        help="P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, same or valid (default: the input's hparameters, else 0)",
        parse=optional(lambda v: parse_padding(padding_from_flat(v))),
        table="conv",
        toml=(int, str, list),
        cli=padding_text,
        record="identity",
        path=("params", "padding"),
    )
    dilation: Any = option(
        None,
        help="D or DH,DW (default: the input's hparameters, else 1)",
        parse=optional(lambda v: parse_pair("dilation", v, minimum=1)),
        table="conv",
        toml=(int, list),
        cli=int_list,
        record="identity",
        path=("params", "dilation"),
    )
    batch_chunk: int | None = option(
        None,
        help="samples per task, used as given; dA_prev is chunked the same way (default: 256, or the most "
        "--max-memory allows; either rounded down to whole input chunks where one fits)",
        parse=optional(whole_number("batch_chunk", 1)),
        table="job",
        toml=(int,),
        cli=int,
        metavar="N",
        record="identity",
    )
    max_memory: int | None = option(
        None,
        help="memory one task may use, e.g. 512MiB or 2GB: picks the largest batch chunk that fits, "
        "or refuses a given one that does not",
        parse=optional(size_in_bytes("max_memory")),
        table="job",
        toml=(int, str),
        cli=str,
        metavar="SIZE",
    )
    split_every: int = option(
        8,
        help="fan-in of the dW/db tree reduction",
        parse=whole_number("split_every", 2),
        table="job",
        toml=(int,),
        cli=int,
        metavar="K",
        record="identity",
    )
    check_finite: bool = option(
        False,
        help="fail on NaN or Inf in the inputs (without it, a job whose dW or db is not finite ends with a warning)",
        parse=flag("check_finite"),
        table="job",
        toml=(bool,),
        record="carried",
    )
    simd: str | None = option(
        None,
        help=f"SIMD level of the compiled loops on every worker: auto, avx512, avx2, neon, baseline or numpy "
        f"(default: {SIMD_ENV_VAR}, else auto)",
        parse=optional(lambda v: parse_word(v, "simd")),
        table="job",
        toml=(str,),
        cli=str,
        metavar="LEVEL",
        record="carried",
        path=("simd", "requested"),
    )
    overwrite: bool = option(
        False,
        help="replace OUT if it is a dconv output (else refused)",
        parse=flag("overwrite"),
        table="output",
        toml=(bool,),
        excludes="resume",
    )
    resume: bool = option(
        False,
        help="continue an interrupted job in OUT",
        parse=flag("resume"),
        table="output",
        toml=(bool,),
        excludes="overwrite",
    )
    dA_prev: bool = option(
        True,
        help="skip the input gradient: write only dW and db (and the statistics with --stats); "
        "the job still reads A_prev and dZ, but skips half the kernel and the dA_prev writes",
        parse=flag("dA_prev"),
        table="job",
        toml=(bool,),
        record="identity",
    )
    stats: bool = option(
        False,
        help="also compute the per-sample gradient statistics: OUT/stats/ holds each sample's |g_i|^2, "
        "sum_i dW_i^2 and sum_i db_i^2, the provenance the gradient noise scale and the top samples",
        parse=flag("stats"),
        table="job",
        toml=(bool,),
        record="identity",
        path=("per_sample_stats",),  # the provenance's "stats" holds the figures
    )
    lease_timeout: float = option(
        60.0,
        help="seconds without a heartbeat after which another job takes over OUT's lease (the job that "
        "writes OUT renews it every quarter of this)",
        parse=positive_number("lease_timeout"),
        table="output",
        toml=(int, float),
        cli=float,
        metavar="SECONDS",
    )
    keep_partials: bool = option(
        False,
        help="keep every chunk's dW/db partial in OUT/_progress/tree after the job (for auditing; "
        "by default a complete output keeps only the sums)",
        parse=flag("keep_partials"),
        table="output",
        toml=(bool,),
        record="carried",
    )

    def check(self) -> None:
        if self.overwrite and self.resume:
            raise InputError("give overwrite=True or resume=True, not both.")

    def identity(self) -> dict[str, Any]:
        """The fields a resumed job must match, as its output records them (:meth:`to_dict`)."""
        return self.to_dict("identity")

    def resuming(self, stored: JobOptions, out: str) -> JobOptions:
        """These options, for a resume of the output ``out`` whose recorded options are ``stored``.

        Every recorded field left at its default takes the output's value, so
        ``resume=True`` alone continues the job as it was started.

        Raises
        ------
        InputError
            A field of the identity is given with another value than the
            output's; the message names each, and never advises starting again.
        """
        values, conflicts = {}, []
        for spec in self.recorded():
            given, recorded = getattr(self, spec.name), getattr(stored, spec.name)
            if given == spec.default:
                values[spec.name] = recorded
            elif spec.metadata["record"] == "identity" and given != recorded:
                conflicts.append(f"{spec.name}: {_plain(given)!r} here, {_plain(recorded)!r} in out")
        if conflicts:
            raise InputError(
                f"cannot resume {out!r} with other options than it was made with ({'; '.join(conflicts)}); "
                "leave them out to resume with the output's own, or write to another out."
            )
        return dataclasses.replace(self, **values)


# --------------------------------------------------------------------------- synthetic inputs


@dataclass(frozen=True)
class InputRecipe(Options):
    """What :func:`dconv.make_inputs` writes: a seeded, synthetic input group.

    ``A_prev`` (m, height, width, in_channels), ``dZ`` of the matching output
    shape, ``W`` (kernel..., in_channels, out_channels), ``b``, and the
    ``hparameters`` attribute with stride, padding and dilation.
    """

    m: int = option(
        None, help="batch size", parse=whole_number("m", 1), table="input.make", toml=(int,), cli=positive_int,
        required=True,
    )
    height: int = option(32, help="H", parse=whole_number("height", 1), table="input.make", toml=(int,), cli=positive_int)
    width: int = option(32, help="W", parse=whole_number("width", 1), table="input.make", toml=(int,), cli=positive_int)
    in_channels: int = option(
        16, help="C_prev", parse=whole_number("in_channels", 1), table="input.make", toml=(int,), cli=positive_int
    )
    out_channels: int = option(
        32, help="C", parse=whole_number("out_channels", 1), table="input.make", toml=(int,), cli=positive_int
    )
    kernel: Any = option(
        3,
        help="F or FH,FW",
        parse=lambda v: parse_pair("kernel", v, minimum=1),
        table="input.make",
        toml=(int, list),
        cli=int_list,
    )
    stride: Any = option(
        1, help="S or SH,SW", parse=lambda v: parse_pair("stride", v, minimum=1), table="input.make",
        toml=(int, list), cli=int_list,
    )
    padding: Any = option(
        1,
        help="P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, same or valid",
        parse=lambda v: parse_padding(padding_from_flat(v)),
        table="input.make",
        toml=(int, str, list),
        cli=padding_text,
    )
    dilation: Any = option(
        1, help="D or DH,DW", parse=lambda v: parse_pair("dilation", v, minimum=1), table="input.make",
        toml=(int, list), cli=int_list,
    )
    dtype: str = option(
        "float32",
        help="float32 or float64",
        parse=parse_float_dtype,
        table="input.make",
        toml=(str,),
        cli=str,
    )
    chunk: int = option(
        256, help="Zarr chunk along m", parse=whole_number("chunk", 1), table="input.make", toml=(int,), cli=positive_int
    )
    seed: int = option(0, help="random seed", parse=whole_number("seed", 0), table="input.make", toml=(int,), cli=int)
    shared: float = option(
        0.0,
        help="weight of a pattern every sample shares, added to its noise (0: independent samples, "
        "whose mean gradient is 0)",
        parse=non_negative("shared"),
        table="input.make",
        toml=(int, float),
        cli=float,
    )

    def describe(self) -> str:
        """``m=512, 32x32x16 -> 32, kernel 3, float32, chunks of 256, seed 0``."""
        kernel = self.kernel[0] if self.kernel[0] == self.kernel[1] else f"{self.kernel[0]}x{self.kernel[1]}"
        return (
            f"m={self.m}, {self.height}x{self.width}x{self.in_channels} -> {self.out_channels}, kernel {kernel}, "
            f"{self.dtype}, chunks of {self.chunk}, seed {self.seed}"
            + (f", shared {self.shared:g}" if self.shared else "")
        )

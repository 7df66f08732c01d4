"""Declaring option fields: the :class:`Options` base and :func:`option`, and the parsers the fields use.

:func:`option` declares a field once: its default, its ``parse`` function (which
normalises a value or raises :class:`~dconv.errors.InputError` naming the field),
its spec table and TOML types, its command-line flag and help, and whether an
output records it. :class:`Options` builds, validates and round-trips its
subclasses from those declarations (:mod:`dconv.options` declares the job's and
the recipe's fields; :mod:`dconv.cluster` the cluster's). The parsers come in two
kinds: the command line's text (:func:`int_list`, :func:`positive_int`, ...) and
values from Python or a spec (:func:`whole_number`, :func:`flag`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import fields
from typing import Any, Callable, Mapping

import numpy as np
from dask.utils import parse_bytes

from dconv.errors import InputError, SpecError

__all__ = [
    "Options",
    "option",
    "any_string",
    "flag",
    "int_list",
    "non_negative",
    "optional",
    "padding_text",
    "plain_value",
    "positive_float",
    "positive_int",
    "positive_number",
    "size_in_bytes",
    "suggest",
    "toml_type_name",
    "whole_number",
]


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


def choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}; got {value!r} instead.")
        return value

    return parse


def _path(spec: dataclasses.Field) -> tuple[str, ...]:
    return spec.metadata.get("path") or (spec.name,)


def plain_value(value: Any) -> Any:
    """``value`` in JSON types: tuples (pairs, pads) become lists, NumPy scalars Python ones."""
    if isinstance(value, (tuple, list)):
        return [plain_value(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _flag_text(value: Any) -> str:
    """A recorded value as its flag takes it: ``2``, a pair as ``2,1``, words as they are."""
    value = plain_value(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


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
            node[key] = plain_value(value)
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

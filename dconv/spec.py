"""Pipeline specs: TOML files loaded into frozen, validated dataclasses.

A spec is data, never code: it is parsed with :mod:`tomllib`, every key is
checked, and an unknown key is an error that suggests the closest known one.
Relative paths are relative to the directory dconv runs in. Example::

    [input]
    path = "data/sample.zarr"        # local path or fsspec URL

    [input.make]                     # optional: make a synthetic input if path is absent
    m = 512

    [output]
    path = "out/quickstart.zarr"
    overwrite = true

    [conv]                           # optional: else the input's hparameters attribute
    stride = 1
    padding = 1                      # int, [h, w], [top, bottom, left, right], "same", "valid"

    [job]
    batch_chunk = 64                 # or max_memory = "512MiB" to have it chosen
    split_every = 8

    [cluster]                        # optional: default is the embedded local cluster
    workers = 2                      # or: scheduler = "tcp://127.0.0.1:8786"

    [storage]                        # optional fsspec options, e.g. for s3://
    anon = false
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from dconv.errors import InputError

__all__ = [
    "PipelineSpec",
    "InputSpec",
    "MakeSpec",
    "OutputSpec",
    "ConvSpec",
    "JobSpec",
    "ClusterSpec",
    "load_spec",
    "parse_spec",
]

_INT = (int,)
_STR = (str,)
_BOOL = (bool,)
_PAIR = (int, list)
_PADDING = (int, str, list)


def _spec_field(types: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    return field(default=default, metadata={"types": types, "required": required})


@dataclass(frozen=True)
class MakeSpec:
    """``[input.make]``: the arguments of :func:`dconv.store.make_inputs`."""

    m: int = _spec_field(_INT, required=True)
    height: int = _spec_field(_INT, 32)
    width: int = _spec_field(_INT, 32)
    in_channels: int = _spec_field(_INT, 16)
    out_channels: int = _spec_field(_INT, 32)
    kernel: Any = _spec_field(_PAIR, 3)
    stride: Any = _spec_field(_PAIR, 1)
    padding: Any = _spec_field(_PADDING, 1)
    dilation: Any = _spec_field(_PAIR, 1)
    dtype: str = _spec_field(_STR, "float32")
    chunk: int = _spec_field(_INT, 256)
    seed: int = _spec_field(_INT, 0)


@dataclass(frozen=True)
class InputSpec:
    """``[input]``: where the input group is."""

    path: str = _spec_field(_STR, required=True)
    make: MakeSpec | None = _spec_field((dict,), None)


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: where the output group goes, and what to do if it exists."""

    path: str = _spec_field(_STR, required=True)
    overwrite: bool = _spec_field(_BOOL, False)
    resume: bool = _spec_field(_BOOL, False)


@dataclass(frozen=True)
class ConvSpec:
    """``[conv]``: hyperparameters; None falls back to the input's ``hparameters``."""

    stride: Any = _spec_field(_PAIR, None)
    padding: Any = _spec_field(_PADDING, None)
    dilation: Any = _spec_field(_PAIR, None)


@dataclass(frozen=True)
class JobSpec:
    """``[job]``: how the batch is cut and reduced."""

    batch_chunk: int | None = _spec_field(_INT, None)
    max_memory: int | str | None = _spec_field((int, str), None)
    split_every: int = _spec_field(_INT, 8)
    check_finite: bool = _spec_field(_BOOL, False)


@dataclass(frozen=True)
class ClusterSpec:
    """``[cluster]``: the embedded local cluster (``workers``) or an existing one (``scheduler``)."""

    workers: int | None = _spec_field(_INT, None)
    scheduler: str | None = _spec_field(_STR, None)
    tls_ca_file: str | None = _spec_field(_STR, None)
    tls_cert: str | None = _spec_field(_STR, None)
    tls_key: str | None = _spec_field(_STR, None)


@dataclass(frozen=True)
class PipelineSpec:
    """A whole spec file."""

    input: InputSpec = _spec_field((dict,), required=True)
    output: OutputSpec = _spec_field((dict,), required=True)
    conv: ConvSpec = _spec_field((dict,), ConvSpec())
    job: JobSpec = _spec_field((dict,), JobSpec())
    cluster: ClusterSpec = _spec_field((dict,), ClusterSpec())
    storage: dict = field(default_factory=dict, metadata={"types": (dict,), "required": False})


_TABLES = {
    "input": InputSpec,
    "input.make": MakeSpec,
    "output": OutputSpec,
    "conv": ConvSpec,
    "job": JobSpec,
    "cluster": ClusterSpec,
}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names[t] for t in types)


def _parse_table(cls: type, table: Any, where: str) -> Any:
    """Build ``cls`` from a TOML table, checking keys and value types."""
    if not isinstance(table, Mapping):
        raise InputError(f"[{where}] must be a table; got {table!r} instead.")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise InputError(
                f"unknown key {key!r} in [{where}]; known keys: {', '.join(known)}.{_suggest(key, list(known))}"
            )
        types = known[key].metadata["types"]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise InputError(f"{where}.{key} must be {_type_name(types)}; got {value!r} instead.")
        child = f"{where}.{key}"
        values[key] = _parse_table(_TABLES[child], value, child) if child in _TABLES else value
    missing = [name for name, f in known.items() if f.metadata["required"] and name not in values]
    if missing:
        raise InputError(f"[{where}] is missing {', '.join(repr(m) for m in missing)}.")
    return cls(**values)


def parse_spec(document: Mapping[str, Any]) -> PipelineSpec:
    """Validate a parsed TOML document into a :class:`PipelineSpec`."""
    known = [f.name for f in fields(PipelineSpec)]
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in known:
            raise InputError(f"unknown table [{key}] in spec; known tables: {', '.join(known)}.{_suggest(key, known)}")
        if key == "storage":
            if not isinstance(value, Mapping):
                raise InputError(f"[storage] must be a table of fsspec options; got {value!r} instead.")
            values[key] = dict(value)
        else:
            values[key] = _parse_table(_TABLES[key], value, key)
    missing = [name for name in ("input", "output") if name not in values]
    if missing:
        raise InputError(f"spec is missing the table(s) {', '.join(f'[{m}]' for m in missing)}.")
    return PipelineSpec(**values)


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file.

    Raises
    ------
    InputError
        The file is missing or unreadable, is not valid TOML, or has an unknown
        key, a missing key or a value of the wrong type.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read spec file {str(path)!r}: {e}") from e
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"spec file {str(path)!r} is not valid TOML: {e}") from e
    return parse_spec(document)

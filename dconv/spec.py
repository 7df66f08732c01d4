"""Pipeline specs: TOML files loaded into frozen, validated dataclasses.

A spec is data, never code: it is parsed with :mod:`tomllib`, every key is
checked, and an unknown key is an error that suggests the closest known one.
The keys of ``[conv]``, ``[job]``, ``[output]``, ``[input.make]`` and
``[cluster]`` are the fields of :class:`~dconv.options.JobOptions`,
:class:`~dconv.options.InputRecipe` and :class:`~dconv.cluster.ClusterOptions`
that declare that table, with their defaults and validation.
Relative paths (``[input] path``, ``[output] path``, ``[cluster] scheduler_file``)
are relative to the directory dconv runs in. Example::

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

    [job]                            # any JobOptions field of the job table
    batch_chunk = 64                 # or max_memory = "512MiB" to have it chosen
    split_every = 8

    [cluster]                        # optional: default is the embedded local cluster
    workers = 2                      # or: scheduler = "tcp://127.0.0.1:8786" (or "threads"),
                                     # or: scheduler_file = "scheduler.json",
                                     # with wait_workers = 4, wait_timeout = 300

    [storage]                        # optional fsspec options, e.g. for s3://
    anon = false
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dconv.cluster import ClusterOptions
from dconv.errors import InputError, SpecError
from dconv.option_fields import suggest
from dconv.options import InputRecipe, JobOptions
from dconv.store.locations import is_local

__all__ = ["PipelineSpec", "load_spec", "parse_spec"]

TABLES = ("input", "output", "conv", "job", "cluster", "storage")


@dataclass(frozen=True)
class PipelineSpec:
    """A whole spec file.

    Attributes
    ----------
    inputs : str
        ``[input] path``: the input group.
    make : InputRecipe or None
        ``[input.make]``: make a synthetic input at ``inputs`` first, if nothing is there.
    out : str
        ``[output] path``: the output group.
    options : JobOptions
        ``[conv]``, ``[job]`` and ``[output]``'s ``overwrite`` / ``resume``.
    cluster : ClusterOptions
        ``[cluster]``.
    storage : dict
        ``[storage]``: fsspec options for both stores.
    source : str or None
        The spec file it was read from.
    """

    inputs: str
    out: str
    make: InputRecipe | None = None
    options: JobOptions = field(default_factory=JobOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    storage: dict = field(default_factory=dict)
    source: str | None = None

    def check_input(self) -> None:
        """Refuse a local input path that does not exist and that the spec does not make,
        saying where it was looked for.

        Relative paths are relative to the directory dconv runs in, not to the spec
        file: the message names both, since a spec run from elsewhere is the usual cause.

        Raises
        ------
        InputError
        """
        if self.make is not None or not is_local(self.inputs) or Path(self.inputs).exists():
            return
        where = "the file system" if Path(self.inputs).is_absolute() else f"the directory dconv runs in, {Path.cwd()}"
        spec = f" of spec {self.source!r}" if self.source else ""
        folder = f" (the spec is in {Path(self.source).resolve().parent})" if self.source else ""
        raise SpecError(
            f"[input] path {self.inputs!r}{spec} does not exist: it was resolved against {where}{folder}; "
            "run dconv from the directory the path is relative to, or make the path absolute."
        )


def _table(document: Mapping[str, Any], name: str, what: str = "a table") -> Mapping[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, Mapping):
        raise SpecError(f"[{name}] must be {what}; got {table!r} instead.")
    return table


def _path(table: Mapping[str, Any], where: str) -> str:
    if "path" not in table:
        raise SpecError(f"[{where}] is missing 'path'.")
    if not isinstance(table["path"], str):
        raise SpecError(f"{where}.path must be a string; got {table['path']!r} instead.")
    return table["path"]


def _recipe(table: Any) -> InputRecipe:
    if not isinstance(table, Mapping):
        raise SpecError(f"[input.make] must be a table; got {table!r} instead.")
    values = InputRecipe.from_table(table, "input.make")
    if "m" not in values:
        raise SpecError("[input.make] is missing 'm'.")
    return InputRecipe(**values)


def parse_spec(document: Mapping[str, Any]) -> PipelineSpec:
    """Validate a parsed TOML document into a :class:`PipelineSpec`."""
    for key in document:
        if key not in TABLES:
            raise SpecError(f"unknown table [{key}] in spec; known tables: {', '.join(TABLES)}.{suggest(key, list(TABLES))}")
    missing = [name for name in ("input", "output") if name not in document]
    if missing:
        raise SpecError(f"spec is missing the table(s) {', '.join(f'[{m}]' for m in missing)}.")
    input_table, output_table = _table(document, "input"), _table(document, "output")
    unknown = [key for key in input_table if key not in ("path", "make")]
    if unknown:
        raise SpecError(
            f"unknown key {unknown[0]!r} in [input]; known keys: path, make.{suggest(unknown[0], ['path', 'make'])}"
        )
    option_values = {
        **JobOptions.from_table(_table(document, "conv"), "conv"),
        **JobOptions.from_table(_table(document, "job"), "job"),
        **JobOptions.from_table(output_table, "output", extra=("path",)),
    }
    try:
        return PipelineSpec(
            inputs=_path(input_table, "input"),
            out=_path(output_table, "output"),
            make=_recipe(input_table["make"]) if "make" in input_table else None,
            options=JobOptions(**option_values),
            cluster=ClusterOptions(**ClusterOptions.from_table(_table(document, "cluster"), "cluster")),
            storage=dict(_table(document, "storage", "a table of fsspec options")),
        )
    except SpecError:
        raise
    except InputError as e:  # a value the options objects refuse: still about the spec's keys
        raise SpecError(str(e)) from e


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
        raise SpecError(f"cannot read spec file {str(path)!r}: {e}") from e
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid TOML: {e}") from e
    return dataclasses.replace(parse_spec(document), source=str(path))

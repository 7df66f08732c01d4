"""What dconv may replace: its own input groups and outputs, and nothing else.

One rule for every writer (``make_inputs``, :class:`~dconv.store.writer.InputWriter`,
a backward job's output) when ``overwrite=True`` (``--overwrite``, a spec's
``[output] overwrite``): a store may be replaced only if

- nothing is there, or an empty directory; or
- it is a group dconv wrote, of the kind being written: its ``zarr.json``
  carries dconv's marker (``dconv_input`` for an input group, ``dconv`` for an
  output), and its top level holds nothing but names dconv writes there
  (:data:`INPUT_NAMES`, :data:`OUTPUT_NAMES`).

Anything else (a file, a directory with other content, a Zarr group dconv did
not write, a dconv group of the other kind) is refused with one
:class:`~dconv.errors.InputError`. An input group written before the marker is
recognised by what such a dconv wrote: a group whose only attribute is
``hparameters``, with nothing but ``A_prev``, ``dZ``, ``W`` and ``b`` at the top,
each an array with the dimension names dconv gave it then
(:data:`LEGACY_INPUT_DIMENSIONS`).

:func:`remove_own` then deletes only those names, ``zarr.json`` last (a
removal cut short leaves a group still recognised as dconv's), so a file
dropped in meanwhile survives.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Literal, Mapping

from dconv.errors import InputError
from dconv.store.layout import OUTPUT_LAYOUT, PROGRESS
from dconv.store.lease import LEASE_NAME
from dconv.store.locations import is_local, public_location

__all__ = [
    "INPUT_MARKER",
    "OUTPUT_MARKER",
    "MODEL_OUTPUT_MARKER",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "LEGACY_INPUT_DIMENSIONS",
    "check_replaceable",
    "is_vacant",
    "remove_own",
    "input_marker",
]

Kind = Literal["input", "output", "model_output"]

INPUT_MARKER = "dconv_input"
"""The group attribute that marks an input group dconv wrote: ``{"writer": ..., "version": ...}``."""

OUTPUT_MARKER = "dconv"
"""The group attribute of an output: its provenance and status (:data:`dconv.store.output.ATTR`)."""

MODEL_OUTPUT_MARKER = "dconv_model_output"
"""The group attribute of a model job's output (:mod:`dconv.store.model_output`): its provenance and status."""

METADATA = "zarr.json"

INPUT_NAMES = frozenset({METADATA, "A_prev", "dZ", "W", "b"})
"""Everything dconv writes at the top of an input group."""

OUTPUT_NAMES = frozenset(
    {METADATA, PROGRESS, LEASE_NAME, *(entry.name.split("/")[0] for entry in OUTPUT_LAYOUT if entry.has_array)}
)
"""Everything dconv writes at the top of an output: the layout's arrays and subgroups, ``_progress``, the lease."""

MODEL_OUTPUT_NAMES = frozenset({METADATA, LEASE_NAME, "layers", "stats"})
"""Everything dconv writes at the top of a model job's output; ``layers/`` holds one dconv output per layer."""

LEGACY_INPUT_DIMENSIONS = {
    "A_prev": ["m", "H", "W", "C_prev"],
    "dZ": ["m", "n_H", "n_W", "C"],
    "W": ["fh", "fw", "C_prev", "C"],
    "b": ["b_h", "b_w", "b_c", "C"],
}
"""The dimension names of input arrays written before the ``dconv_input`` marker."""

_NAMES = {"input": INPUT_NAMES, "output": OUTPUT_NAMES, "model_output": MODEL_OUTPUT_NAMES}
_WHAT = {"input": "a dconv input group", "output": "a dconv output", "model_output": "a dconv model output"}
_MARKERS = {"input": INPUT_MARKER, "output": OUTPUT_MARKER, "model_output": MODEL_OUTPUT_MARKER}
_LEASED = ("output", "model_output")


def input_marker(writer: str) -> dict[str, str]:
    """The ``dconv_input`` attribute: which writer (``"make_inputs"``, ``"InputWriter"``) and dconv version."""
    from dconv import __version__

    return {"writer": writer, "version": __version__}


def check_replaceable(
    url: str, storage_options: Mapping[str, Any] | None, kind: Kind, *, name: str | None = None
) -> None:
    """Refuse to replace ``url`` unless it is empty, absent, or a dconv group of ``kind`` and nothing more.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    kind : {"input", "output"}
        What is about to be written there.
    name : str, optional
        The argument's name, to start the message (``"out"``).

    Raises
    ------
    InputError
        One line naming the path and what was found there.
    """
    found = _foreign(url, storage_options, kind)
    if found is not None:
        label = f"{name} " if name else ""
        raise InputError(
            f"{label}{public_location(url)!r} exists and {found}; refusing to overwrite it. "
            "Choose another path or remove it yourself."
        )


def is_vacant(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    """True if nothing is at ``url`` but, at most, an empty directory and a job's lease files."""
    listing = _list_top(url, storage_options)
    return listing != "file" and all(_is_lease_file(name) for name in listing or ())


def _is_lease_file(name: str) -> bool:
    """The lease (:data:`~dconv.store.lease.LEASE_NAME`), or a lease file a renewal or takeover was cut short in."""
    return name == LEASE_NAME or name.startswith(LEASE_NAME + ".")


def remove_own(
    url: str, storage_options: Mapping[str, Any] | None, kind: Kind, *, keep: tuple[str, ...] = ()
) -> None:
    """Delete the names dconv writes at the top of a ``kind`` group at ``url``, ``zarr.json`` last.

    Anything else under ``url`` is left alone, and so are the names in ``keep``
    (the lease of the job that replaces an output). Call :func:`check_replaceable` first.
    """
    if kind == "model_output":  # each layer's output by the output rule, then the model's own names
        for layer in _layer_names(url, storage_options):
            remove_own(_join(url, f"layers/{layer}"), storage_options, "output")
    names = sorted(_NAMES[kind] - {METADATA, *keep}) + [METADATA]
    if kind in _LEASED:  # a lease file a killed renewal or takeover left behind
        names = [name for name in _list_top(url, storage_options) or () if _is_lease_file(name)
                 and name not in keep and name != LEASE_NAME] + names
    if is_local(str(url)):
        for entry in names:
            path = os.path.join(url, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    fs, root = _filesystem(url, storage_options)
    fs.invalidate_cache(root)
    present = set(_basenames(fs, root))
    for entry in names:
        if entry in present:
            fs.rm(f"{root}/{entry}", recursive=True)
    fs.invalidate_cache(root)


# --------------------------------------------------------------------------- what is there


def _foreign(url: str, storage_options: Mapping[str, Any] | None, kind: Kind) -> str | None:
    """None if ``url`` may be replaced by a ``kind`` group; else what is there, as words for the message."""
    listing = _list_top(url, storage_options)
    if listing == "file":
        return f"is a file, not {_WHAT[kind]}"
    if kind in _LEASED:  # a job's lease, and the files a killed renewal or takeover left, are dconv's
        listing = [name for name in listing or () if not _is_lease_file(name)]
    if not listing:
        return None
    metadata = _read_json(url, storage_options, METADATA) if METADATA in listing else None
    group = isinstance(metadata, Mapping) and metadata.get("node_type") == "group"
    found = _group_kind(url, storage_options, metadata, set(listing)) if group else None
    if found is not None and found != kind:
        return f"is {_WHAT[found]}, not {_WHAT[kind]}"
    strangers = sorted(set(listing) - _NAMES[kind])
    if strangers:
        shown = ", ".join(map(repr, strangers[:3])) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        return f"is not {_WHAT[kind]} (it holds {shown})"
    if not group:
        return f"is not {_WHAT[kind]} (it has no Zarr group metadata dconv can read)"
    if found is None:
        return f"is a Zarr group dconv did not write (it has no {_MARKERS[kind]!r} attribute), not {_WHAT[kind]}"
    if kind == "model_output":
        return _foreign_layers(url, storage_options)
    return None


def _join(url: str, name: str) -> str:
    return os.path.join(url, name) if is_local(str(url)) else f"{str(url).rstrip('/')}/{name}"


def _layer_names(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """The names in a model output's ``layers/`` directory (none if it has none)."""
    listing = _list_top(_join(url, "layers"), storage_options)
    return [] if listing == "file" or listing is None else sorted(listing)


def _foreign_layers(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """None if every entry of a model output's ``layers/`` is a dconv output and nothing more; else what is there."""
    if _list_top(_join(url, "layers"), storage_options) == "file":
        return "holds a file 'layers', not the layers of a dconv model output"
    for layer in _layer_names(url, storage_options):
        if layer == METADATA:
            continue
        found = _foreign(_join(url, f"layers/{layer}"), storage_options, "output")
        if found is not None:
            return f"holds layers/{layer}, which {found}"
    return None


def _group_kind(
    url: str, storage_options: Mapping[str, Any] | None, metadata: Mapping[str, Any], names: set[str]
) -> Kind | None:
    """Which of dconv's groups the group whose ``zarr.json`` is ``metadata`` is, if any."""
    attributes = metadata.get("attributes") or {}
    if isinstance(attributes.get(MODEL_OUTPUT_MARKER), Mapping):
        return "model_output"
    if isinstance(attributes.get(OUTPUT_MARKER), Mapping):
        return "output"
    if isinstance(attributes.get(INPUT_MARKER), Mapping):
        return "input"
    if set(attributes) == {"hparameters"} and names <= INPUT_NAMES and _legacy_arrays(url, storage_options, names):
        return "input"
    return None


def _legacy_arrays(url: str, storage_options: Mapping[str, Any] | None, names: set[str]) -> bool:
    """True if every member is an array with the dimension names dconv gave it before the marker."""
    for member in names - {METADATA}:
        metadata = _read_json(url, storage_options, f"{member}/{METADATA}")
        if not isinstance(metadata, Mapping) or metadata.get("node_type") != "array":
            return False
        if metadata.get("dimension_names") != LEGACY_INPUT_DIMENSIONS[member]:
            return False
    return True


def _list_top(url: str, storage_options: Mapping[str, Any] | None) -> list[str] | Literal["file"] | None:
    """The names at the top of ``url``; ``"file"`` for a file; None if nothing is there."""
    if is_local(str(url)):
        if os.path.isdir(url):
            return os.listdir(url)
        return "file" if os.path.lexists(url) else None
    fs, root = _filesystem(url, storage_options)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return None
    if fs.isfile(root):
        return "file"
    return _basenames(fs, root)


def _read_json(url: str, storage_options: Mapping[str, Any] | None, name: str) -> Any:
    """The JSON document ``url/name``; None if it is missing or does not parse."""
    try:
        if is_local(str(url)):
            with open(os.path.join(url, name), "rb") as file:
                return json.loads(file.read())
        fs, root = _filesystem(url, storage_options)
        return json.loads(fs.cat_file(f"{root}/{name}"))
    except (OSError, ValueError):
        return None


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs, path.rstrip("/")


def _basenames(fs: Any, root: str) -> list[str]:
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]

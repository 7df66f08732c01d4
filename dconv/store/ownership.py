"""What dconv may replace: its own input groups and outputs, and nothing else.

One rule for every writer (``make_inputs``, :class:`~dconv.store.writer.InputWriter`,
a backward job's output) when ``overwrite=True`` (``--overwrite``, a spec's
``[output] overwrite``): a store may be replaced only if

- nothing is there, or an empty directory; or
- it is a group dconv wrote, of the kind being written: its ``zarr.json``
  carries dconv's marker (``dconv_input`` for an input group, ``dconv_model``
  for a model input group, ``dconv`` for an output, ``dconv_score`` for a
  score output), and its top level holds nothing but names dconv writes there
  (:data:`INPUT_NAMES`, :data:`MODEL_NAMES`, :data:`OUTPUT_NAMES`, :data:`SCORE_NAMES`). A model input group's
  ``layers/`` may hold nothing but the layers its marker names, each an input
  group dconv may replace by the same rule.

Anything else (a file, a directory with other content, a Zarr group dconv did
not write, a dconv group of the other kind) is refused with one
:class:`~dconv.errors.InputError`. An input group written before the marker is
recognised by what such a dconv wrote: a group whose only attribute is
``hparameters``, with nothing but ``A_prev``, ``dZ``, ``W`` and ``b`` at the top,
each an array with the dimension names dconv gave it then
(:data:`LEGACY_INPUT_DIMENSIONS`).

:func:`remove_own` then deletes only those names, ``zarr.json`` last (a
removal cut short leaves a group still recognised as dconv's), so a file
dropped in meanwhile survives. A model input group's layers go first, each as
an input group, then ``layers/zarr.json`` and ``sample_index``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Literal, Mapping

from dconv.errors import InputError
from dconv.store.layout import OUTPUT_LAYOUT, PROGRESS
from dconv.store.lease import LEASE_NAME
from dconv.store.locations import child_url, is_local, public_location

__all__ = [
    "INPUT_MARKER",
    "MODEL_MARKER",
    "OUTPUT_MARKER",
    "MODEL_OUTPUT_MARKER",
    "SCORE_MARKER",
    "INPUT_NAMES",
    "MODEL_NAMES",
    "OUTPUT_NAMES",
    "MODEL_OUTPUT_NAMES",
    "SCORE_NAMES",
    "LEGACY_INPUT_DIMENSIONS",
    "check_replaceable",
    "is_vacant",
    "remove_own",
    "input_marker",
    "group_attributes",
]

Kind = Literal["input", "model", "output", "model_output", "queries", "score"]

INPUT_MARKER = "dconv_input"
"""The group attribute that marks an input group dconv wrote: ``{"writer": ..., "version": ...}``."""

MODEL_MARKER = "dconv_model"
"""The group attribute of a model input group (:mod:`dconv.store.model`): its writer, version and layers."""

OUTPUT_MARKER = "dconv"
"""The group attribute of an output: its provenance and status (:data:`dconv.store.output.ATTR`)."""

MODEL_OUTPUT_MARKER = "dconv_model_output"
"""The group attribute of a model job's output (:mod:`dconv.store.model_output`): its provenance and status."""

QUERIES_MARKER = "dconv_queries"
"""The group attribute of a query group (:mod:`dconv.store.queries`)."""

SCORE_MARKER = "dconv_score"
"""The group attribute of a score output (:mod:`dconv.store.score_output`): its provenance and status."""

METADATA = "zarr.json"

INPUT_NAMES = frozenset({METADATA, "A_prev", "dZ", "W", "b"})
"""Everything dconv writes at the top of an input group."""

MODEL_NAMES = frozenset({METADATA, "layers", "sample_index"})
"""Everything dconv writes at the top of a model input group (``layers/`` holds one input group per layer)."""

OUTPUT_NAMES = frozenset(
    {METADATA, PROGRESS, LEASE_NAME, *(entry.name.split("/")[0] for entry in OUTPUT_LAYOUT if entry.has_array)}
)
"""Everything dconv writes at the top of an output: the layout's arrays and subgroups, ``_progress``, the lease."""

MODEL_OUTPUT_NAMES = frozenset({METADATA, LEASE_NAME, "layers", "stats", "dots"})
"""Everything dconv writes at the top of a model job's output; ``layers/`` holds one dconv output per layer."""

QUERIES_NAMES = frozenset({METADATA, "dW", "db", "layers"})
"""Everything dconv writes at the top of a query group; ``layers/<name>/`` holds ``dW`` and ``db``."""

SCORE_NAMES = frozenset({METADATA, LEASE_NAME, PROGRESS, "top", "scores"})
"""Everything dconv writes at the top of a score output (``dconv score``)."""

LEGACY_INPUT_DIMENSIONS = {
    "A_prev": ["m", "H", "W", "C_prev"],
    "dZ": ["m", "n_H", "n_W", "C"],
    "W": ["fh", "fw", "C_prev", "C"],
    "b": ["b_h", "b_w", "b_c", "C"],
}
"""The dimension names of input arrays written before the ``dconv_input`` marker."""

_NAMES = {
    "input": INPUT_NAMES,
    "model": MODEL_NAMES,
    "output": OUTPUT_NAMES,
    "model_output": MODEL_OUTPUT_NAMES,
    "queries": QUERIES_NAMES,
    "score": SCORE_NAMES,
}
_WHAT = {
    "input": "a dconv input group",
    "model": "a dconv model input group",
    "output": "a dconv output",
    "model_output": "a dconv model output",
    "queries": "a dconv query group",
    "score": "a dconv score output",
}
_MARKERS = {
    "input": INPUT_MARKER,
    "model": MODEL_MARKER,
    "output": OUTPUT_MARKER,
    "model_output": MODEL_OUTPUT_MARKER,
    "queries": QUERIES_MARKER,
    "score": SCORE_MARKER,
}
_LEASED = ("output", "model_output", "score")
"""The kinds a job holds a lease on: its lease files are dconv's."""


def input_marker(writer: str) -> dict[str, str]:
    """The ``dconv_input`` attribute: which writer (``"make_inputs"``, ``"InputWriter"``) and dconv version."""
    from dconv import __version__

    return {"writer": writer, "version": __version__}


def group_attributes(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The attributes in the ``zarr.json`` of the Zarr v3 group at ``url``; None if there is none (or it is
    missing, unreadable, or an array's)."""
    metadata = _read_json(url, storage_options, METADATA)
    if not isinstance(metadata, Mapping) or metadata.get("node_type") != "group":
        return None
    attributes = metadata.get("attributes") or {}
    return dict(attributes) if isinstance(attributes, Mapping) else None


def check_replaceable(
    url: str, storage_options: Mapping[str, Any] | None, kind: Kind, *, name: str | None = None
) -> None:
    """Refuse to replace ``url`` unless it is empty, absent, or a dconv group of ``kind`` and nothing more.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    kind : {"input", "model", "output"}
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
    names = sorted(_NAMES[kind] - {METADATA, *keep}) + [METADATA]
    if kind == "model":  # layer by layer: a file put in layers/ meanwhile stays
        _remove_layers(url, storage_options)
        names.remove("layers")
    if kind == "model_output":  # each layer's output by the output rule
        _remove_output_layers(url, storage_options)
        names.remove("layers")
    if kind in _LEASED:  # a lease file a killed renewal or takeover left behind
        names = [name for name in _list_top(url, storage_options) or () if _is_lease_file(name)
                 and name not in keep and name != LEASE_NAME] + names
    _delete(url, storage_options, names)


def _remove_layers(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Delete the layers of the model input group at ``url`` (each as an input group), then ``layers/zarr.json``."""
    layers = child_url(url, "layers")
    if _list_top(layers, storage_options) in (None, "file"):
        return
    for name in _layer_names(_read_json(url, storage_options, METADATA)) or ():
        layer = child_url(layers, name)
        if _list_top(layer, storage_options) not in (None, "file"):
            remove_own(layer, storage_options, "input")
            _remove_empty_directory(layer)
    _delete(layers, storage_options, [METADATA])
    _remove_empty_directory(layers)


def _remove_output_layers(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Delete each layer output of the model output at ``url`` (by the output rule), then ``layers/zarr.json``."""
    layers = child_url(url, "layers")
    for name in _output_layer_names(url, storage_options):
        layer = child_url(layers, name)
        remove_own(layer, storage_options, "output")
        _remove_empty_directory(layer)
    _delete(layers, storage_options, [METADATA])
    _remove_empty_directory(layers)


def _delete(url: str, storage_options: Mapping[str, Any] | None, names: list[str]) -> None:
    """Delete each of ``names`` (a file or a whole directory) under ``url``, in order; missing ones are skipped."""
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


def _remove_empty_directory(url: str) -> None:
    """Remove the local directory ``url`` if it is empty (object stores have no empty directories)."""
    if is_local(str(url)):
        try:
            os.rmdir(url)
        except OSError:  # missing, or something else was put there: it stays
            pass


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
        return f"is not {_WHAT[kind]} (it holds {_shown(strangers)})"
    if not group:
        return f"is not {_WHAT[kind]} (it has no Zarr group metadata dconv can read)"
    if found is None:
        return f"is a Zarr group dconv did not write (it has no {_MARKERS[kind]!r} attribute), not {_WHAT[kind]}"
    if kind == "model":
        return _foreign_layers(url, storage_options, metadata)
    if kind == "model_output":
        return _foreign_output_layers(url, storage_options)
    if kind == "queries":
        return _foreign_query_layers(url, storage_options)
    return None


def _foreign_query_layers(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """None if each entry of a query group's ``layers/`` holds only ``dW``, ``db`` and ``zarr.json``."""
    layers = child_url(url, "layers")
    listing = _list_top(layers, storage_options)
    if listing == "file":
        return f"is not {_WHAT['queries']} (its 'layers' is a file)"
    for name in sorted(set(listing or ()) - {METADATA}):
        inside = _list_top(child_url(layers, name), storage_options)
        if inside == "file" or set(inside or ()) - {METADATA, "dW", "db"}:
            return f"is not {_WHAT['queries']} (its layers/{name} holds what dconv did not write)"
    return None


def _output_layer_names(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """The entries of a model output's ``layers/`` directory but its ``zarr.json`` (none if it has none)."""
    listing = _list_top(child_url(url, "layers"), storage_options)
    return [] if listing in (None, "file") else sorted(set(listing) - {METADATA})


def _foreign_output_layers(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """None if every entry of a model output's ``layers/`` is a dconv output and nothing more; else what is there."""
    if _list_top(child_url(url, "layers"), storage_options) == "file":
        return f"is not {_WHAT['model_output']} (its 'layers' is a file)"
    for name in _output_layer_names(url, storage_options):
        found = _foreign(child_url(child_url(url, "layers"), name), storage_options, "output")
        if found is not None:
            return f"holds layers/{name}, which {found}"
    return None


def _foreign_layers(url: str, storage_options: Mapping[str, Any] | None, metadata: Mapping[str, Any]) -> str | None:
    """None if the ``layers/`` of the model input group at ``url`` holds only input groups of the layers it names."""
    names = _layer_names(metadata)
    if names is None:
        return f"is {_WHAT['model']} whose {MODEL_MARKER!r} attribute dconv cannot read"
    layers = child_url(url, "layers")
    listing = _list_top(layers, storage_options)
    if listing == "file":
        return f"is not {_WHAT['model']} (its 'layers' is a file)"
    strangers = sorted(set(listing or ()) - {METADATA, *names})
    if strangers:
        return f"is not {_WHAT['model']} (its layers/ holds {_shown(strangers)}, which it does not name as layers)"
    for name in sorted(set(listing or ()) & set(names)):
        found = _foreign(child_url(layers, name), storage_options, "input")
        if found is not None:
            return f"is not {_WHAT['model']} (its layer {name!r} {found})"
    return None


def _layer_names(metadata: Any) -> list[str] | None:
    """The directory names under ``layers/`` that a model input group's ``zarr.json`` names; None if unreadable."""
    try:
        layers = metadata["attributes"][MODEL_MARKER]["layers"]
        paths = [layer["path"] for layer in layers]
    except (KeyError, TypeError):
        return None
    if not all(isinstance(path, str) and path.startswith("layers/") and path.count("/") == 1 for path in paths):
        return None
    names = [path.split("/", 1)[1] for path in paths]
    return names if all(name and not name.startswith(".") for name in names) else None


def _shown(names: list[str]) -> str:
    """Up to three of ``names``, quoted, and how many more."""
    return ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")



def _group_kind(
    url: str, storage_options: Mapping[str, Any] | None, metadata: Mapping[str, Any], names: set[str]
) -> Kind | None:
    """Which of dconv's groups the group whose ``zarr.json`` is ``metadata`` is, if any."""
    attributes = metadata.get("attributes") or {}
    if isinstance(attributes.get(SCORE_MARKER), Mapping):
        return "score"
    if isinstance(attributes.get(MODEL_OUTPUT_MARKER), Mapping):
        return "model_output"
    if isinstance(attributes.get(QUERIES_MARKER), Mapping):
        return "queries"
    if isinstance(attributes.get(OUTPUT_MARKER), Mapping):
        return "output"
    if isinstance(attributes.get(MODEL_MARKER), Mapping):
        return "model"
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

"""Where a store is: local paths and fsspec URLs, and the form of a location that is safe to print.

Every function takes a store as a local path or an fsspec URL plus
``storage_options``; the options are used to open the store and never written.
"""

from __future__ import annotations

import os
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import zarr

__all__ = [
    "public_location", "is_local", "is_memory", "absolute_location", "child_url", "open_group", "create_group",
    "store_exists",
]


def public_location(url: str) -> str:
    """``url`` without user info, query or fragment, safe to write into provenance or logs.

    Local paths become absolute, so a job is recognised from any directory.
    """
    if is_local(str(url)):
        return absolute_location(url)
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def is_local(url: str) -> bool:
    """True for a local path, False for an fsspec URL such as ``s3://bucket/x.zarr``."""
    scheme = urlsplit(str(url)).scheme
    return not scheme or len(scheme) == 1


def is_memory(url: str) -> bool:
    """True for a ``memory://`` URL (also inside a chained URL): a store that ends with its process."""
    return any(urlsplit(part).scheme == "memory" for part in str(url).split("::"))


def absolute_location(url: str | os.PathLike) -> str:
    """Local paths made absolute (workers may run in another directory); URLs unchanged."""
    return os.path.abspath(url) if is_local(str(url)) else str(url)


def child_url(url: str | os.PathLike, path: str) -> str:
    """The store at ``path`` (``"layers/conv1"``) inside the store at ``url``: a local path or an fsspec URL.

    A URL's query and fragment stay at its end (``s3://b/m.zarr?x`` -> ``s3://b/m.zarr/layers/conv1?x``).
    """
    url = str(url)
    if is_local(url):
        return os.path.join(url, *path.split("/"))
    head, sep, tail = url.rpartition("::")  # a chained URL: the path is the last link's
    parts = urlsplit(tail)
    tail = urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{path}"))
    return f"{head}{sep}{tail}"


def open_group(
    url: str, mode: str, storage_options: Mapping[str, Any] | None = None, *, zarr_format: int | None = 3,
    **kwargs: Any,
) -> zarr.Group:
    """Open the Zarr group at ``url`` (v3; ``zarr_format=None`` reads v2 too); fsspec options only for URLs
    that have a scheme."""
    if storage_options and not is_local(str(url)):
        kwargs["storage_options"] = dict(storage_options)
    return zarr.open_group(str(url), mode=mode, zarr_format=zarr_format, **kwargs)


def create_group(url: str, storage_options: Mapping[str, Any] | None, attributes: Mapping[str, Any]) -> zarr.Group:
    """A new Zarr v3 group at ``url`` with ``attributes``, in one write; nothing already there is deleted.

    Raises
    ------
    zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError
        A Zarr node is already there.
    """
    kwargs: dict[str, Any] = {}
    if storage_options and not is_local(str(url)):
        kwargs["storage_options"] = dict(storage_options)
    return zarr.create_group(str(url), overwrite=False, attributes=dict(attributes), zarr_format=3, **kwargs)


def store_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if anything (a Zarr node or any other file) is stored at ``url``."""
    import fsspec

    if is_local(str(url)):
        return os.path.exists(url)
    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs.exists(path)

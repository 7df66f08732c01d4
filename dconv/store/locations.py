"""Where a store is: local paths and fsspec URLs, and the form of a location that is safe to print.

Every function takes a store as a local path or an fsspec URL plus
``storage_options``; the options are used to open the store and never written.
"""

from __future__ import annotations

import os
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import zarr

__all__ = ["public_location", "is_local", "absolute_location", "open_group", "create_group", "store_exists"]


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


def absolute_location(url: str | os.PathLike) -> str:
    """Local paths made absolute (workers may run in another directory); URLs unchanged."""
    return os.path.abspath(url) if is_local(str(url)) else str(url)


def open_group(
    url: str, mode: str, storage_options: Mapping[str, Any] | None = None, **kwargs: Any
) -> zarr.Group:
    """Open the Zarr v3 group at ``url``; fsspec options only for URLs that have a scheme."""
    if storage_options and not is_local(str(url)):
        kwargs["storage_options"] = dict(storage_options)
    return zarr.open_group(str(url), mode=mode, zarr_format=3, **kwargs)


def create_group(url: str, storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> zarr.Group:
    """Create a Zarr v3 group at ``url`` without removing anything stored there (refused if a Zarr node is)."""
    if storage_options and not is_local(str(url)):
        kwargs["storage_options"] = dict(storage_options)
    return zarr.create_group(str(url), zarr_format=3, overwrite=False, **kwargs)


def store_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if anything (a Zarr node or any other file) is stored at ``url``."""
    import fsspec

    if is_local(str(url)):
        return os.path.exists(url)
    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs.exists(path)

"""Input groups: open and check them, read a batch of rows, write synthetic ones.

An **input** is a Zarr group (v3, or v2, read through zarr-python 3) with arrays ``A_prev`` (m, H, W, C_prev),
``dZ`` (m, n_H, n_W, C), ``W`` (fh, fw, C_prev, C), an optional ``b``, and an
optional ``hparameters`` attribute (the classic ``{"stride", "pad"}`` dict).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from dconv.errors import InputError
from dconv.options import InputRecipe
from dconv.params import ConvParams, check_float_dtype, output_shape
from dconv.store import fastread
from dconv.store.layout import DIMENSIONS
from dconv.store.locations import absolute_location, create_group, open_group, public_location, store_exists
from dconv.store.ownership import INPUT_MARKER, check_replaceable, input_marker, remove_own

__all__ = ["INPUT_ARRAYS", "InputGroup", "JobInputs", "job_inputs", "open_inputs", "read_batch", "make_inputs", "compressor"]

INPUT_ARRAYS = ("A_prev", "dZ", "W")


def compressor(dtype: np.dtype) -> BloscCodec:
    """The codec of the arrays ``make_inputs`` writes: Blosc LZ4 with byte shuffle.

    Outputs are not compressed (see docs/DESIGN.md, "Where data lands").
    """
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputGroup:
    """The arrays of an input group, opened lazily (no chunk has been read).

    Attributes
    ----------
    A_prev, dZ, W : zarr.Array
    b : zarr.Array or None
    hparameters : dict or None
        The group's ``hparameters`` attribute, if any.
    location : str
        Where it came from, without credentials.
    """

    A_prev: zarr.Array
    dZ: zarr.Array
    W: zarr.Array
    b: zarr.Array | None
    hparameters: dict | None
    location: str


def open_inputs(url: str, storage_options: Mapping[str, Any] | None = None) -> InputGroup:
    """Open and check an input group: arrays present, 4-D, float32/float64.

    Raises
    ------
    InputError
        The store is missing, is not a Zarr v3 group, has corrupt metadata, or
        an array is missing or has the wrong rank.
    InputDtypeError
        An array is not float32 or float64.
    """
    url, location = absolute_location(url), public_location(url)
    try:
        group = open_group(url, "r", storage_options, zarr_format=None)  # v2 groups are read too
    except FileNotFoundError as e:
        raise InputError(f"input store {location!r} does not exist or is not a Zarr group.") from e
    except (zarr.errors.ContainsArrayError,) as e:
        raise InputError(f"input store {location!r} is a Zarr array, not a group.") from e
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"input store {location!r} has corrupt Zarr metadata: {e}") from e
    arrays = {}
    for name in (*INPUT_ARRAYS, "b"):
        node = _open_node(group, name, location)
        if node is None:
            if name == "b":
                continue
            raise InputError(
                f"input store {location!r} has no array {name!r}; expected arrays "
                f"{', '.join(INPUT_ARRAYS)} (and optionally b), found {sorted(group.array_keys())}."
            )
        if not isinstance(node, zarr.Array):
            raise InputError(f"{name!r} in {location!r} must be an array; got a group instead.")
        if name in INPUT_ARRAYS and node.ndim != 4:
            raise InputError(f"{name} must be 4-D; got shape {node.shape} ({node.ndim}-D) in {location!r} instead.")
        check_float_dtype(name, _numpy_dtype(name, node))
        arrays[name] = node
    hparameters = group.attrs.get("hparameters")
    return InputGroup(
        A_prev=arrays["A_prev"],
        dZ=arrays["dZ"],
        W=arrays["W"],
        b=arrays.get("b"),
        hparameters=dict(hparameters) if isinstance(hparameters, Mapping) else None,
        location=location,
    )


@dataclass(frozen=True)
class JobInputs:
    """The arrays a job reads, from a Zarr group or from memory.

    Attributes
    ----------
    arrays : dict
        ``A_prev``, ``dZ`` and ``W``: zarr, NumPy or Dask arrays, float32 or float64.
    hparameters : dict or None
        The input group's ``hparameters`` attribute, if any.
    location : str
        Where they came from, without credentials (``"<in-memory arrays>"`` for arrays).
    zarr_location : str or None
        The input group's location; None for in-memory arrays.
    chunk_along_m : int or None
        The larger Zarr chunk along m of ``A_prev`` and ``dZ`` (None if neither is a Zarr array).
    """

    arrays: dict[str, Any]
    hparameters: dict | None
    location: str
    zarr_location: str | None
    chunk_along_m: int | None


def job_inputs(inputs: Any, storage_options: Mapping[str, Any] | None = None) -> JobInputs:
    """The arrays of a job's ``inputs``: a Zarr group path or URL, an :class:`InputGroup`, or a mapping of arrays.

    Raises
    ------
    InputError
        ``inputs`` is none of those, or lacks an array; an array is not 4-D float data.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = open_inputs(str(inputs), storage_options)
    if isinstance(inputs, InputGroup):
        arrays = {name: getattr(inputs, name) for name in INPUT_ARRAYS}
        return JobInputs(arrays, inputs.hparameters, inputs.location, inputs.location, _chunk_along_m(arrays))
    if not isinstance(inputs, Mapping):
        raise InputError(
            f"inputs must be a Zarr group path/URL or a mapping of arrays; got {type(inputs).__name__} instead."
        )
    missing = [name for name in INPUT_ARRAYS if name not in inputs]
    if missing:
        raise InputError(f"inputs must hold arrays A_prev, dZ and W; missing {', '.join(missing)}.")
    arrays = {}
    for name in INPUT_ARRAYS:
        array = inputs[name]
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            array = np.asarray(array)
        check_float_dtype(name, array.dtype)
        arrays[name] = array
    return JobInputs(arrays, None, "<in-memory arrays>", None, _chunk_along_m(arrays))


def _chunk_along_m(arrays: Mapping[str, Any]) -> int | None:
    """The larger Zarr chunk along m of ``A_prev`` and ``dZ`` (None if neither is a Zarr array)."""
    chunks = [arrays[name].chunks[0] for name in ("A_prev", "dZ") if isinstance(arrays[name], zarr.Array)]
    return max(chunks) if chunks else None


def _open_node(group: zarr.Group, name: str, location: str) -> zarr.Array | zarr.Group | None:
    """``group[name]``, None if there is no such node, InputError if its metadata is corrupt.

    ``Group.get`` hides a node whose ``zarr.json`` does not parse (with a
    warning), so a missing node is told from a broken one by opening it directly.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node = group.get(name)
            if node is not None:
                return node
            path = f"{group.path}/{name}".lstrip("/")
            return zarr.open(store=group.store, path=path, mode="r", zarr_format=group.metadata.zarr_format)
    except FileNotFoundError:
        return None
    except Exception as e:  # JSON, Unicode and Zarr metadata errors share no base class
        raise InputError(f"input array {name!r} in {location!r} has corrupt Zarr metadata: {e}") from e


def _numpy_dtype(name: str, array: zarr.Array) -> np.dtype:
    try:
        return np.dtype(array.dtype)
    except TypeError as e:  # zarr string/struct dtypes with no NumPy equivalent
        raise InputError(f"{name} has dtype {array.dtype}; expected float32 or float64.") from e


def read_batch(array: zarr.Array, name: str, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` along the first axis; a corrupt chunk is named in the error.

    Zarr reads a missing chunk as the fill value, so a worker that cannot see a
    local input store would silently read zeros: that is checked first.

    Raises
    ------
    InputError
        The store is not visible here, or a chunk cannot be decoded; the
        message names the array and the chunk.
    """
    root = getattr(array.store, "root", None)
    metadata = "zarr.json" if array.metadata.zarr_format == 3 else ".zarray"
    if root is not None and not os.path.exists(os.path.join(str(root), array.path, metadata)):
        raise InputError(
            f"this worker cannot see input array {name} at {os.path.join(str(root), array.path)!r}; "
            "local paths must be on storage every worker shares."
        )
    try:
        rows = fastread.read_rows(array, start, stop)
        return rows if rows is not None else np.asarray(array[start:stop])
    except Exception as e:  # codec errors have no common base class
        chunk = _first_bad_chunk(array, start, stop)
        raise InputError(
            f"{name} chunk {chunk} (along the first axis, samples {chunk * array.chunks[0]}.."
            f"{min((chunk + 1) * array.chunks[0], array.shape[0]) - 1}) is corrupt or truncated: {type(e).__name__}: {e}"
        ) from e


def read_whole(name: str, array: Any) -> np.ndarray:
    """A small array (``W``) read in full; a corrupt Zarr chunk is named in the error."""
    if isinstance(array, zarr.Array):
        return read_batch(array, name, 0, array.shape[0])
    return np.asarray(array)


def _first_bad_chunk(array: zarr.Array, start: int, stop: int) -> int:
    """The index along the first axis of the first chunk in ``start:stop`` that fails to decode."""
    size = array.chunks[0]
    for chunk in range(start // size, (stop - 1) // size + 1):
        try:
            array[chunk * size : min((chunk + 1) * size, array.shape[0])]
        except Exception:
            return chunk
    return start // size


def make_inputs(
    url: str,
    recipe: InputRecipe | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> str:
    """Write a synthetic, seeded input group and return its URL.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the group.
    recipe : InputRecipe, optional
        What to write; ``values`` (any :class:`~dconv.options.InputRecipe`
        field: ``m``, ``height``, ``width``, ``in_channels``, ``out_channels``,
        ``kernel``, ``stride``, ``padding``, ``dilation``, ``dtype``, ``chunk``,
        ``seed``) replace its fields. ``m`` has no default.
    overwrite : bool
        Replace an input group dconv wrote at ``url``; anything else there is
        refused (:mod:`dconv.store.ownership`).

    Writes ``A_prev`` (m, height, width, in_channels), ``dZ`` of the matching
    output shape, ``W`` (kernel..., in_channels, out_channels), ``b`` and the
    ``hparameters`` attribute with the given stride, padding and dilation, with
    the ``dconv_input`` marker attribute. Data is generated ``chunk`` samples
    at a time, so ``m`` may exceed memory.

    Every value is standard normal noise, plus, with ``shared`` > 0, ``shared``
    times a pattern all samples share (one per array): the samples' gradients
    then have a common mean, as those of a real batch do, and the gradient
    noise scale (``--stats``) is finite.
    """
    recipe = InputRecipe.build(recipe, **values)
    m, chunk, dtype = recipe.m, recipe.chunk, np.dtype(recipe.dtype)
    params = ConvParams.parse(recipe.stride, recipe.padding, recipe.dilation)
    a_shape = (m, recipe.height, recipe.width, recipe.in_channels)
    w_shape = (*recipe.kernel, recipe.in_channels, recipe.out_channels)
    z_shape = output_shape(a_shape, w_shape, params)
    rng = np.random.default_rng(recipe.seed)
    group = create_input_group(
        url, overwrite, storage_options, writer="make_inputs", attributes={"hparameters": params.to_hparameters()}
    )
    shapes = {"A_prev": a_shape, "dZ": z_shape, "W": w_shape, "b": (1, 1, 1, recipe.out_channels)}
    arrays = {
        name: group.create_array(
            name,
            shape=shape,
            chunks=(min(chunk, m), *shape[1:]) if name in ("A_prev", "dZ") else shape,
            dtype=dtype,
            compressors=compressor(dtype),
            dimension_names=DIMENSIONS[name],
        )
        for name, shape in shapes.items()
    }
    fan_in = np.prod(w_shape[:3])
    arrays["W"][...] = (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(dtype)
    arrays["b"][...] = rng.standard_normal(shapes["b"]).astype(dtype)
    # the part every sample shares (a mean gradient), from a stream of its own: shared = 0 leaves the data as it was
    common = np.random.default_rng([recipe.seed, 1])
    a_common = recipe.shared * common.standard_normal(a_shape[1:]) if recipe.shared else 0.0
    z_common = recipe.shared * common.standard_normal(z_shape[1:]) if recipe.shared else 0.0
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        arrays["A_prev"][start:stop] = (rng.standard_normal((stop - start, *a_shape[1:])) + a_common).astype(dtype)
        arrays["dZ"][start:stop] = (rng.standard_normal((stop - start, *z_shape[1:])) + z_common).astype(dtype)
    return url


def check_input_target(url: str, overwrite: bool, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse to write an input group at ``url`` over anything, or, with ``overwrite``, over anything but
    an input group dconv wrote (:func:`dconv.store.ownership.check_replaceable`). Writes nothing.

    Raises
    ------
    InputError
    """
    if overwrite:
        check_replaceable(url, storage_options, "input")
    elif store_exists(url, storage_options):
        raise InputError(f"{public_location(url)!r} already exists; pass overwrite=True to replace it.")


def create_input_group(
    url: str, overwrite: bool, storage_options: Mapping[str, Any] | None, *, writer: str, attributes: Mapping[str, Any]
) -> zarr.Group:
    """A new input group at ``url`` whose ``zarr.json`` holds ``attributes`` and the input marker of ``writer``.

    :func:`check_input_target` first; with ``overwrite``, only then are the names
    of the dconv input group there removed (anything else is never deleted).
    The group and its attributes are one write.
    """
    check_input_target(url, overwrite, storage_options)
    if overwrite:
        remove_own(url, storage_options, "input")
    return create_group(url, storage_options, attributes={**attributes, INPUT_MARKER: input_marker(writer)})

"""Input groups: open and check them, read a batch of rows, write synthetic ones.

An **input** is a Zarr group (v3, or v2, read through zarr-python 3) with arrays ``A_prev`` (m, H, W, C_prev),
``dZ`` (m, n_H, n_W, C), ``W`` (fh, fw, C_prev, C), an optional ``b``, and an
optional ``hparameters`` attribute (the classic ``{"stride", "pad"}`` dict).
"""

from __future__ import annotations

import json
import math
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

__all__ = [
    "INPUT_ARRAYS",
    "InputGroup",
    "JobInputs",
    "job_inputs",
    "open_inputs",
    "read_batch",
    "read_memory",
    "read_whole",
    "recipe_metadata",
    "recipe_shapes",
    "make_inputs",
    "compressor",
]

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
        The store is missing, is not a Zarr group (v3, or v2), has corrupt metadata, or
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
    bias : bool
        The layer has a bias: a group with ``b``, or a mapping without ``"b": None``. Without one,
        a sample's gradient ``g_i`` is ``dW_i`` alone (the statistics leave ``db_i`` out; ``db`` is still written).
    """

    arrays: dict[str, Any]
    hparameters: dict | None
    location: str
    zarr_location: str | None
    bias: bool = True


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
        return JobInputs(arrays, inputs.hparameters, inputs.location, inputs.location, bias=inputs.b is not None)
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
    return JobInputs(arrays, None, "<in-memory arrays>", None, bias=not ("b" in inputs and inputs["b"] is None))


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


def read_memory(
    batch: int, m: int, chunk: int, sample_bytes: int, fast_reader: bool | None = None, *, fetched: bool = False
) -> int:
    """Bytes a task of ``batch`` samples holds, besides its block, while it reads one Zarr input array.

    Tasks read samples ``[i*batch, (i+1)*batch)``; ``chunk`` is the array's
    chunk along m (a sharded array's inner chunk).

    zarr's public read (``DCONV_FAST_READ=0``, or a layout dconv's fast reader
    does not decode) holds, for every chunk the read touches (up to zarr's
    ``async.concurrency`` at once, 10 by default), the chunk's encoded bytes
    and the decoded chunk before it copies the rows it needs: up to
    ``2 * chunk * sample_bytes`` per chunk (Blosc never grows data by more than
    16 bytes, zstd by 0.4 %, and random floats shrink only 6 %). The worst task
    touches ``ceil((chunk - g + batch) / chunk)`` chunks, ``g = gcd(batch, chunk)``:
    one when ``batch`` divides ``chunk``, else up to ``ceil(batch / chunk) + 1``.

    The fast reader decodes each chunk the read covers whole straight into the
    block, and a chunk it cuts (the task's bounds, or the array's end inside the
    last chunk, ``m % chunk``) into one scratch chunk, reused:
    ``chunk * sample_bytes``. It holds no encoded bytes of local files (mapped:
    the page cache, which the RSS counts while a mapping is read, not the heap)
    or of zarr's MemoryStore (the store's own buffers); from other stores
    (``fetched``) it holds up to ``async.concurrency`` encoded chunks at once.
    A read that cuts a chunk counts zarr's term, which is larger. Not counted:
    gzip's pieces (256 KiB) and a shard's index (16 bytes per inner chunk); a
    zstd chunk in several frames, or whose frame does not state its size (not
    what numcodecs, hence zarr-python, writes), holds one more decoded chunk.

    The bound against measured peaks: ``benchmarks/README.md``.

    Parameters
    ----------
    batch : int
        Samples per task.
    m : int
        Samples in the array.
    chunk : int
        The array's Zarr chunk along m.
    sample_bytes : int
        Bytes of one sample as stored.
    fast_reader : bool, optional
        Whether the fast reader reads the array; default: unless
        ``DCONV_FAST_READ=0`` (then every read goes through zarr).
    fetched : bool
        The fast reader fetches the chunks from a store other than local files
        or zarr's MemoryStore.
    """
    if fast_reader is None:
        fast_reader = os.environ.get(fastread.FAST_READ_ENV, "").strip() != "0"
    whole = batch % chunk == 0 or batch >= m
    touched = -(-min(batch, m) // chunk) if whole else -(-(chunk - math.gcd(batch, chunk) + batch) // chunk)
    in_flight = min(touched, -(-m // chunk), int(zarr.config.get("async.concurrency") or touched))
    if whole and fast_reader:
        scratch = chunk * sample_bytes if m % chunk else 0
        return scratch + (in_flight * chunk * sample_bytes if fetched else 0)
    return in_flight * 2 * chunk * sample_bytes


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


def recipe_shapes(recipe: InputRecipe) -> tuple[ConvParams, dict[str, tuple[int, ...]]]:
    """The convolution of ``recipe`` and the shapes of the arrays it writes: ``A_prev`` (m, height,
    width, in_channels), ``dZ`` (m, n_H, n_W, out_channels), ``W`` (kernel..., in_channels,
    out_channels) and ``b`` (1, 1, 1, out_channels)."""
    params = ConvParams.parse(recipe.stride, recipe.padding, recipe.dilation)
    a_shape = (recipe.m, recipe.height, recipe.width, recipe.in_channels)
    w_shape = (*recipe.kernel, recipe.in_channels, recipe.out_channels)
    z_shape = output_shape(a_shape, w_shape, params)
    return params, {"A_prev": a_shape, "dZ": z_shape, "W": w_shape, "b": (1, 1, 1, recipe.out_channels)}


def _input_chunks(name: str, shape: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    """An input array's Zarr chunks: ``chunk`` samples along m for ``A_prev`` and ``dZ``, whole for ``W`` and ``b``."""
    return (min(chunk, shape[0]), *shape[1:]) if name in ("A_prev", "dZ") else shape


def recipe_metadata(recipe: InputRecipe, location: str) -> InputGroup:
    """The input group :func:`make_inputs` would write for ``recipe`` at ``location``, as Zarr metadata in memory.

    ``A_prev``, ``dZ`` and ``W`` are arrays of a :class:`zarr.storage.MemoryStore`
    with the shapes, dtype, chunks, codecs and dimension names ``make_inputs``
    gives them, and no data; ``hparameters`` is the recipe's. Nothing is written
    at ``location``, which only names the group.
    """
    params, shapes = recipe_shapes(recipe)
    dtype = np.dtype(recipe.dtype)
    store = zarr.storage.MemoryStore()
    arrays = {
        name: zarr.create_array(
            store,
            name=name,
            shape=shape,
            chunks=_input_chunks(name, shape, recipe.chunk),
            dtype=dtype,
            compressors=compressor(dtype),
            dimension_names=DIMENSIONS[name],
        )
        for name, shape in shapes.items()
        if name != "b"
    }
    return InputGroup(**arrays, b=None, hparameters=params.to_hparameters(), location=public_location(location))


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
    params, shapes = recipe_shapes(recipe)
    a_shape, z_shape, w_shape = shapes["A_prev"], shapes["dZ"], shapes["W"]
    rng = np.random.default_rng(recipe.seed)
    group = create_input_group(
        url, overwrite, storage_options, writer="make_inputs", attributes={"hparameters": params.to_hparameters()}
    )
    arrays = {
        name: group.create_array(
            name,
            shape=shape,
            chunks=_input_chunks(name, shape, chunk),
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

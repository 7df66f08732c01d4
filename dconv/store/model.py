"""Model input groups: one dconv input group per layer of a network, written and read together.

The format (the whole-network job reads it exactly so)::

    MODEL/                  Zarr group; attrs["dconv_model"] = {
                              "writer": "ModelWriter" | "capture", "version": dconv.__version__,
                              "layers": [{"name": "conv1", "kind": "conv2d" | "linear",
                                          "path": "layers/conv1"}, ...],   # in model order
                              "sample_index": "appended" | "given"}
    MODEL/layers/<name>/    a complete input group, as InputWriter writes it (A_prev, dZ, W, b, hparameters)
    MODEL/sample_index      int64 (m,), only when "given": the caller's index of each sample, in row order

Row ``i`` of every layer's ``A_prev`` and ``dZ`` is the same sample. A linear
layer is a 1x1 convolution: ``nn.Linear(in, out)`` applied to (m, ..., in) is
``A_prev`` (m, 1, L, in), ``dZ`` (m, 1, L, out) and ``W`` (1, 1, in, out), with
``L`` the product of the dimensions between m and the features (1 for (m, in)).

:class:`ModelWriter` composes one :class:`~dconv.store.writer.InputWriter` per
layer; :func:`open_model_inputs` opens and checks a group; :func:`is_model_group`
tells one from anything else by its ``zarr.json`` alone. NumPy and Zarr only:
:mod:`dconv.capture` fills a ModelWriter from a PyTorch model.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.params import ConvParams
from dconv.store.inputs import InputGroup, open_inputs
from dconv.store.locations import absolute_location, child_url, create_group, open_group, public_location, store_exists
from dconv.store.ownership import (
    INPUT_MARKER,
    MODEL_MARKER,
    check_replaceable,
    group_attributes,
    remove_own,
)
from dconv.store.writer import (
    InputWriter,
    check_batch,
    default_chunk,
    parse_bias,
    parse_weights,
    sample_bytes,
    sample_layout,
)

__all__ = [
    "KINDS",
    "LayerSpec",
    "ModelInputs",
    "ModelLayer",
    "ModelWriter",
    "check_layer_names",
    "check_model_target",
    "is_model_group",
    "open_model_inputs",
    "parse_index",
]

LayerKind = Literal["conv2d", "linear"]
KINDS: tuple[str, ...] = ("conv2d", "linear")
WRITERS = ("ModelWriter", "capture")
SAMPLE_INDEX = "sample_index"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_RESERVED = "zarr.json"  # layers/zarr.json is the metadata of the layers/ group


# --------------------------------------------------------------------------- layers


def check_layer_names(names: Iterable[Any]) -> tuple[str, ...]:
    """``names`` as a tuple, if each is a valid layer name and no two are the same (ignoring case).

    A valid name is non-empty, made of letters, digits, ``_``, ``.`` and ``-``, does not
    start with ``.`` and is not ``zarr.json``: PyTorch's module names (``layer1.0.conv1``)
    are. Names equal but for case are refused too: they are one directory on macOS.

    Raises
    ------
    InputError
        An empty list, or the first name that is invalid or repeated.
    """
    names = tuple(names)
    if not names:
        raise InputError("layers must name at least one layer; got none.")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith(".") or name == _RESERVED:
            raise InputError(
                "layer names must be non-empty, of letters, digits, '_', '.' and '-', not start with '.' "
                f"and not be 'zarr.json'; got {name!r} instead."
            )
        if name.lower() in seen:
            raise InputError(f"layer names must be unique (ignoring case); got {seen[name.lower()]!r} and {name!r}.")
        seen[name.lower()] = name
    return names


@dataclass(frozen=True, eq=False, repr=False)
class LayerSpec:
    """One layer of a :class:`ModelWriter`: its kind, weights and hyperparameters.

    Parameters
    ----------
    kind : {"conv2d", "linear"}
    W : array, shape (fh, fw, C_prev, C)
        The weights, HWIO, float32 or float64; (1, 1, in, out) for a linear layer
        (:meth:`linear` takes them as (in, out)). Stored as a contiguous copy.
    b : array, shape (C,) or (1, 1, 1, C), optional
        The bias, stored as (1, 1, 1, C).
    stride, padding, dilation
        As for :func:`dconv.conv2d_backward`; 1, 0 and 1 for a linear layer.

    Raises
    ------
    InputError
        An unknown kind; ``W`` or ``b`` of the wrong shape; an invalid
        hyperparameter; a linear layer with a kernel larger than 1x1 or a
        stride, padding or dilation other than 1, 0 and 1.
    InputDtypeError
        ``W`` or ``b`` is not float32 or float64.
    """

    kind: LayerKind
    W: np.ndarray
    b: np.ndarray | None = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    params: ConvParams = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {self.kind!r} instead.")
        W = parse_weights(self.W)
        params = ConvParams.parse(self.stride, self.padding, self.dilation)
        if self.kind == "linear" and W.shape[:2] != (1, 1):
            raise InputError(f"W of a linear layer must have shape (1, 1, in, out); got {W.shape} instead.")
        if self.kind == "linear" and params != ConvParams.parse():
            raise InputError(f"a linear layer has stride 1, padding 0 and dilation 1; got {params.describe()} instead.")
        object.__setattr__(self, "W", W)
        object.__setattr__(self, "b", parse_bias(self.b, W.shape[3]))
        object.__setattr__(self, "params", params)

    @classmethod
    def conv2d(cls, W: Any, b: Any = None, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> LayerSpec:
        """A convolution with HWIO weights ``W`` (fh, fw, C_prev, C)."""
        return cls("conv2d", W, b, stride, padding, dilation)

    @classmethod
    def linear(cls, W: Any, b: Any = None) -> LayerSpec:
        """A linear layer ``y = x @ W + b`` with ``W`` (in, out): ``nn.Linear.weight`` (out, in) transposed."""
        W = np.asarray(W)
        if W.ndim != 2:
            raise InputError(f"W of a linear layer must be 2-D (in, out); got shape {W.shape} instead.")
        return cls("linear", W.reshape(1, 1, *W.shape), b)

    def rows(self, A_prev: Any, dZ: Any) -> tuple[Any, Any]:
        """One batch of this layer as (A_prev, dZ) in the 4-D NHWC form of its input group.

        A convolution's arrays are returned as they are. A linear layer's
        (m, ..., in) and (m, ..., out) become (m, 1, L, in) and (m, 1, L, out),
        ``L`` the product of the dimensions between m and the features.

        Raises
        ------
        InputError
            A linear layer's array has fewer than 2 dimensions, or ``dZ``'s
            leading dimensions are not ``A_prev``'s.
        """
        if self.kind != "linear":
            return A_prev, dZ
        A_prev, dZ = np.asarray(A_prev), np.asarray(dZ)
        for name, array in (("A_prev", A_prev), ("dZ", dZ)):
            if array.ndim < 2:
                raise InputError(
                    f"{name} of a linear layer must have shape (m, ..., features); got shape {array.shape} instead."
                )
        if dZ.shape[:-1] != A_prev.shape[:-1]:
            raise InputError(
                f"dZ of a linear layer must have A_prev's leading dimensions {A_prev.shape[:-1]}; "
                f"got shape {dZ.shape} instead."
            )
        length = math.prod(A_prev.shape[1:-1])
        return (
            A_prev.reshape(A_prev.shape[0], 1, length, A_prev.shape[-1]),
            dZ.reshape(dZ.shape[0], 1, length, dZ.shape[-1]),
        )

    def __repr__(self) -> str:
        bias = "None" if self.b is None else str(self.b.shape)
        return (
            f"LayerSpec({self.kind!r}, W={self.W.shape} {self.W.dtype}, b={bias}, "
            f"{self.params.describe()})"
        )


def parse_index(index: Any, m: int) -> np.ndarray:
    """A batch's sample index as int64 (m,).

    Raises
    ------
    InputError
        Not integers, not of shape (m,), or a value beyond int64.
    """
    array = np.asarray(index)
    if array.dtype.kind not in "iu":
        raise InputError(f"index must hold integers (one sample index per row); got dtype {array.dtype} instead.")
    if array.shape != (m,):
        raise InputError(f"index must have shape ({m},), one entry per row of the batch; got {array.shape} instead.")
    if array.dtype == np.uint64 and m and array.max() > np.iinfo(np.int64).max:
        raise InputError(f"index must fit in int64; got {array.max()} instead.")
    return array.astype(np.int64)


def check_model_target(url: str, overwrite: bool, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse to write a model input group at ``url`` over anything, or, with ``overwrite``, over anything
    but a model input group dconv wrote (:func:`dconv.store.ownership.check_replaceable`). Writes nothing.

    Raises
    ------
    InputError
    """
    if overwrite:
        check_replaceable(url, storage_options, "model")
    elif store_exists(url, storage_options):
        raise InputError(f"{public_location(url)!r} already exists; pass overwrite=True to replace it.")


# --------------------------------------------------------------------------- writing


class ModelWriter:
    """Write a model input group, appending one batch to every layer at once.

    The group, its ``dconv_model`` attribute and each layer's ``W``, ``b`` and
    ``hparameters`` are written at the first :meth:`append` whose batch passes
    its checks (``url`` is checked when the writer is made). Every layer's rows
    go through its own :class:`~dconv.store.writer.InputWriter`, all with one
    chunk along m. Use it as a context manager, or call :meth:`close`. On
    leaving a ``with`` block on an exception, the batches appended before are
    written (and the exception goes on).

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL of the group.
    layers : mapping of str to LayerSpec
        Each layer's name (``"layer1.0.conv1"``: letters, digits, ``_``, ``.``,
        ``-``) and description, in model order.
    chunk : int, optional
        Samples per Zarr chunk along m, for every layer and ``sample_index``.
        Default: the smallest of the layers' :func:`~dconv.store.writer.default_chunk`.
    overwrite : bool
        Replace a model input group dconv wrote at ``url`` (anything else there
        is refused when the writer is made). The old group is removed at the
        first append whose batch passes its checks.
    storage_options : dict, optional
        fsspec options for ``url`` (never written).
    writer : {"ModelWriter", "capture"}
        The ``"writer"`` recorded in the attribute (:func:`dconv.capture` passes ``"capture"``).

    Attributes
    ----------
    url : str
    layers : dict of str to LayerSpec
    m : int
        Samples appended so far.
    chunk : int or None
        Samples per chunk along m; None until the first append when not given.
    sample_index : {"appended", "given"} or None
        Whether batches come with an index; None until the first append.

    Raises
    ------
    InputError
        A layer name is invalid or repeated; a layer is not a LayerSpec; ``url``
        exists and ``overwrite`` is False, or is not a model input group dconv
        wrote and ``overwrite`` is True.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        layers: Mapping[str, LayerSpec],
        *,
        chunk: int | None = None,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        writer: str = "ModelWriter",
    ) -> None:
        self.url = str(url)
        self._location = public_location(self.url)
        if not isinstance(layers, Mapping):
            raise InputError(f"layers must map layer names to LayerSpec; got {type(layers).__name__} instead.")
        for name in check_layer_names(layers):
            if not isinstance(layers[name], LayerSpec):
                raise InputError(f"layers[{name!r}] must be a LayerSpec; got {type(layers[name]).__name__} instead.")
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1):
            raise InputError(f"chunk must be a whole number >= 1; got {chunk!r} instead.")
        if writer not in WRITERS:
            raise InputError(f"writer must be one of {', '.join(map(repr, WRITERS))}; got {writer!r} instead.")
        self.layers = dict(layers)
        self.chunk = None if chunk is None else int(chunk)
        self.m = 0
        self.sample_index: str | None = None
        self._writer_name = writer
        self._overwrite, self._storage_options = overwrite, dict(storage_options or {})
        self._samples: dict[str, dict] = {}
        self._writers: dict[str, InputWriter] = {}
        self._index: _IndexWriter | None = None
        self._closed = False
        check_model_target(self.url, overwrite, storage_options)  # refused now, replaced at the first append

    def append(self, batch: Mapping[str, tuple[Any, Any]], index: Any = None) -> None:
        """Append one batch to every layer.

        Parameters
        ----------
        batch : mapping of str to (A_prev, dZ)
            Every layer's input (m_k, H, W, C_prev) and output gradient
            (m_k, n_H, n_W, C), NHWC, float32 or float64, all with the same m_k.
            A linear layer's may be (m_k, ..., in) and (m_k, ..., out)
            (:meth:`LayerSpec.rows`). Copied, as by InputWriter.
        index : array of int, shape (m_k,), optional
            The caller's index of each sample (a dataset's). Give it with every
            batch or with none: then the rows are numbered as appended.

        Raises
        ------
        InputError
            A layer is missing or unknown; a layer's arrays do not fit its ``W``,
            hyperparameters or earlier batches (the message names the layer);
            the layers' m differ; ``index`` is given with some batches and not
            others, or has the wrong dtype or length. Nothing of the batch is written.
        InputDtypeError
            A dtype is not float32 or float64, or not the earlier batches'.
        """
        if self._closed:
            raise InputError(f"append: the writer of {self._location!r} is closed; open a new ModelWriter.")
        rows = self._check(batch)
        m = _common_m({name: arrays["A_prev"].shape[0] for name, arrays in rows.items()})
        index = self._check_index(index, m)
        if not self._writers:
            self._start(rows, index is not None)
        for name, writer in self._writers.items():
            writer.append(rows[name]["A_prev"], rows[name]["dZ"])
        if index is not None:
            self._index.append(index)
        self.m += m

    def close(self) -> str:
        """Write the buffered rows of every layer and return ``url``. Closing twice does nothing.

        Raises
        ------
        InputError
            Nothing was appended; nothing has been written.
        """
        if self._closed:
            return self.url
        self._closed = True
        if not self._writers:
            raise InputError(f"{self._location!r} got no batch: append at least one before closing.")
        for writer in self._writers.values():
            writer.close()
        if self._index is not None:
            self._index.close()
        return self.url

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        if not self._closed:  # keep the batches appended before the error
            self._closed = True
            for writer in self._writers.values():
                writer.__exit__(exc_type, exc, traceback)
            if self._index is not None:
                self._index.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"ModelWriter({self._location!r}, {len(self.layers)} layers, m={self.m}, chunk={self.chunk}, {state})"

    def _check(self, batch: Any) -> dict[str, dict[str, np.ndarray]]:
        """Every layer's (A_prev, dZ) in its group's form, checked as InputWriter would, before anything is written."""
        if not isinstance(batch, Mapping):
            raise InputError(f"batch must map every layer name to (A_prev, dZ); got {type(batch).__name__} instead.")
        missing = [name for name in self.layers if name not in batch]
        unknown = [name for name in batch if name not in self.layers]
        if missing or unknown:
            found = "; ".join(
                f"{what} {', '.join(map(repr, names))}" for what, names in (("missing", missing), ("unknown", unknown))
                if names
            )
            raise InputError(
                f"batch must hold (A_prev, dZ) for every layer: {', '.join(map(repr, self.layers))}; got {found}."
            )
        rows = {}
        for name, spec in self.layers.items():
            pair = batch[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"batch[{name!r}] must be a pair (A_prev, dZ); got {type(pair).__name__} instead.")
            try:
                rows[name] = check_batch(*spec.rows(*pair), spec.W.shape, spec.params, self._samples.get(name))
            except InputError as e:
                raise type(e)(f"layer {name!r}: {e}") from e
        return rows

    def _check_index(self, index: Any, m: int) -> np.ndarray | None:
        given = index is not None
        if self.sample_index == "given" and not given:
            raise InputError("index must be given with every batch, as it was with the first; got None instead.")
        if self.sample_index == "appended" and given:
            raise InputError(
                "index must be None, as it was for the first batch (the rows are numbered as appended); "
                "got an index instead."
            )
        return parse_index(index, m) if given else None

    def _start(self, rows: dict[str, dict[str, np.ndarray]], given: bool) -> None:
        """The group, its attribute and ``layers/``, and one InputWriter per layer; with ``overwrite``, the old
        group's names go first."""
        samples = {name: sample_layout(arrays) for name, arrays in rows.items()}
        chunk = self.chunk or min(default_chunk(sample_bytes(layer)) for layer in samples.values())
        sample_index = "given" if given else "appended"
        check_model_target(self.url, self._overwrite, self._storage_options)
        if self._overwrite:
            remove_own(self.url, self._storage_options, "model")
        group = create_group(self.url, self._storage_options, attributes={MODEL_MARKER: self._marker(sample_index)})
        group.create_group("layers")
        self._samples, self.chunk, self.sample_index = samples, chunk, sample_index
        self._writers = {
            name: InputWriter(
                child_url(self.url, _layer_path(name)),
                spec.W,
                spec.b,
                stride=spec.params.stride,
                padding=spec.params.padding,
                dilation=spec.params.dilation,
                chunk=self.chunk,
                storage_options=self._storage_options,
            )
            for name, spec in self.layers.items()
        }
        if given:
            self._index = _IndexWriter(group, self.chunk)

    def _marker(self, sample_index: str) -> dict[str, Any]:
        from dconv import __version__

        return {
            "writer": self._writer_name,
            "version": __version__,
            "layers": [
                {"name": name, "kind": spec.kind, "path": _layer_path(name)} for name, spec in self.layers.items()
            ],
            "sample_index": sample_index,
        }


class _IndexWriter:
    """``sample_index``, int64 (m,), written in whole chunks as the layers' rows are (the last one at close)."""

    def __init__(self, group: zarr.Group, chunk: int) -> None:
        self._group, self._chunk = group, chunk
        self._buffer = np.empty(chunk, np.int64)
        self._filled = 0
        self._array: zarr.Array | None = None

    def append(self, index: np.ndarray) -> None:
        start = 0
        while start < len(index):
            take = min(self._chunk - self._filled, len(index) - start)
            self._buffer[self._filled : self._filled + take] = index[start : start + take]
            self._filled += take
            start += take
            if self._filled == self._chunk:
                self._write(last=False)

    def close(self) -> None:
        if self._filled or self._array is None:
            self._write(last=True)

    def _write(self, *, last: bool) -> None:
        if self._array is None:
            chunk = max(1, min(self._chunk, self._filled)) if last else self._chunk
            self._array = self._group.create_array(
                SAMPLE_INDEX, shape=(0,), chunks=(chunk,), dtype=np.int64, dimension_names=("m",)
            )
        self._array.append(self._buffer[: self._filled], axis=0)
        self._filled = 0


def _layer_path(name: str) -> str:
    return f"layers/{name}"


def _common_m(counts: Mapping[str, int]) -> int:
    """The one m of ``counts`` (layer name -> m); InputError listing them if they differ."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {m}" for name, m in counts.items())
        raise InputError(f"every layer's batch must have the same m; got {listed}.")
    return next(iter(counts.values()))


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ModelLayer:
    """One layer of a model input group: its name, kind and group's path inside the model group."""

    name: str
    kind: LayerKind
    path: str


@dataclass(frozen=True)
class ModelInputs:
    """A model input group, opened and checked (:func:`open_model_inputs`); no array has been read.

    Attributes
    ----------
    location : str
        Where it is, without credentials.
    url : str
        The path or URL it was opened with (not in the repr: it may hold credentials).
    layers : tuple of ModelLayer
        In model order.
    m : int
        Samples: the rows of every layer's ``A_prev`` and ``dZ``.
    sample_index : {"appended", "given"}
        ``"given"``: the group's ``sample_index`` array holds each row's index
        (:meth:`read_sample_index`); ``"appended"``: row ``i`` is the ``i``-th appended.
    """

    location: str
    url: str = field(repr=False)
    layers: tuple[ModelLayer, ...]
    m: int
    sample_index: Literal["appended", "given"]

    @property
    def names(self) -> tuple[str, ...]:
        """The layers' names, in model order."""
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> ModelLayer:
        """The layer called ``name``; InputError listing the layers if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise InputError(f"{self.location!r} has no layer {name!r}; its layers are {', '.join(map(repr, self.names))}.")

    def layer_url(self, name: str) -> str:
        """The path or URL of layer ``name``'s input group (for :func:`dconv.store.open_inputs`, a job)."""
        return child_url(self.url, self.layer(name).path)

    def open_layer(self, name: str, storage_options: Mapping[str, Any] | None = None) -> InputGroup:
        """Layer ``name``'s input group, opened (:func:`dconv.store.open_inputs`)."""
        return open_inputs(self.layer_url(name), storage_options)

    def select(self, names: str | Iterable[str]) -> ModelInputs:
        """The same group with only the layers ``names``, in model order.

        Raises
        ------
        InputError
            A name is not a layer of the group (the message lists the layers), or none is given.
        """
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in wanted if name not in self.names]
        if unknown:
            what = "is not a layer" if len(unknown) == 1 else "are not layers"
            raise InputError(
                f"select: {', '.join(map(repr, unknown))} {what} of {self.location!r}; "
                f"its layers are {', '.join(map(repr, self.names))}."
            )
        if not wanted:
            raise InputError(f"select needs at least one layer name; got none. The layers are {', '.join(self.names)}.")
        return ModelInputs(
            self.location, self.url, tuple(layer for layer in self.layers if layer.name in wanted), self.m,
            self.sample_index,
        )

    def read_sample_index(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        """Each row's sample index, int64 (m,): the stored ``sample_index``, or 0, 1, ..., m - 1 when appended."""
        if self.sample_index == "appended":
            return np.arange(self.m, dtype=np.int64)
        return open_group(self.url, "r", storage_options)[SAMPLE_INDEX][...]


def is_model_group(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if ``url`` is a model input group dconv wrote: its ``zarr.json`` alone is read.

    False for a missing path, a plain input group, an output, or anything else.
    """
    attributes = group_attributes(absolute_location(url), storage_options)
    return isinstance(attributes, Mapping) and isinstance(attributes.get(MODEL_MARKER), Mapping)


def open_model_inputs(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> ModelInputs:
    """Open and check a model input group: its attribute, every layer's input group, one m for all.

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL.
    storage_options : dict, optional
        fsspec options for ``url``.

    Returns
    -------
    ModelInputs

    Raises
    ------
    InputError
        Nothing is there; it is not a model input group (a plain input group
        is named as such); its attribute is unreadable; a layer's input group is
        missing or invalid (the message names the layer); the layers' ``A_prev``
        and ``dZ`` do not all have the same m (the message lists them); a
        ``"given"`` ``sample_index`` is missing or not int64 (m,).
    """
    url, location = absolute_location(url), public_location(url)
    attributes = group_attributes(url, storage_options)
    if attributes is None:
        raise InputError(f"model input store {location!r} does not exist or is not a Zarr v3 group.")
    if not isinstance(attributes.get(MODEL_MARKER), Mapping):
        if isinstance(attributes.get(INPUT_MARKER), Mapping) or "hparameters" in attributes:
            raise InputError(
                f"{location!r} is a dconv input group (one layer), not a model input group; "
                "open it with dconv.store.open_inputs."
            )
        raise InputError(f"{location!r} is not a dconv model input group (it has no {MODEL_MARKER!r} attribute).")
    layers, sample_index = _parse_marker(attributes[MODEL_MARKER], location)
    counts = {}
    for layer in layers:
        try:
            group = open_inputs(child_url(url, layer.path), storage_options)
        except InputError as e:
            raise type(e)(f"layer {layer.name!r} of {location!r}: {e}") from e
        counts[layer.name] = (group.A_prev.shape[0], group.dZ.shape[0])
    if len({rows for pair in counts.values() for rows in pair}) > 1:
        listed = ", ".join(
            f"{name}: {a}" if a == z else f"{name}: A_prev {a}, dZ {z}" for name, (a, z) in counts.items()
        )
        raise InputError(f"the layers of {location!r} must all have the same m; got {listed}.")
    m = next(iter(counts.values()))[0]
    if sample_index == "given":
        _check_sample_index(url, storage_options, location, m)
    return ModelInputs(location, url, layers, m, sample_index)


def _parse_marker(marker: Mapping[str, Any], location: str) -> tuple[tuple[ModelLayer, ...], str]:
    """The layers and sample-index mode of a ``dconv_model`` attribute."""

    def unreadable(detail: str) -> InputError:
        return InputError(f"{location!r} has a {MODEL_MARKER!r} attribute dconv cannot read: {detail}.")

    entries = marker.get("layers")
    if not isinstance(entries, list) or not all(isinstance(entry, Mapping) for entry in entries):
        raise unreadable(f"'layers' must be a list of {{name, kind, path}}; got {entries!r}")
    try:
        names = check_layer_names(entry.get("name") for entry in entries)
    except InputError as e:
        raise unreadable(str(e).rstrip(".")) from e
    layers = tuple(ModelLayer(name, entry.get("kind"), entry.get("path")) for name, entry in zip(names, entries))
    for layer in layers:
        if layer.kind not in KINDS or layer.path != _layer_path(layer.name):
            raise unreadable(f"layer {layer.name!r} must have a kind in {KINDS} and path {_layer_path(layer.name)!r}; "
                             f"got {layer.kind!r} and {layer.path!r}")
    sample_index = marker.get("sample_index")
    if sample_index not in ("appended", "given"):
        raise unreadable(f"'sample_index' must be 'appended' or 'given'; got {sample_index!r}")
    return layers, sample_index


def _check_sample_index(url: str, storage_options: Mapping[str, Any] | None, location: str, m: int) -> None:
    try:
        array = open_group(url, "r", storage_options).get(SAMPLE_INDEX)
    except Exception as e:  # noqa: BLE001  (a corrupt zarr.json: any Zarr or JSON error)
        raise InputError(f"{location!r} has corrupt Zarr metadata: {e}") from e
    if not isinstance(array, zarr.Array):
        raise InputError(f"{location!r} must hold a sample_index array (its attribute says 'given'); it has none.")
    if array.shape != (m,) or array.dtype != np.int64:
        raise InputError(
            f"sample_index of {location!r} must be int64 of shape ({m},); got {array.dtype} {array.shape} instead."
        )

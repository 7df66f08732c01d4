"""Input groups written a batch at a time, from a model's own activations and gradients.

:class:`InputWriter` writes the group :func:`dconv.store.inputs.make_inputs`
writes (``A_prev``, ``dZ``, ``W``, optional ``b``, the ``hparameters``
attribute, Blosc LZ4, dimension names), but with ``A_prev`` and ``dZ`` appended
batch by batch, when the total ``m`` is not known up front. Every array is
NHWC/HWIO and NumPy; a PyTorch model's NCHW/OIHW tensors are converted by the
caller (docs/FROM_PYTORCH.md). :func:`torch_conv_params` turns a
``torch.nn.Conv2d``'s hyperparameters, as plain values, into the writer's
``stride``, ``padding`` and ``dilation``; nothing here imports torch.

Rows are buffered until a Zarr chunk along m is full, and each chunk is written
once, whole, whatever the batch sizes: the chunk along m is the writer's
``chunk``, not the model's batch size, so dconv's batch chunks (256 by default)
cover whole input chunks and the fast reader decodes each once.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import zarr

from dconv.errors import InputDtypeError, InputError
from dconv.params import ConvParams, backward_geometry, check_float_dtype
from dconv.store.inputs import check_input_target, compressor, create_input_group
from dconv.store.layout import DIMENSIONS
from dconv.store.locations import public_location

__all__ = [
    "InputWriter",
    "torch_conv_params",
    "check_batch",
    "parse_weights",
    "parse_bias",
    "sample_layout",
    "sample_bytes",
    "default_chunk",
    "DEFAULT_CHUNK",
    "CHUNK_BYTES",
]

DEFAULT_CHUNK = 256
"""Samples per Zarr chunk along m, as many as dconv's default batch chunk."""

CHUNK_BYTES = 64 * 2**20
"""The default chunk is halved until one chunk of ``A_prev`` and ``dZ`` together holds at most this many bytes."""

STREAMED = ("A_prev", "dZ")


def default_chunk(sample_bytes: int) -> int:
    """Samples per chunk along m when none is given: :data:`DEFAULT_CHUNK`, halved while too large.

    Parameters
    ----------
    sample_bytes : int
        Bytes of one sample of ``A_prev`` and ``dZ`` together.

    Returns
    -------
    int
        The largest of 256, 128, ..., 1 whose chunk holds at most :data:`CHUNK_BYTES`
        (1 if even one sample is larger). A power of two divides dconv's default
        batch chunk, so its tasks still read whole chunks.
    """
    chunk = DEFAULT_CHUNK
    while chunk > 1 and chunk * sample_bytes > CHUNK_BYTES:
        chunk //= 2
    return chunk


def check_batch(
    A_prev: Any,
    dZ: Any,
    w_shape: tuple[int, ...],
    params: ConvParams,
    samples: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, np.ndarray]:
    """The checks of :meth:`InputWriter.append`, which writes nothing: one batch against ``W`` and earlier batches.

    Parameters
    ----------
    A_prev : array, shape (m_k, H, W, C_prev)
    dZ : array, shape (m_k, n_H, n_W, C)
    w_shape : (fh, fw, C_prev, C)
        The shape of the layer's ``W``.
    params : ConvParams
        The layer's stride, padding and dilation.
    samples : dict, optional
        ``{"A_prev": (sample shape, dtype), "dZ": ...}`` of the first batch; None for the first batch itself.

    Returns
    -------
    dict
        ``{"A_prev": ..., "dZ": ...}`` as NumPy arrays (not copied).

    Raises
    ------
    InputError
        The shapes do not fit ``W`` and ``params``, or each other, or ``samples``.
    InputDtypeError
        A dtype is not float32 or float64, or is not the one in ``samples``.
    """
    batch = {"A_prev": np.asarray(A_prev), "dZ": np.asarray(dZ)}
    for name, array in batch.items():
        check_float_dtype(name, array.dtype)
    backward_geometry(batch["dZ"].shape, batch["A_prev"].shape, w_shape, params)
    for name, (shape, dtype) in (samples or {}).items():
        array = batch[name]
        if array.shape[1:] != shape:
            raise InputError(
                f"{name} samples must have shape {shape}, as in the first batch; got {array.shape[1:]} "
                f"(batch of shape {array.shape}) instead."
            )
        if array.dtype.newbyteorder("=") != dtype:
            raise InputDtypeError(f"{name} must have dtype {dtype}, as in the first batch; got {array.dtype} instead.")
    return batch


def sample_layout(batch: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (sample shape, native-order dtype)}`` of a batch that passed :func:`check_batch`."""
    return {name: (array.shape[1:], array.dtype.newbyteorder("=")) for name, array in batch.items()}


def sample_bytes(samples: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of one sample of every array in ``samples`` (:func:`sample_layout`) together."""
    return sum(dtype.itemsize * int(np.prod(shape)) for shape, dtype in samples.values())


def torch_conv_params(
    stride: Any, padding: Any, dilation: Any, *, groups: int = 1, padding_mode: str = "zeros"
) -> dict[str, Any]:
    """The ``stride``, ``padding`` and ``dilation`` keywords of a ``torch.nn.Conv2d``'s hyperparameters.

    Parameters
    ----------
    stride, dilation : int or (int, int)
        ``conv.stride``, ``conv.dilation``.
    padding : int, (int, int), "same" or "valid"
        ``conv.padding``. PyTorch's ``"same"`` (stride 1 only; an odd total pad
        puts the extra row or column at the bottom or right) is dconv's.
    groups : int
        ``conv.groups``; dconv computes ordinary convolutions only (1).
    padding_mode : str
        ``conv.padding_mode``; dconv pads with zeros only (``"zeros"``).

    Returns
    -------
    dict
        ``{"stride": (sh, sw), "padding": ((top, bottom), (left, right)) or "same",
        "dilation": (dh, dw)}``: keywords for :class:`InputWriter`, and for
        :func:`dconv.backward_job` and :func:`dconv.conv2d_backward`.

    Raises
    ------
    InputError
        ``groups`` is not 1, ``padding_mode`` is not ``"zeros"``, ``"same"``
        comes with a stride other than 1, or a value is not a valid form.
    """
    if groups != 1:
        raise InputError(f"groups must be 1 (dconv computes ungrouped convolutions only); got {groups!r} instead.")
    if padding_mode != "zeros":
        raise InputError(f"padding_mode must be 'zeros' (dconv pads with zeros only); got {padding_mode!r} instead.")
    params = ConvParams.parse(stride, padding, dilation)
    if params.padding == "same" and params.stride != (1, 1):
        raise InputError(f"padding 'same' needs stride 1 in PyTorch; got stride {stride!r} instead.")
    return {"stride": params.stride, "padding": params.padding, "dilation": params.dilation}


class InputWriter:
    """Write an input group for ``dconv backward``, appending ``A_prev`` and ``dZ`` a batch at a time.

    The group, ``W``, ``b`` and the ``hparameters`` attribute are written at
    the first :meth:`append` whose batch passes its checks (``url`` is checked
    when the writer is made); ``A_prev`` and ``dZ`` grow with each append.
    Use it as a context manager, or call :meth:`close`: the rows of the last,
    partial chunk are written there. On leaving a ``with`` block on an
    exception, the rows appended so far are written too (and the exception
    goes on), so the group holds exactly the batches appended before it.

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL of the group.
    W : array, shape (fh, fw, C_prev, C)
        The layer's weights, HWIO, float32 or float64. Only ``dA_prev`` depends
        on them; they must be the weights the batches were computed with.
    b : array, shape (C,) or (1, 1, 1, C), optional
        The layer's bias, stored as (1, 1, 1, C).
    stride, padding, dilation
        As for :func:`dconv.conv2d_backward`; stored as the group's
        ``hparameters`` attribute, which ``dconv backward`` reads.
    chunk : int, optional
        Samples per Zarr chunk along m. Default: :func:`default_chunk` (256,
        halved while a chunk of ``A_prev`` and ``dZ`` is over 64 MiB). If fewer
        rows than that are appended in all, the chunk is the whole array, as
        ``make_inputs`` does. The writer holds one chunk of each in memory.
    overwrite : bool
        Replace an input group dconv wrote at ``url`` (anything else there is
        refused when the writer is made). The old group is removed at the first
        append whose batch passes its checks: until then, and if no batch
        does, it is left as it was.
    storage_options : dict, optional
        fsspec options for ``url`` (never written).

    Attributes
    ----------
    url : str
    m : int
        Samples appended so far (buffered ones included).
    chunk : int or None
        Samples per chunk along m; None until the first append when not given.

    Raises
    ------
    InputError
        ``url`` exists and ``overwrite`` is False, or is not an input group dconv
        wrote and ``overwrite`` is True; ``W`` or ``b`` has the wrong
        shape; a hyperparameter is invalid.
    InputDtypeError
        ``W`` or ``b`` is not float32 or float64.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        W: Any,
        b: Any = None,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        chunk: int | None = None,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = str(url)
        self._location = public_location(self.url)
        self._params = ConvParams.parse(stride, padding, dilation)
        W = parse_weights(W)
        b = parse_bias(b, W.shape[3])
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1):
            raise InputError(f"chunk must be a whole number >= 1; got {chunk!r} instead.")
        self.chunk = None if chunk is None else int(chunk)
        self.m = 0
        self._w_shape = W.shape
        self._sample: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self._filled = 0
        self._arrays: dict[str, zarr.Array] = {}
        self._closed = False
        self._overwrite, self._storage_options = overwrite, dict(storage_options or {})
        self._fixed = {"W": W} if b is None else {"W": W, "b": b}  # written with the group
        check_input_target(self.url, overwrite, storage_options)  # refused now, replaced at the first append
        self._group: zarr.Group | None = None

    def append(self, A_prev: Any, dZ: Any) -> None:
        """Append one batch.

        Parameters
        ----------
        A_prev : array, shape (m_k, H, W, C_prev)
            The layer's input, NHWC, float32 or float64.
        dZ : array, shape (m_k, n_H, n_W, C)
            The gradient of the loss with respect to the layer's output, NHWC,
            float32 or float64.

        Both are copied (views, such as a transposed tensor's, are fine), and
        every batch must have the first one's sample shapes and dtypes.

        Raises
        ------
        InputError
            The shapes do not fit ``W`` and the hyperparameters, or each other,
            or the earlier batches; the writer is closed.
        InputDtypeError
            A dtype is not float32 or float64, or is not the earlier batches'.
        """
        if self._closed:
            raise InputError(f"append: the writer of {self._location!r} is closed; open a new InputWriter.")
        batch = check_batch(A_prev, dZ, self._w_shape, self._params, self._sample or None)
        if not self._sample:
            self._start(batch)
        if self._group is None:
            self._group = self._create()
        rows, start = batch["A_prev"].shape[0], 0
        while start < rows:
            take = min(self.chunk - self._filled, rows - start)
            for name, array in batch.items():
                self._buffers[name][self._filled : self._filled + take] = array[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.chunk:
                self._write(last=False)
        self.m += rows

    def close(self) -> str:
        """Write the buffered rows (the last, partial chunk) and return ``url``. Closing twice does nothing.

        Raises
        ------
        InputError
            Nothing was appended: the group would have no ``A_prev`` or ``dZ``. Nothing
            has been written (a group ``overwrite`` was to replace is as it was).
        """
        if self._closed:
            return self.url
        if self.m == 0:
            self._closed = True
            raise InputError(f"{self._location!r} got no batch: append at least one (A_prev, dZ) before closing.")
        if self._filled:
            self._write(last=True)
        self._closed = True
        self._buffers = {}
        return self.url

    def __enter__(self) -> InputWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            if self._filled:
                self._write(last=True)  # keep the batches appended before the error
            self._closed = True
            self._buffers = {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"InputWriter({self._location!r}, m={self.m}, chunk={self.chunk}, {state})"

    def _create(self) -> zarr.Group:
        """The group, with ``W``, ``b`` and its attributes; with ``overwrite``, the old group's names go first."""
        group = create_input_group(
            self.url,
            self._overwrite,
            self._storage_options,
            writer="InputWriter",
            attributes={"hparameters": self._params.to_hparameters()},
        )
        for name, value in self._fixed.items():
            group.create_array(
                name,
                shape=value.shape,
                dtype=value.dtype,
                compressors=compressor(value.dtype),
                dimension_names=DIMENSIONS[name],
            )[...] = value
        return group

    def _start(self, batch: dict[str, np.ndarray]) -> None:
        """Fix the sample shapes, dtypes and chunk from the first batch, and allocate the buffers."""
        self._sample = sample_layout(batch)
        if self.chunk is None:
            self.chunk = default_chunk(sample_bytes(self._sample))
        self._buffers = {name: np.empty((self.chunk, *shape), dtype) for name, (shape, dtype) in self._sample.items()}

    def _write(self, *, last: bool) -> None:
        """Append the buffered rows to ``A_prev`` and ``dZ``, creating them on the first write.

        Every write but the ``last`` is one whole chunk. When the first write is
        also the last, the chunk is the rows there are (as ``make_inputs`` does
        for m below its chunk).
        """
        rows = self._filled
        if not self._arrays:
            chunk = min(self.chunk, rows) if last else self.chunk
            self._arrays = {
                name: self._group.create_array(
                    name,
                    shape=(0, *shape),
                    chunks=(chunk, *shape),
                    dtype=dtype,
                    compressors=compressor(dtype),
                    dimension_names=DIMENSIONS[name],
                )
                for name, (shape, dtype) in self._sample.items()
            }
        for name in STREAMED:
            self._arrays[name].append(self._buffers[name][:rows], axis=0)
        self._filled = 0


def parse_weights(W: Any) -> np.ndarray:
    """``W`` (fh, fw, C_prev, C) as a contiguous, native-order float32 or float64 array; InputError otherwise."""
    W = np.asarray(W)
    check_float_dtype("W", W.dtype)
    if W.ndim != 4 or min(W.shape) < 1:
        raise InputError(f"W must be 4-D (fh, fw, C_prev, C) with no empty dimension; got shape {W.shape} instead.")
    return np.ascontiguousarray(W, W.dtype.newbyteorder("="))


def parse_bias(b: Any, channels: int) -> np.ndarray | None:
    """``b`` (C,) or (1, 1, 1, C) as a contiguous (1, 1, 1, C) array, or None; InputError otherwise."""
    if b is None:
        return None
    b = np.asarray(b)
    check_float_dtype("b", b.dtype)
    if b.shape not in ((channels,), (1, 1, 1, channels)):
        raise InputError(
            f"b must have shape ({channels},) or (1, 1, 1, {channels}) for W's {channels} output channels; "
            f"got {b.shape} instead."
        )
    return np.ascontiguousarray(b.reshape(1, 1, 1, channels), b.dtype.newbyteorder("="))

"""Convolution hyperparameters: parsing, validation and output geometry.

Pure Python and NumPy; no Dask, no I/O. Everything here works on shapes and
dtypes only, so the pipeline can validate a job on Zarr metadata before it
reads a single chunk.

Layouts are fixed throughout dconv: activations are NHWC ``(m, H, W, C)`` and
weights are HWIO ``(fh, fw, C_prev, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from dconv.errors import InputDtypeError, InputError

__all__ = [
    "ConvParams",
    "ConvGeometry",
    "SUPPORTED_DTYPES",
    "check_float_dtype",
    "parse_float_dtype",
    "result_dtype",
    "backward_geometry",
]

Pair = tuple[int, int]
Pads = tuple[Pair, Pair]
PaddingLike = Union[int, str, tuple, list]

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
PADDING_WORDS = ("same", "valid")


def _fmt_pair(pair: Pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else str(tuple(pair))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_pair(name: str, value: Any, *, minimum: int) -> Pair:
    """Normalise an int or an ``(h, w)`` pair to a tuple of two ints >= ``minimum``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise InputError(f"{name} must be an int or a pair (h, w) of ints; got {value!r} instead.")
    if min(pair) < minimum:
        raise InputError(f"{name} must be >= {minimum}; got {value!r} instead.")
    return pair


def parse_padding(value: Any) -> Pads | str:
    """Normalise a padding argument.

    Returns ``"same"`` (resolved later, once the input size is known) or
    explicit ``((top, bottom), (left, right))`` pads. ``"valid"`` means no
    padding.
    """
    if isinstance(value, str):
        word = value.lower()
        if word not in PADDING_WORDS:
            raise InputError(
                f"padding must be an int, a pair, ((top, bottom), (left, right)), "
                f"'same' or 'valid'; got {value!r} instead."
            )
        return "same" if word == "same" else ((0, 0), (0, 0))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (tuple, list)) for v in value
    ):
        top_bottom = parse_pair("padding (top, bottom)", tuple(value[0]), minimum=0)
        left_right = parse_pair("padding (left, right)", tuple(value[1]), minimum=0)
        return (top_bottom, left_right)
    ph, pw = parse_pair("padding", value, minimum=0)
    return ((ph, ph), (pw, pw))


def padding_from_flat(values: Any) -> Any:
    """The padding a flat list means: ``[p]``, ``[h, w]`` or ``[top, bottom, left, right]``.

    Used by the CLI (``--padding 1,2,0,1``) and spec files (``padding = [1, 2, 0, 1]``);
    anything that is not a list is returned unchanged for :func:`parse_padding`.
    """
    if not isinstance(values, (list, tuple)) or any(isinstance(v, (list, tuple)) for v in values):
        return values
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    if len(values) == 4:
        return ((values[0], values[1]), (values[2], values[3]))
    raise InputError(
        f"padding takes 1, 2 (h, w) or 4 (top, bottom, left, right) values; got {list(values)} instead."
    )


@dataclass(frozen=True)
class ConvGeometry:
    """The sizes of one convolution, resolved for a given input and kernel.

    Attributes
    ----------
    in_hw, kernel_hw, out_hw : tuple of int
        ``(H, W)`` of the input, ``(fh, fw)`` of the kernel, ``(n_H, n_W)`` of the output.
    stride, dilation : tuple of int
        ``(sh, sw)`` and ``(dh, dw)``.
    pads : ((top, bottom), (left, right))
        Explicit zero padding, with ``"same"`` already resolved.
    """

    in_hw: Pair
    kernel_hw: Pair
    out_hw: Pair
    stride: Pair
    dilation: Pair
    pads: Pads

    @property
    def effective_kernel_hw(self) -> Pair:
        """Extent of the dilated kernel, ``(fh - 1) * dh + 1`` by ``(fw - 1) * dw + 1``."""
        return tuple((f - 1) * d + 1 for f, d in zip(self.kernel_hw, self.dilation))  # type: ignore[return-value]

    @property
    def padded_hw(self) -> Pair:
        return tuple(n + p[0] + p[1] for n, p in zip(self.in_hw, self.pads))  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvParams:
    """Validated convolution hyperparameters.

    Build one with :meth:`parse`, which accepts every form the public API
    accepts. ``padding`` is either explicit ``((top, bottom), (left, right))``
    pads or the word ``"same"`` (TensorFlow semantics, resolved per input size).
    """

    stride: Pair = (1, 1)
    padding: Pads | str = ((0, 0), (0, 0))
    dilation: Pair = (1, 1)

    @classmethod
    def parse(cls, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> ConvParams:
        """Validate and normalise the public ``stride``, ``padding`` and ``dilation`` forms."""
        return cls(
            stride=parse_pair("stride", stride, minimum=1),
            padding=parse_padding(padding_from_flat(padding)),
            dilation=parse_pair("dilation", dilation, minimum=1),
        )

    @classmethod
    def from_dict(cls, mapping: dict[str, Any]) -> ConvParams:
        """Inverse of :meth:`to_dict`; also accepts the short public forms."""
        unknown = set(mapping) - {"stride", "padding", "dilation"}
        if unknown:
            raise InputError(
                f"conv parameters take keys stride, padding, dilation; got {sorted(unknown, key=repr)} instead."
            )
        return cls.parse(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form, accepted back by :meth:`from_dict`."""
        padding = self.padding if isinstance(self.padding, str) else [list(p) for p in self.padding]
        return {"stride": list(self.stride), "padding": padding, "dilation": list(self.dilation)}

    def to_hparameters(self) -> dict[str, Any]:
        """The classic ``{"stride", "pad"}`` dict (plus ``"dilation"``), in the simplest form.

        Ints where both axes agree, as the classic API has them; pairs or
        ``[[top, bottom], [left, right]]`` only where they must be.
        """

        def simplest(pair: Pair) -> Any:
            return pair[0] if pair[0] == pair[1] else list(pair)

        if isinstance(self.padding, str):
            pad: Any = self.padding
        elif all(p[0] == p[1] for p in self.padding):
            pad = simplest((self.padding[0][0], self.padding[1][0]))
        else:
            pad = [list(p) for p in self.padding]
        return {"stride": simplest(self.stride), "pad": pad, "dilation": simplest(self.dilation)}

    def describe(self) -> str:
        """Short human form, e.g. ``stride 1, padding 0``."""
        if isinstance(self.padding, str):
            padding = repr(self.padding)
        elif self.padding[0][0] == self.padding[0][1] and self.padding[1][0] == self.padding[1][1]:
            padding = _fmt_pair((self.padding[0][0], self.padding[1][0]))
        else:
            padding = str(self.padding)
        text = f"stride {_fmt_pair(self.stride)}, padding {padding}"
        if self.dilation != (1, 1):
            text += f", dilation {_fmt_pair(self.dilation)}"
        return text

    def resolve(self, in_hw: Pair, kernel_hw: Pair) -> ConvGeometry:
        """Resolve the pads and output size for an ``(H, W)`` input and ``(fh, fw)`` kernel.

        Raises
        ------
        InputError
            If the dilated kernel is larger than the padded input.
        """
        pads = self._pads_for(in_hw, kernel_hw)
        out_hw = []
        for axis, name in enumerate(("height", "width")):
            extent = (kernel_hw[axis] - 1) * self.dilation[axis] + 1
            padded = in_hw[axis] + pads[axis][0] + pads[axis][1]
            if extent > padded:
                raise InputError(
                    f"kernel {name} {kernel_hw[axis]} (dilated extent {extent}) is larger than the "
                    f"padded input {name} {padded} (input {in_hw[axis]}, {self.describe()})."
                )
            out_hw.append((padded - extent) // self.stride[axis] + 1)
        return ConvGeometry(
            in_hw=tuple(in_hw),
            kernel_hw=tuple(kernel_hw),
            out_hw=tuple(out_hw),
            stride=self.stride,
            dilation=self.dilation,
            pads=pads,
        )

    def _pads_for(self, in_hw: Pair, kernel_hw: Pair) -> Pads:
        if not isinstance(self.padding, str):
            return self.padding
        # TensorFlow's "same": out = ceil(in / stride), the odd pixel goes bottom/right.
        pads = []
        for n, f, s, d in zip(in_hw, kernel_hw, self.stride, self.dilation):
            out = -(-n // s)
            total = max((out - 1) * s + (f - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)  # type: ignore[return-value]


def check_float_dtype(name: str, dtype: Any) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype if it is float32 or float64 (either byte order).

    Raises
    ------
    InputDtypeError
        For any other dtype (bool, int, complex, float16, object, strings, structured).
    """
    try:
        dtype = np.dtype(dtype)
    except TypeError as e:
        raise InputDtypeError(f"{name} must have dtype float32 or float64; got {dtype!r} instead.") from e
    if dtype.kind != "f" or dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise InputDtypeError(f"{name} must have dtype float32 or float64; got {dtype} instead.")
    return dtype


def parse_float_dtype(value: Any, name: str = "dtype") -> str:
    """A dtype option (``"float32"``, ``np.float64``, ...) as its name, ``"float32"`` or ``"float64"``.

    Raises
    ------
    InputError
        ``value`` names any other dtype, or none.
    """
    try:
        return str(check_float_dtype(name, value))
    except InputDtypeError:
        shown = value if isinstance(value, str) else str(np.dtype(value)) if _is_dtype(value) else repr(value)
        raise InputError(f"{name} must be float32 or float64; got {shown!r} instead.") from None


def _is_dtype(value: Any) -> bool:
    try:
        np.dtype(value)
    except TypeError:
        return False
    return True


def result_dtype(*dtypes: Any) -> np.dtype:
    """The dtype the gradients are computed in: NumPy promotion of the (float) inputs.

    float32 everywhere gives float32; any float64 input makes the result float64.
    """
    return np.result_type(*dtypes).newbyteorder("=")


def _check_rank(name: str, shape: tuple[int, ...], layout: str) -> None:
    if len(shape) != 4:
        raise InputError(f"{name} must be 4-D {layout}; got shape {tuple(shape)} ({len(shape)}-D) instead.")


def forward_geometry(a_shape: tuple[int, ...], w_shape: tuple[int, ...], params: ConvParams) -> ConvGeometry:
    """Validate ``A_prev`` and ``W`` shapes against each other and resolve the geometry.

    Parameters
    ----------
    a_shape : tuple of int
        Shape of ``A_prev``, ``(m, H, W, C_prev)``.
    w_shape : tuple of int
        Shape of ``W``, ``(fh, fw, C_prev, C)``.
    params : ConvParams
    """
    _check_rank("A_prev", a_shape, "(m, H, W, C_prev)")
    _check_rank("W", w_shape, "(fh, fw, C_prev, C)")
    if a_shape[3] != w_shape[2]:
        raise InputError(
            f"W has {w_shape[2]} input channels (shape {tuple(w_shape)}) but A_prev has "
            f"{a_shape[3]} (shape {tuple(a_shape)}); they must match."
        )
    if min(a_shape) < 1 or min(w_shape) < 1:
        raise InputError(
            f"A_prev {tuple(a_shape)} and W {tuple(w_shape)} must have no empty dimension."
        )
    return params.resolve(tuple(a_shape[1:3]), tuple(w_shape[:2]))


def output_shape(a_shape: tuple[int, ...], w_shape: tuple[int, ...], params: ConvParams) -> tuple[int, ...]:
    """The shape ``(m, n_H, n_W, C)`` of ``Z`` (and so of ``dZ``)."""
    geometry = forward_geometry(a_shape, w_shape, params)
    return (a_shape[0], *geometry.out_hw, w_shape[3])


def backward_geometry(
    dz_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    params: ConvParams,
) -> ConvGeometry:
    """Validate the shapes of a backward pass and resolve its geometry.

    Raises
    ------
    InputError
        With a one-line message that names the array, the expected shape and the
        received one.
    """
    geometry = forward_geometry(a_shape, w_shape, params)
    _check_rank("dZ", dz_shape, "(m, n_H, n_W, C)")
    if dz_shape[0] != a_shape[0]:
        raise InputError(
            f"dZ has batch size {dz_shape[0]} (shape {tuple(dz_shape)}) but A_prev has "
            f"{a_shape[0]} (shape {tuple(a_shape)}); they must match."
        )
    expected = (a_shape[0], *geometry.out_hw, w_shape[3])
    if tuple(dz_shape) != expected:
        raise InputError(
            f"dZ has shape {tuple(dz_shape)}; A_prev {tuple(a_shape)}, W {tuple(w_shape)}, "
            f"{params.describe()} give {expected}."
        )
    return geometry

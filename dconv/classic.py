"""The classic ``conv_forward`` / ``conv_backward`` API, kept for compatibility.

``cache = (A_prev, W, b, hparameters)`` with ``hparameters = {"stride": int,
"pad": int}``, exactly as in the teaching implementation dconv replaces. The
hparameters are validated here, at the edge, and turned into named arguments
for the vectorised kernel. Unlike the original, ``pad = 0`` works.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dconv.errors import InputError
from dconv.kernel import Gradients, conv2d_backward, conv2d_forward

__all__ = ["conv_forward", "conv_backward"]

Cache = tuple[np.ndarray, np.ndarray, np.ndarray, Mapping[str, Any]]


def parse_hparameters(hparameters: Any) -> tuple[int, int]:
    """Return ``(stride, pad)`` from the classic dict, naming any missing key."""
    if not isinstance(hparameters, Mapping):
        raise InputError(
            f"hparameters must be a dict with keys 'stride' and 'pad'; got {type(hparameters).__name__} instead."
        )
    missing = [key for key in ("stride", "pad") if key not in hparameters]
    if missing:
        raise InputError(
            f"hparameters is missing {' and '.join(repr(k) for k in missing)}; "
            f"expected keys 'stride' and 'pad', got {sorted(hparameters, key=repr)}."
        )
    return hparameters["stride"], hparameters["pad"]


def conv_forward(A_prev: np.ndarray, W: np.ndarray, b: np.ndarray, hparameters: Mapping[str, Any]) -> tuple[np.ndarray, Cache]:
    """Forward pass of a conv layer, classic API.

    Parameters
    ----------
    A_prev : ndarray, shape (m, n_H_prev, n_W_prev, n_C_prev)
    W : ndarray, shape (f, f, n_C_prev, n_C)
    b : ndarray, shape (1, 1, 1, n_C)
    hparameters : dict
        ``{"stride": int, "pad": int}``.

    Returns
    -------
    Z : ndarray, shape (m, n_H, n_W, n_C)
    cache : tuple
        ``(A_prev, W, b, hparameters)``, for :func:`conv_backward`.
    """
    stride, pad = parse_hparameters(hparameters)
    Z = conv2d_forward(A_prev, W, b, stride=stride, padding=pad)
    return Z, (A_prev, W, b, hparameters)


def conv_backward(dZ: np.ndarray, cache: Cache) -> Gradients:
    """Backward pass of a conv layer, classic API.

    Parameters
    ----------
    dZ : ndarray, shape (m, n_H, n_W, n_C)
    cache : tuple
        ``(A_prev, W, b, hparameters)`` as returned by :func:`conv_forward`.

    Returns
    -------
    Gradients
        ``(dA_prev, dW, db)`` with shapes ``(m, n_H_prev, n_W_prev, n_C_prev)``,
        ``(f, f, n_C_prev, n_C)`` and ``(1, 1, 1, n_C)``.
    """
    if not isinstance(cache, (tuple, list)) or len(cache) != 4:
        raise InputError(
            f"cache must be the tuple (A_prev, W, b, hparameters) from conv_forward; got {type(cache).__name__}"
            + (f" of length {len(cache)}" if isinstance(cache, (tuple, list)) else "")
            + " instead."
        )
    A_prev, W, _, hparameters = cache
    stride, pad = parse_hparameters(hparameters)
    return conv2d_backward(dZ, A_prev, W, stride=stride, padding=pad)

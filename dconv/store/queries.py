"""Query groups: the gradients ``--dot`` takes each sample's exact inner products with.

::

    QUERIES/               attrs["dconv_queries"]: n_q, where the gradients came from, the layers
    QUERIES/dW, QUERIES/db (n_q, fh, fw, C_prev, C) and (n_q, C), float64: one layer's n_q gradients
    QUERIES/layers/<name>/dW, db    the same for each layer of a model (a model job's --dot)

A query ``Q_j`` is a gradient of the layer's parameters, laid out as the sample's
``G_i = [dW_i as (fh*fw*C_prev, C); db_i]`` (:mod:`dconv.kernel.sketch`), so that
``<G_i, Q_j>`` is the inner product of two gradients. Three ways to make one:

- :func:`queries_from_inputs`: the per-sample gradients of a few samples (an input group, or a
  model input group: ``dconv queries --from-inputs``);
- :func:`queries_from_output`: a job's summed gradient, ``dW`` and ``db`` (``--from-output``):
  ``<G_i, S>``, each sample's alignment with the batch gradient;
- :func:`write_queries`, from NumPy arrays.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from dconv.errors import InputError
from dconv.store.locations import child_url, create_group, open_group, public_location
from dconv.store.ownership import QUERIES_MARKER, check_replaceable, is_vacant, remove_own

__all__ = ["QUERY_MARKER", "MAX_QUERY_SAMPLES", "write_queries", "read_queries", "queries_from_output",
           "queries_from_inputs"]

QUERY_MARKER = QUERIES_MARKER
"""The group attribute of a query group: ``{"n_q", "source", "layers"}``."""

MAX_QUERY_SAMPLES = 4096
"""At most this many samples make queries from inputs: every task of a --dot job holds them all."""


def write_queries(
    url: str | os.PathLike,
    gradients: Mapping[str | None, tuple[Any, Any]],
    *,
    source: str = "arrays",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write a query group: ``gradients`` maps a layer name (None for a one-layer group) to ``(dW, db)``.

    Parameters
    ----------
    gradients : mapping
        ``{None: (dW, db)}`` for one layer, or ``{name: (dW, db), ...}`` for a model's layers;
        ``dW`` (n_q, fh, fw, C_prev, C), ``db`` (n_q, C), the same ``n_q`` everywhere.
    source : str
        Where the gradients came from, recorded.
    overwrite : bool
        Replace a query group dconv wrote at ``url``.

    Raises
    ------
    InputError
        Shapes that do not fit; ``url`` exists (without ``overwrite``, or is not a query group).
    """
    url = str(url)
    arrays = {name: _check_pair(name, dW, db) for name, (dW, db) in gradients.items()}
    counts = {dW.shape[0] for dW, _ in arrays.values()}
    if len(counts) != 1 or (None in arrays and len(arrays) > 1):
        raise InputError(f"gradients must hold one layer (None) or named layers, each with the same n_q; "
                         f"got layers {list(arrays)} with n_q {sorted(counts)} instead.")
    if not is_vacant(url, storage_options):
        if not overwrite:
            raise InputError(f"{public_location(url)!r} already exists; pass overwrite=True to replace it.")
        check_replaceable(url, storage_options, "queries")
        remove_own(url, storage_options, "queries")
    layers = None if None in arrays else list(arrays)
    marker = {"n_q": counts.pop(), "source": source, "layers": layers}
    group = create_group(url, storage_options, {QUERY_MARKER: marker})
    for name, (dW, db) in arrays.items():
        target = group if name is None else group.require_group(f"layers/{name}")
        target.create_array("dW", shape=dW.shape, dtype="float64", dimension_names=("query", "fh", "fw", "C_prev", "C"))[...] = dW
        target.create_array("db", shape=db.shape, dtype="float64", dimension_names=("query", "C"))[...] = db
    return url


def _check_pair(name: str | None, dW: Any, db: Any) -> tuple[np.ndarray, np.ndarray]:
    dW, db = np.asarray(dW, dtype=np.float64), np.asarray(db, dtype=np.float64)
    if dW.ndim != 5 or db.shape != (dW.shape[0], dW.shape[4]):
        where = "" if name is None else f"layer {name}: "
        raise InputError(f"{where}dW and db must have shapes (n_q, fh, fw, C_prev, C) and (n_q, C); "
                         f"got {dW.shape} and {db.shape} instead.")
    return dW, db


def read_queries(
    url: str, w_shape: tuple[int, ...], layer: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """The queries of a layer as the kernel takes them: (n_q, fh * fw * C_prev + 1, C), float64.

    Parameters
    ----------
    w_shape : tuple
        The layer's ``W`` (fh, fw, C_prev, C): the queries must be gradients of it.
    layer : str, optional
        The layer of a model's query group; None for a one-layer group.

    Raises
    ------
    InputError
        ``url`` is not a query group, lacks the layer, or holds gradients of another shape.
    """
    from dconv.kernel.sketch import stack_queries

    location = public_location(url)
    try:
        group = open_group(url, "r", storage_options)
    except FileNotFoundError:
        raise InputError(f"dot: the query group {location!r} does not exist.") from None
    marker = group.attrs.get(QUERY_MARKER)
    if not isinstance(marker, Mapping):
        raise InputError(f"dot: {location!r} is not a query group (it has no {QUERY_MARKER!r} attribute); "
                         "make one with dconv queries.")
    layers = marker.get("layers")
    if layer is None and layers is not None:
        raise InputError(f"dot: {location!r} holds the queries of a model's layers ({', '.join(layers)}); "
                         "a one-layer job takes a one-layer query group.")
    if layer is not None and layer not in (layers or []):
        held = "one layer's queries" if layers is None else f"the layers {', '.join(layers)}"
        raise InputError(f"dot: {location!r} has no queries of layer {layer!r} (it holds {held}).")
    node = group if layer is None else group[f"layers/{layer}"]
    dW, db = np.asarray(node["dW"][...]), np.asarray(node["db"][...])
    if tuple(dW.shape[1:]) != tuple(w_shape):
        where = "" if layer is None else f" of layer {layer!r}"
        raise InputError(f"dot: the queries{where} must be gradients of W {tuple(w_shape)}; "
                         f"got dW of shape {dW.shape[1:]} instead.")
    return stack_queries(dW, db)


def queries_from_output(out: str, url: str, *, overwrite: bool = False,
                        storage_options: Mapping[str, Any] | None = None) -> str:
    """A query group of one query per layer: a complete output's ``dW`` and ``db`` (the batch gradient).

    ``out`` may be a one-layer output or a model output (every layer it ran).
    """
    from dconv.store.model_output import ModelOutput
    from dconv.store.output import open_result

    model = ModelOutput(out, dict(storage_options or {})).provenance()
    if model is not None:
        if model.get("status") != "complete":
            raise InputError(f"{public_location(out)!r} is not complete (status {model.get('status')!r}); finish it first.")
        names = [entry["name"] for entry in model.get("layers_run", [])]
        sources = {name: child_url(out, f"layers/{name}") for name in names}
    else:
        sources = {None: out}
    gradients = {}
    for name, where in sources.items():
        group = open_result(where, storage_options=storage_options)
        dW, db = np.asarray(group["dW"][...], dtype=np.float64), np.asarray(group["db"][...], dtype=np.float64)
        gradients[name] = (dW[None], db.reshape(1, -1))
    return write_queries(url, gradients, source=f"output {public_location(out)}", overwrite=overwrite,
                         storage_options=storage_options)


def queries_from_inputs(inputs: str, url: str, *, overwrite: bool = False,
                        storage_options: Mapping[str, Any] | None = None) -> str:
    """A query group of the per-sample gradients of every sample of ``inputs`` (an input group or a model
    input group), at most :data:`MAX_QUERY_SAMPLES`: query ``j`` is sample ``j``'s ``(dW_j, db_j)``."""
    from dconv.store.inputs import open_inputs
    from dconv.store.model import is_model_group, open_model_inputs

    if is_model_group(inputs, storage_options):
        model = open_model_inputs(inputs, storage_options)
        layers = {layer.name: model.layer_url(layer.name) for layer in model.layers}
    else:
        layers = {None: inputs}
    gradients = {name: _per_sample(open_inputs(where, storage_options)) for name, where in layers.items()}
    return write_queries(url, gradients, source=f"inputs {public_location(inputs)}", overwrite=overwrite,
                         storage_options=storage_options)


def _per_sample(group: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's ``(dW_i, db_i)`` of an input group, one sample at a time, in float64."""
    from dconv.kernel import conv2d_backward

    m = group.A_prev.shape[0]
    if m > MAX_QUERY_SAMPLES:
        raise InputError(f"queries from inputs take at most {MAX_QUERY_SAMPLES} samples; got m = {m} in "
                         f"{group.location!r} instead.")
    params = dict(group.hparameters or {})
    conv = {"stride": params.get("stride", 1), "padding": params.get("pad", 0), "dilation": params.get("dilation", 1)}
    A, dZ = np.asarray(group.A_prev[...], dtype=np.float64), np.asarray(group.dZ[...], dtype=np.float64)
    W = np.asarray(group.W[...], dtype=np.float64)
    grads = [conv2d_backward(dZ[i : i + 1], A[i : i + 1], W, **conv) for i in range(m)]
    return np.stack([g[1] for g in grads]), np.stack([np.ravel(g[2]) for g in grads])

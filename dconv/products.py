"""What a job's per-sample products need: the query gradients of ``--dot`` and the projections of ``--sketch``.

For one layer, sample ``i``'s gradient is ``G_i = [dW_i as (fh*fw*C_prev, C); db_i]``
(:mod:`dconv.kernel.sketch`). ``--dot QUERIES`` writes ``<G_i, Q_j>`` for the ``n_q`` gradients of a
query group (:mod:`dconv.store.queries`); ``--sketch K_IN,K_OUT`` writes ``P_in G_i P_out^T`` with
projections that are drawn once, stored in the output (``sketch/P_in``, ``sketch/P_out``) and read back
by a resume and by ``--sketch-like`` (so that two outputs' sketches compare). Layer ``l`` of a model (its
place in the model input group) draws from the stream ``(seed, l)``; a one-layer job is layer 0.

A layer without a bias has no ``db_i``: its queries' bias rows and ``P_in``'s bias column are zero, so
neither the inner products nor the sketches see it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dconv.errors import InputError
from dconv.kernel.sketch import Projections, gaussian_projections, orthogonal_projections
from dconv.options import JobOptions
from dconv.store.layout import SKETCH_PROJECTIONS
from dconv.store.locations import absolute_location, child_url, open_group, public_location
from dconv.store.queries import read_queries

__all__ = ["job_queries", "job_projections", "read_projections", "write_projections", "stream_seed"]


def stream_seed(seed: int, layer: int) -> int:
    """The seed of layer ``layer``'s projections: one stream of ``np.random.SeedSequence([seed, layer])``."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1, np.uint64)[0])


def job_queries(
    options: JobOptions, w_shape: tuple[int, ...], bias: bool, layer: str | None,
    storage_options: Mapping[str, Any],
) -> np.ndarray | None:
    """The queries of ``options.dot`` for this layer (n_q, K + 1, C), float64; the bias rows zero without a bias."""
    if options.dot is None:
        return None
    queries = read_queries(absolute_location(options.dot), w_shape, layer, storage_options)
    if not bias:
        queries[:, -1, :] = 0.0
    return queries


def job_projections(
    options: JobOptions, w_shape: tuple[int, ...], bias: bool, out_url: str, layer: tuple[str, int] | None,
    storage_options: Mapping[str, Any], resume: bool,
) -> Projections | None:
    """The projections of ``options.sketch``: the output's own on a resume, ``sketch_like``'s, or drawn anew.

    Raises
    ------
    InputError
        ``sketch_like`` is not an output with sketches of this layer, or of another size than ``sketch``.
    """
    if not options.sketching:
        return None
    fh, fw, c_prev, c_out = w_shape
    k1 = fh * fw * c_prev + 1
    name, index = layer if layer is not None else (None, 0)
    stored = read_projections(out_url, None, storage_options) if resume else None
    if stored is not None:
        projections = stored
    elif options.sketch_like is not None:
        projections = read_projections(absolute_location(options.sketch_like), name, storage_options, required=True)
        if options.sketch is not None and tuple(options.sketch) != (projections.p_in.shape[0], projections.p_out.shape[0]):
            raise InputError(
                f"sketch {tuple(options.sketch)} differs from that of sketch_like {options.sketch_like!r} "
                f"({projections.p_in.shape[0]}, {projections.p_out.shape[0]}); give one of them."
            )
    else:
        k_in, k_out = options.sketch
        draw = orthogonal_projections if options.sketch_kind == "orthogonal" else gaussian_projections
        projections = draw(k_in, k_out, k1, c_out, stream_seed(options.sketch_seed or 0, index))
    if projections.p_in.shape[1] != k1 or projections.p_out.shape[1] != c_out:
        raise InputError(
            f"sketch_like's projections are of a layer with G_i ({projections.p_in.shape[1]}, "
            f"{projections.p_out.shape[1]}); this layer's is ({k1}, {c_out})."
        )
    if not bias:
        p_in = projections.p_in.copy()
        p_in[:, -1] = 0.0
        projections = projections._replace(p_in=p_in)
    return projections


def read_projections(
    url: str, layer: str | None, storage_options: Mapping[str, Any], *, required: bool = False
) -> Projections | None:
    """The projections stored in the output at ``url`` (layer ``layer``'s, in a model output); None if it has none."""
    from dconv.store.model_output import ModelOutput

    where = url
    if layer is not None and ModelOutput(url, dict(storage_options)).provenance() is not None:
        where = child_url(url, f"layers/{layer}")
    try:
        group = open_group(where, "r", storage_options)
        p_in, p_out = (np.asarray(group[name][...]) for name in SKETCH_PROJECTIONS)
    except (FileNotFoundError, KeyError):
        if required:
            raise InputError(
                f"sketch_like: {public_location(where)!r} is not a dconv output with sketches "
                "(no sketch/P_in and sketch/P_out)."
            ) from None
        return None
    return Projections(p_in, p_out)


def write_projections(group: Any, projections: Projections) -> None:
    """Store ``projections`` in an output group (float64)."""
    for name, array in zip(SKETCH_PROJECTIONS, projections):
        group.create_array(name, shape=array.shape, dtype="float64", dimension_names=("k", "n"), overwrite=True)[...] = array

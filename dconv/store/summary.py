"""What ``dconv inspect`` reports about an output group.

Reads metadata, the summed arrays (``dW``, ``db``) and the per-chunk ``done``
flags and SIMD levels; never a block array (``dA_prev``), so it is cheap on any
size of output. Which arrays there are comes from the output layout table.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from dconv.store.layout import OUTPUT_LAYOUT, Kind
from dconv.store.locations import public_location
from dconv.store.output import open_output, output_arrays, read_done, read_levels

__all__ = ["summarize", "format_summary", "format_levels"]

MAX_LISTED = 50
"""Longest list of chunks (missing ones, level runs) a summary spells out."""


def _array_summary(array: zarr.Array) -> dict[str, Any]:
    stored = array.nbytes_stored()
    compressors = [type(c).__name__ for c in getattr(array, "compressors", ())]
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "dimension_names": list(array.metadata.dimension_names or ()),
        "compressors": compressors,
        "stored_bytes": int(stored),
        # stored bytes include the zarr.json document: no meaningful ratio for tiny arrays
        "compression_ratio": round(array.nbytes / stored, 3) if stored and array.nbytes >= 2**16 else None,
    }


def _json_float(value: float) -> float | str:
    """A float, or "nan" / "inf" as a string: JSON has no non-finite numbers."""
    value = float(value)
    return value if np.isfinite(value) else str(value)


def format_levels(counts: Mapping[str, int]) -> str:
    """``{"avx2": 3, "numpy": 1}`` -> ``"avx2 3 chunks, numpy 1 chunk"``."""
    return ", ".join(f"{level} {n} chunk{'s' if n != 1 else ''}" for level, n in counts.items()) or "no chunks"


def level_runs(levels: Sequence[str], done: np.ndarray) -> list[list]:
    """``[[first, last, level], ...]``: consecutive done chunks that ran at one level (inclusive)."""
    runs: list[list] = []
    for index in np.flatnonzero(done).tolist():
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == levels[index]:
            runs[-1][1] = index
        else:
            runs.append([index, index, levels[index]])
    return runs


def _simd_summary(group: zarr.Group, done: np.ndarray, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The SIMD level the done chunks ran at, from their per-chunk records (``_progress/level``)."""
    levels = read_levels(group)
    runs = level_runs(levels, done)
    return {
        "requested": (provenance.get("simd") or {}).get("requested"),
        "chunks": dict(sorted(Counter(levels[i] for i in np.flatnonzero(done).tolist()).items())),
        "runs": runs[:MAX_LISTED],
        "runs_count": len(runs),
    }


def summarize(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-friendly summary of a dconv output: arrays, status, progress, provenance, norms.

    Raises
    ------
    InputError
        ``url`` does not exist or is not a dconv output.
    """
    location = public_location(url)
    group, provenance = open_output(url, storage_options)
    status = provenance.pop("status", "unknown")
    done = read_done(group)
    summary: dict[str, Any] = {
        "location": location,
        "status": status,
        "complete": status == "complete",
        "chunks": {
            "total": int(done.size),
            "done": int(done.sum()),
            "missing": [int(i) for i in np.flatnonzero(~done)][:MAX_LISTED],
            "missing_count": int((~done).sum()),
        },
        "arrays": {name: _array_summary(group[name]) for name in output_arrays(group)},
        "simd": _simd_summary(group, done, provenance),
        "provenance": provenance,
    }
    if status == "complete":
        summed = [entry.name for entry in OUTPUT_LAYOUT if entry.kind is Kind.SUM and entry.name in summary["arrays"]]
        summary["norms"] = {
            name: _json_float(np.linalg.norm(np.asarray(group[name][...], dtype=np.float64))) for name in summed
        }
        summary.update({entry.name: provenance.get(entry.name, {}) for entry in OUTPUT_LAYOUT if entry.kind is Kind.FIGURE})
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`summarize`'s result."""
    chunks = summary["chunks"]
    lines = [f"{summary['location']}: {summary['status']}"]
    if not summary["complete"]:
        missing = ", ".join(map(str, chunks["missing"]))
        more = " ..." if chunks["missing_count"] > len(chunks["missing"]) else ""
        lines.append(
            f"  INCOMPLETE: {chunks['done']} of {chunks['total']} batch chunks done, "
            f"{chunks['missing_count']} missing ({missing}{more})"
        )
        if "reason" in summary["provenance"]:
            lines.append(f"  reason: {summary['provenance']['reason']}")
    else:
        lines.append(f"  {chunks['done']} of {chunks['total']} batch chunks done")
    lines.append("  arrays:")
    for name, info in summary["arrays"].items():
        ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
        lines.append(
            f"    {name:8s} {str(tuple(info['shape'])):22s} {info['dtype']:8s} chunks {tuple(info['chunks'])} "
            f"dims {tuple(info['dimension_names'])} compression {ratio}"
        )
    lines.extend(_format_simd(summary["simd"]))
    if "norms" in summary:
        norms = (f"|{k}| = {v:.6g}" if isinstance(v, float) else f"|{k}| = {v}" for k, v in summary["norms"].items())
        lines.append("  norms: " + ", ".join(norms))
        nonfinite = summary.get("nonfinite") or {}
        lines.append("  non-finite values: " + ", ".join(f"{k} {v}" for k, v in nonfinite.items()))
    provenance = summary["provenance"]
    lines.append("  provenance:")
    for key in ("input", "params", "shapes", "dtypes", "batch_chunk", "split_every", "versions", "started", "finished", "seconds"):
        if key in provenance:
            lines.append(f"    {key}: {provenance[key]}")
    return "\n".join(lines)


def _format_simd(simd: Mapping[str, Any]) -> list[str]:
    """``  simd: avx2 3 chunks (DCONV_SIMD=auto)``, and which chunks ran where when the levels differ."""
    requested = f" (DCONV_SIMD={simd['requested']})" if simd.get("requested") else ""
    lines = [f"  simd: {format_levels(simd['chunks'])}{requested}"]
    if len(simd["chunks"]) > 1:
        runs = ", ".join(f"{first}-{last} {level}" if last > first else f"{first} {level}"
                         for first, last, level in simd["runs"])
        lines.append(f"    chunks {runs}{' ...' if simd['runs_count'] > len(simd['runs']) else ''}")
    return lines

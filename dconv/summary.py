"""What ``dconv inspect`` reports about an output group.

Reads metadata, the small ``dW``/``db`` arrays and the per-chunk ``done``
flags; never the dA_prev data, so it is cheap on any size of output.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import zarr

from dconv.store import PROGRESS, open_output, public_location

__all__ = ["summarize", "format_summary"]

OUTPUT_ARRAYS = ("dA_prev", "dW", "db")


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
    done = np.asarray(group[f"{PROGRESS}/done"][:]) == 1
    summary: dict[str, Any] = {
        "location": location,
        "status": status,
        "complete": status == "complete",
        "chunks": {
            "total": int(done.size),
            "done": int(done.sum()),
            "missing": [int(i) for i in np.flatnonzero(~done)][:50],
            "missing_count": int((~done).sum()),
        },
        "arrays": {name: _array_summary(group[name]) for name in OUTPUT_ARRAYS},
        "provenance": provenance,
    }
    if status == "complete":
        summary["norms"] = {
            name: _json_float(np.linalg.norm(np.asarray(group[name][...], dtype=np.float64))) for name in ("dW", "db")
        }
        summary["nonfinite"] = provenance.get("nonfinite", {})
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

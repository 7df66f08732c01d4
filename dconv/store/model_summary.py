"""What ``dconv inspect`` reports of a model job's output: the model's status and figures, a line per layer.

The per-layer table and the model's figures come from the root's provenance
(written at the finish), and each layer's status and chunk count from its own
output, so nothing of size m is read.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dconv.errors import InputError
from dconv.statistics import _figure, format_stats
from dconv.store.lease import read_lease
from dconv.store.locations import open_group, public_location
from dconv.store.model_output import ModelOutput
from dconv.store.output import OutputStore
from dconv.store.summary import _format_resume, _json_float, resume_command, status_lines

__all__ = ["is_model_output", "summarize_model", "format_model_summary"]


def is_model_output(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if ``url`` is a model job's output (its root carries the model output's attribute)."""
    return ModelOutput(url, dict(storage_options or {})).provenance() is not None


def _layer_summary(out: ModelOutput, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One layer's name, kind, status, chunks done and, once complete, the norms of its dW and db."""
    store = OutputStore(out.layer_url(entry["name"]), out.storage_options)
    provenance = store.provenance()
    summary: dict[str, Any] = {"name": entry["name"], "kind": entry.get("kind"), "status": "not started"}
    if provenance is None:
        return summary
    done = store.done_chunks()
    summary.update(status=provenance.get("status", "unknown"), chunks={"total": int(done.size), "done": int(done.sum())})
    if summary["status"] == "complete":
        group = open_group(store.url, "r", out.storage_options)
        summary["norms"] = {
            name: _json_float(np.linalg.norm(np.asarray(group[name][...], dtype=np.float64))) for name in ("dW", "db")
        }
    return summary


def summarize_model(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-friendly summary of a model output: status, lease, each layer's status, the model's figures.

    Raises
    ------
    InputError
        ``url`` is not a model output.
    """
    out = ModelOutput(url, dict(storage_options or {}))
    provenance = out.provenance()
    if provenance is None:
        raise InputError(f"{public_location(url)!r} is not a dconv model output.")
    status = provenance.pop("status", "unknown")
    lease = read_lease(url, storage_options)
    lease = None if lease is None else lease.to_dict()
    layers = [_layer_summary(out, entry) for entry in provenance.get("layers_run", [])]
    counted = [layer["chunks"] for layer in layers if "chunks" in layer]
    complete = status == "complete"
    return {
        "kind": "model",
        "location": out.location,
        "status": status,
        "complete": complete,
        "running": status == "running" and lease is not None and lease["fresh"],
        "lease": lease,
        "m": provenance.get("m"),
        "layers": layers,
        "chunks": {"done": sum(c["done"] for c in counted), "total": sum(c["total"] for c in counted)},
        "stats": provenance.get("stats") if complete else None,
        "resume_command": None if complete else resume_command(out.location, provenance),
        "provenance": provenance,
    }


def format_model_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`summarize_model`'s result."""
    status, layers = summary["status"], summary["layers"]
    lines = status_lines(summary, f"{summary['location']}: {status} (model of {len(layers)} layers, m = {summary['m']})")
    if not summary["complete"]:
        chunks = summary["chunks"]
        lines.append(f"  INCOMPLETE: {chunks['done']} of {chunks['total']} batch chunks of the started layers done")
        provenance = summary["provenance"]
        if status == "interrupted":
            lines.append(f"  interrupted by {provenance.get('signal', 'a signal')} at {provenance.get('interrupted', '?')}")
        elif "reason" in provenance:
            lines.append(f"  reason: {provenance['reason']}")
        lines.append(_format_resume({**summary, "provenance": {"input": provenance.get("input", "")}}))
    table = {row["name"]: row for row in (summary.get("stats") or {}).get("layers", [])}
    lines.append("  layers:")
    width = max((len(layer["name"]) for layer in layers), default=5)
    for layer in layers:
        chunks = layer.get("chunks")
        line = f"    {layer['name']:{width}s} {layer['kind'] or '?':7s} {layer['status']}"
        if chunks:
            line += f", {chunks['done']} of {chunks['total']} chunks"
        if "norms" in layer:
            line += ", " + ", ".join(f"|{name}| = {value:.6g}" for name, value in layer["norms"].items())
        row = table.get(layer["name"])
        if row:
            line += (f"; share of sum_i |g_i|^2 {_percent(row['share_sum_sample_norm2'])}, of |S|^2 "
                     f"{_percent(row['share_grad_sum_norm2'])}, layer noise scale {_figure(row['noise_scale'])}")
        lines.append(line)
    if isinstance(summary.get("stats"), Mapping):
        lines.extend(line.replace("gradient statistics", "the model's gradient statistics", 1)
                     for line in format_stats(summary["stats"]))
    provenance = summary["provenance"]
    lines.append("  provenance:")
    for key in ("input", "sample_index", "layers", "cluster", "versions", "started", "resumed", "finished", "seconds"):
        if key in provenance and provenance[key] not in ({}, None):
            lines.append(f"    {key}: {provenance[key]}")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}%"

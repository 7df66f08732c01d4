"""What ``dconv inspect`` reports of a score output: status, mode, sizes, blocks done, the first queries' lists."""

from __future__ import annotations

from typing import Any, Mapping

from dconv.errors import InputError
from dconv.store.lease import read_lease
from dconv.store.score_output import ScoreOutput, resume_command
from dconv.store.summary import status_lines
from dconv.tree import covered, frontier

__all__ = ["is_score_output", "summarize_score", "format_score_summary", "SHOWN_QUERIES"]

SHOWN_QUERIES = 3
"""Queries whose lists a complete output's summary shows."""

def is_score_output(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if ``url`` is a score output (its root carries ``dconv_score``)."""
    return ScoreOutput(url, dict(storage_options or {})).provenance() is not None


def summarize_score(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-friendly summary of a score output (``"kind": "score"``).

    Raises
    ------
    InputError
        ``url`` is not a score output.
    """
    out = ScoreOutput(url, dict(storage_options or {}))
    provenance = out.provenance()
    if provenance is None:
        raise InputError(f"{out.location!r} is not a dconv score output.")
    status = provenance.pop("status", "unknown")
    complete = status == "complete"
    lease = read_lease(url, storage_options)
    lease = None if lease is None else lease.to_dict()
    m_train, block = int(provenance.get("m_train", 0)), int(provenance.get("block", 1))
    n_blocks, split_every = -(-m_train // max(block, 1)), int(provenance.get("split_every", 8))
    done = n_blocks if complete else int(covered(frontier(out.records.list(), n_blocks, split_every), n_blocks,
                                                   split_every).sum())
    summary: dict[str, Any] = {
        "kind": "score",
        "location": out.location,
        "status": status,
        "complete": complete,
        "running": status == "running" and lease is not None and lease["fresh"],
        "lease": lease,
        "blocks": {"total": n_blocks, "done": done},
        "provenance": provenance,
        "resume_command": None,
        "first_queries": None,
    }
    if complete:
        summary["first_queries"] = {name: out.read_top(name, SHOWN_QUERIES).tolist()
                                    for name in ("positive_index", "negative_index")}
    else:
        summary["resume_command"] = resume_command(out.location, provenance)
    return summary


def format_score_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`summarize_score`'s result."""
    provenance, blocks = summary["provenance"], summary["blocks"]
    lines = status_lines(summary, f"{summary['location']}: {summary['status']} (score output)")
    lines.append(f"  mode {provenance.get('mode')}, {provenance.get('m_train')} train x {provenance.get('m_query')} "
                 f"query samples, top {provenance.get('top')}, normalize {provenance.get('normalize')}, "
                 f"full {provenance.get('full')}, blocks of {provenance.get('block')}")
    if not summary["complete"]:
        lines.append(f"  INCOMPLETE: {blocks['done']} of {blocks['total']} blocks done")
        if summary["status"] == "interrupted":
            lines.append(f"  interrupted by {provenance.get('signal', 'a signal')} at {provenance.get('interrupted', '?')}")
        elif "reason" in provenance:
            lines.append(f"  reason: {provenance['reason']}")
        if summary["running"]:
            lines.append("  a job is writing it: wait for it; a resume is refused while its lease is fresh")
        else:
            lines.append(f"  resume with: {summary['resume_command']}")
    else:
        lines.append(f"  {blocks['done']} of {blocks['total']} blocks done")
        first = summary["first_queries"]
        for j, (positive, negative) in enumerate(zip(first["positive_index"], first["negative_index"])):
            lines.append(f"  query {j}: largest {positive}, smallest {negative}")
    lines.append("  provenance:")
    for key in ("train", "query", "cluster", "versions", "started", "resumed", "finished", "seconds"):
        if provenance.get(key) not in ({}, None):
            lines.append(f"    {key}: {provenance[key]}")
    return "\n".join(lines)

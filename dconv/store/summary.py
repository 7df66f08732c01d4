"""What ``dconv inspect`` reports about an output group.

Reads metadata, the summed arrays (``dW``, ``db``), which chunks are done and
the SIMD levels they ran at (one listing of the records and their level codes,
or one array once the job is complete); never a block array (``dA_prev``), so
it is cheap on any size of output. Which arrays there are comes from the output layout table. For
an output that is not complete it names the missing chunks, as ranges, and the
command that resumes its job (:func:`resume_command`). It shows the lease of the
job that writes the output (:mod:`dconv.store.lease`), and calls an output
"running" only while that lease's heartbeat is fresh.
"""

from __future__ import annotations

import shlex
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from dconv.errors import InputError
from dconv.options import JobOptions
from dconv.statistics import STATS, format_stats
from dconv.store.layout import OUTPUT_LAYOUT, Kind
from dconv.store.lease import read_lease
from dconv.store.locations import is_local, public_location
from dconv.store.output import OutputStore, open_output, output_arrays

__all__ = ["summarize", "format_summary", "format_levels", "format_ranges", "chunk_ranges", "resume_command"]

def nonfinite_advice(flags: bool = False) -> str:
    """What to do about a result that is not finite, as the job's warning and ``inspect`` say it: in the
    Python API's words, or (``flags``) the command line's."""
    check, overwrite = ("--check-finite", "--overwrite") if flags else ("check_finite=True", "overwrite=True")
    return f"a run with {check} to another out (or with {overwrite}) names the first chunk that holds them"

MAX_LISTED = 50
"""Longest list of chunk ranges (missing ones, level runs) a summary spells out."""


def _array_summary(array: zarr.Array, complete: bool) -> dict[str, Any]:
    """Shape, dtype, chunks, dimension names, codecs, stored bytes; the compression ratio only of a complete output
    (an unfinished one has chunks not written yet, which would count as compressed away).

    An uncompressed array (dconv writes its outputs so) is not listed: a complete one
    stores exactly its bytes, since every chunk is written, and an unfinished one's
    stored bytes are None. Listing a ``dA_prev`` of 100,000 chunks took 28 s.
    """
    compressors = [type(c).__name__ for c in getattr(array, "compressors", ())]
    if compressors:
        stored = array.nbytes_stored()
    else:
        stored = array.nbytes if complete else None
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "dimension_names": list(array.metadata.dimension_names or ()),
        "compressors": compressors,
        "stored_bytes": None if stored is None else int(stored),
        # stored bytes include the zarr.json document: no meaningful ratio for tiny arrays
        "compression_ratio": round(array.nbytes / stored, 3) if complete and stored and array.nbytes >= 2**16 else None,
    }


def _json_float(value: float) -> float | str:
    """A float, or "nan" / "inf" as a string: JSON has no non-finite numbers."""
    value = float(value)
    return value if np.isfinite(value) else str(value)


def format_levels(counts: Mapping[str, int]) -> str:
    """``{"avx2": 3, "numpy": 1}`` -> ``"avx2 3 chunks, numpy 1 chunk"``."""
    return ", ".join(f"{level} {n} chunk{'s' if n != 1 else ''}" for level, n in counts.items()) or "no chunks"


def chunk_ranges(mask: np.ndarray) -> list[list[int]]:
    """``[[first, last], ...]``: the runs of consecutive True entries of ``mask`` (inclusive), in order."""
    indices = np.flatnonzero(mask)
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) > 1)
    firsts = np.concatenate(([indices[0]], indices[breaks + 1]))
    lasts = np.concatenate((indices[breaks], [indices[-1]]))
    return [[int(first), int(last)] for first, last in zip(firsts, lasts)]


def format_ranges(ranges: Sequence[Sequence[int]]) -> str:
    """``[[0, 3], [7, 7], [9, 10]]`` -> ``"0-3, 7, 9, 10"``: a run of three or more as ``first-last``."""
    parts = []
    for first, last in ranges:
        parts.append(f"{first}-{last}" if last - first >= 2 else ", ".join(map(str, range(first, last + 1))))
    return ", ".join(parts)


def resume_command(location: str, provenance: Mapping[str, Any]) -> str | None:
    """The command line that continues the job of the output at ``location``: ``dconv backward IN OUT --resume``.

    A resume takes the job's options from the output itself
    (:meth:`dconv.options.JobOptions.resuming`), so the command names only the
    input, the output and where the job ran: the cluster flags recorded in the
    provenance (``--scheduler``, ``--scheduler-file``, ``--workers``, TLS),
    generated from :class:`dconv.cluster.ClusterOptions`. Storage options are
    never recorded: a job on fsspec URLs needs its ``--storage-option`` flags added.

    Returns
    -------
    str or None
        None for a job on in-memory arrays (nothing to name on a command line).
    """
    from dconv.cluster import ClusterOptions

    source = provenance.get("input")
    if not isinstance(source, str) or source.startswith("<"):
        return None
    try:
        cluster = ClusterOptions.from_dict(provenance.get("cluster") or {})
    except InputError:  # a recorded cluster this dconv no longer accepts: resume on the embedded one
        cluster = ClusterOptions()
    return shlex.join(["dconv", "backward", source, location, "--resume", *cluster.flags()])


def level_runs(levels: Sequence[str], done: np.ndarray) -> list[list]:
    """``[[first, last, level], ...]``: consecutive done chunks that ran at one level (inclusive)."""
    runs: list[list] = []
    for index in np.flatnonzero(done).tolist():
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == levels[index]:
            runs[-1][1] = index
        else:
            runs.append([index, index, levels[index]])
    return runs


def _simd_summary(levels: Sequence[str], done: np.ndarray, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The SIMD level the done chunks ran at (``levels``, one per chunk)."""
    runs = level_runs(levels, done)
    return {
        "requested": (provenance.get("simd") or {}).get("requested"),
        "chunks": dict(sorted(Counter(levels[i] for i in np.flatnonzero(done).tolist()).items())),
        "runs": runs[:MAX_LISTED],
        "runs_count": len(runs),
    }


def summarize(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-friendly summary of a dconv output: arrays, status, progress, provenance, norms.

    ``chunks["missing"]`` lists the missing chunks as ``[first, last]`` ranges
    (at most :data:`MAX_LISTED`); ``resume_command`` is the command line that
    continues an output that is not complete (None once it is, or for a job on
    in-memory arrays); ``compression_ratio`` is None for every array of an
    output that is not complete. ``lease`` is the lease on the output
    (:meth:`dconv.store.lease.LeaseInfo.to_dict`: holder, heartbeat, its
    ``age`` in seconds and whether it is ``fresh``), None if no job holds one;
    ``running`` is True only for a "running" output whose lease is fresh.

    A model job's output is summarised by :func:`dconv.store.model_summary.summarize_model`
    (``"kind": "model"``), a score output by :func:`dconv.store.score_summary.summarize_score`
    (``"kind": "score"``).

    Raises
    ------
    InputError
        ``url`` does not exist or is not a dconv output.
    """
    from dconv.store.model_summary import is_model_output, summarize_model
    from dconv.store.score_summary import is_score_output, summarize_score

    if is_model_output(url, storage_options):
        return summarize_model(url, storage_options)
    if is_score_output(url, storage_options):
        return summarize_score(url, storage_options)
    location = public_location(url)
    group, provenance = open_output(url, storage_options)
    status = provenance.pop("status", "unknown")
    complete = status == "complete"
    progress = OutputStore(url, dict(storage_options or {})).progress()
    done = progress.done
    lease = read_lease(url, storage_options)
    lease = None if lease is None else lease.to_dict()
    summary: dict[str, Any] = {
        "location": location,
        "status": status,
        "complete": complete,
        "running": status == "running" and lease is not None and lease["fresh"],
        "lease": lease,
        "chunks": {
            "total": int(done.size),
            "done": int(done.sum()),
            "missing": chunk_ranges(~done)[:MAX_LISTED],
            "missing_count": int((~done).sum()),
        },
        "arrays": {name: _array_summary(group[name], complete) for name in output_arrays(group)},
        "simd": _simd_summary(progress.levels, done, provenance),
        "resume_command": None if complete else resume_command(location, provenance),
        "provenance": provenance,
    }
    if status == "complete":
        summed = [  # the gradients' own sums; the statistics' figures say more than their norms
            entry.name
            for entry in OUTPUT_LAYOUT
            if entry.kind is Kind.REDUCE and entry.name in summary["arrays"] and entry.part != STATS
        ]
        summary["norms"] = {
            name: _json_float(np.linalg.norm(np.asarray(group[name][...], dtype=np.float64))) for name in summed
        }
        summary.update(
            {entry.name: provenance[entry.name] for entry in OUTPUT_LAYOUT if entry.kind is Kind.FIGURE and entry.name in provenance}
        )
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`summarize`'s result."""
    if summary.get("kind") == "model":
        from dconv.store.model_summary import format_model_summary

        return format_model_summary(summary)
    if summary.get("kind") == "score":
        from dconv.store.score_summary import format_score_summary

        return format_score_summary(summary)
    chunks, provenance, status = summary["chunks"], summary["provenance"], summary["status"]
    lines = status_lines(summary, f"{summary['location']}: {status}")
    if not summary["complete"]:
        listed = sum(last - first + 1 for first, last in chunks["missing"])
        more = " ..." if chunks["missing_count"] > listed else ""
        lines.append(
            f"  INCOMPLETE: {chunks['done']} of {chunks['total']} batch chunks done, "
            f"{chunks['missing_count']} missing ({format_ranges(chunks['missing'])}{more})"
        )
        if status == "interrupted":
            signal, when = provenance.get("signal", "a signal"), provenance.get("interrupted", "?")
            lines.append(f"  interrupted by {signal} at {when}")
        elif "reason" in provenance:
            lines.append(f"  reason: {provenance['reason']}")
        lines.append(_format_resume(summary))
    else:
        lines.append(f"  {chunks['done']} of {chunks['total']} batch chunks done")
    lines.append("  arrays:")
    width = max((len(name) for name in summary["arrays"]), default=8)
    for name, info in summary["arrays"].items():
        ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
        lines.append(
            f"    {name:{width}s} {str(tuple(info['shape'])):22s} {info['dtype']:8s} chunks {tuple(info['chunks'])} "
            f"dims {tuple(info['dimension_names'])} compression {ratio}"
        )
    lines.extend(_format_simd(summary["simd"]))
    if "norms" in summary:
        norms = (f"|{k}| = {v:.6g}" if isinstance(v, float) else f"|{k}| = {v}" for k, v in summary["norms"].items())
        lines.append("  norms: " + ", ".join(norms))
        nonfinite = summary.get("nonfinite") or {}
        lines.append("  non-finite values: " + ", ".join(f"{k} {v}" for k, v in nonfinite.items()))
        if nonfinite.get("dW") or nonfinite.get("db"):
            lines.append(f"  warning: the result is not finite, so the inputs hold NaN or Inf; {nonfinite_advice(flags=True)}")
    if isinstance(summary.get("stats"), Mapping):
        lines.extend(format_stats(summary["stats"]))
    lines.append("  provenance:")
    keys = ("input", "shapes", "dtypes", *JobOptions.recorded_keys(), "cluster", "versions", "started", "resumed",
            "finished", "seconds")
    for key in keys:
        if key in provenance and provenance[key] not in ({}, None):
            lines.append(f"    {key}: {provenance[key]}")
    return "\n".join(lines)


def status_lines(summary: Mapping[str, Any], first: str) -> list[str]:
    """``first`` (the location and status), or that the job is not running any more, then the lease's line."""
    lines = [first]
    if summary["status"] == "running" and not summary["running"]:
        held = "its lease is stale" if summary["lease"] else "no job holds its lease"
        lines = [f"{summary['location']}: not running any more (its status says running, but {held}: "
                 "its job was killed or lost its node)"]
    if summary["lease"]:
        lines.append(_format_lease(summary["lease"]))
    return lines


def _format_lease(lease: Mapping[str, Any]) -> str:
    """``  lease: held by host h pid 123 (id ...), heartbeat 3 s ago``, and whether it is stale."""
    line = f"  lease: held by host {lease['host']} pid {lease['pid']} (id {lease['id']}), heartbeat {lease['age']:.0f} s ago"
    if not lease["fresh"]:
        line += f": stale (its timeout is {lease['timeout']:g} s), the next job on it takes it over"
    return line


def _format_resume(summary: Mapping[str, Any]) -> str:
    """``  resume with: dconv backward ... --resume ...``, with what to watch for."""
    command = summary["resume_command"]
    if summary["running"]:  # a job holds it: a resume is refused until that job ends or goes silent
        return "  a job is writing it: wait for it; a resume is refused while its lease is fresh"
    if command is None:
        return "  resume: run the job again on the same arrays with resume=True"
    if not all(is_local(where) for where in (summary["location"], summary["provenance"]["input"])):
        command += "  (add the job's --storage-option flags)"
    return f"  resume with: {command}"


def _format_simd(simd: Mapping[str, Any]) -> list[str]:
    """``  simd: avx2 3 chunks (DCONV_SIMD=auto)``, and which chunks ran where when the levels differ."""
    requested = f" (DCONV_SIMD={simd['requested']})" if simd.get("requested") else ""
    lines = [f"  simd: {format_levels(simd['chunks'])}{requested}"]
    if len(simd["chunks"]) > 1:
        runs = ", ".join(f"{first}-{last} {level}" if last > first else f"{first} {level}"
                         for first, last, level in simd["runs"])
        lines.append(f"    chunks {runs}{' ...' if simd['runs_count'] > len(simd['runs']) else ''}")
    return lines

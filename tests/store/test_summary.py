"""dconv.summary: what `dconv inspect` reports about complete and unfinished outputs."""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputError, simd
from dconv.cli import build_parser
from dconv.plan import plan_job
from dconv.store import LEVEL_CODES
from dconv.store.summary import (
    chunk_ranges,
    format_levels,
    format_ranges,
    format_summary,
    level_runs,
    resume_command,
    summarize,
)

from _pipeline import read_output


@pytest.fixture
def complete_output(make_input, tmp_path):
    inp = make_input(m=10, chunk=4, padding=1)
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=3, split_every=2, scheduler="threads")
    return inp, out


def test_summary_of_a_complete_output(complete_output):
    inp, out = complete_output
    summary = summarize(str(out))
    json.dumps(summary)  # JSON-friendly
    assert summary["location"] == str(out)
    assert (summary["status"], summary["complete"]) == ("complete", True)
    assert summary["chunks"] == {"total": 4, "done": 4, "missing": [], "missing_count": 0}
    assert summary["resume_command"] is None
    arrays = summary["arrays"]
    assert arrays["dA_prev"]["shape"] == [10, 8, 8, 3] and arrays["dA_prev"]["chunks"] == [3, 8, 8, 3]
    assert arrays["dA_prev"]["dimension_names"] == ["m", "n_H_prev", "n_W_prev", "C_prev"]
    assert arrays["dW"]["dimension_names"] == ["fh", "fw", "C_prev", "C"]
    assert all(info["dtype"] == "float64" for info in arrays.values())
    assert [info["stored_bytes"] for info in arrays.values()] == [8 * 10 * 8 * 8 * 3, 8 * 3 * 3 * 3 * 4, 8 * 4]
    output = read_output(out)
    assert summary["norms"]["dW"] == pytest.approx(np.linalg.norm(output["dW"]), rel=1e-15)
    assert summary["norms"]["db"] == pytest.approx(np.linalg.norm(output["db"]), rel=1e-15)
    assert summary["nonfinite"] == {"dA_prev": 0, "dW": 0, "db": 0}
    provenance = summary["provenance"]
    assert "status" not in provenance
    assert provenance["input"] == inp and provenance["batch_chunk"] == 3
    word = simd.parse_word(os.environ.get("DCONV_SIMD"))
    level = simd.resolve_level(word)
    assert provenance["simd"] == {"requested": word, "chunks": {level: 4}}
    assert summary["simd"] == {"requested": word, "chunks": {level: 4}, "runs": [[0, 3, level]], "runs_count": 1}


def test_format_summary_of_a_complete_output(complete_output):
    _, out = complete_output
    text = format_summary(summarize(str(out)))
    lines = text.splitlines()
    assert lines[0] == f"{out}: complete"
    assert lines[1] == "  4 of 4 batch chunks done"
    assert "INCOMPLETE" not in text and "resume" not in text
    assert any(line.strip().startswith("dA_prev") and "(10, 8, 8, 3)" in line and "chunks (3, 8, 8, 3)" in line
               and "dims ('m', 'n_H_prev', 'n_W_prev', 'C_prev')" in line for line in lines)
    assert "  norms: |dW| = " in text and "non-finite values: dA_prev 0, dW 0, db 0" in text
    assert "    batch_chunk: 3" in lines and "    split_every: 2" in lines
    word = simd.parse_word(os.environ.get("DCONV_SIMD"))
    assert f"  simd: {simd.resolve_level(word)} 4 chunks (DCONV_SIMD={word})" in lines
    assert not any(line.startswith("    chunks ") for line in lines)  # one level: no per-chunk list


@pytest.mark.parametrize("m, batch_chunk", [(6, 2), (60, 1)])
def test_summary_of_an_output_that_never_ran(make_input, tmp_path, m, batch_chunk):
    """Layout created, no chunk done: incomplete, every chunk missing, as one range; status "running"."""
    inp = make_input(m=m, chunk=7, height=4, width=4)
    out = tmp_path / "out.zarr"
    plan_job(inp, out, batch_chunk=batch_chunk).open_output()
    summary = summarize(str(out))
    n_chunks = -(-m // batch_chunk)
    assert (summary["status"], summary["complete"]) == ("running", False)
    assert summary["chunks"]["missing"] == [[0, n_chunks - 1]]
    assert summary["chunks"]["missing_count"] == n_chunks and summary["chunks"]["done"] == 0
    assert "norms" not in summary
    assert summary["simd"]["chunks"] == {} and summary["simd"]["runs_count"] == 0
    text = format_summary(summary)
    assert "  simd: no chunks (DCONV_SIMD=" in text
    assert f"INCOMPLETE: 0 of {n_chunks} batch chunks done, {n_chunks} missing (0-{n_chunks - 1})" in text
    # a "running" output that no job holds the lease of: not running any more, and resumable
    command = f"dconv backward {inp} {out} --resume"
    assert text.startswith(f"{out}: not running any more (its status says running, but no job holds its lease")
    assert f"  resume with: {command}" in text


def test_missing_chunks_are_listed_as_at_most_50_ranges(make_input, tmp_path):
    """Every other chunk of 120 done: 60 one-chunk gaps, of which the first 50 are listed, then "..."."""
    inp = make_input(m=120, chunk=8, height=4, width=4)
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=1)
    plan.open_output()
    for index in range(0, 120, 2):  # chunks 0, 2, ... run, as a worker runs them
        plan.run_chunk(index)
    summary = summarize(str(out))
    assert summary["chunks"]["missing"] == [[i, i] for i in range(1, 101, 2)]
    assert summary["chunks"]["missing_count"] == 60 and summary["chunks"]["done"] == 60
    line = format_summary(summary).splitlines()[1]
    listed = ", ".join(map(str, range(1, 101, 2)))
    assert line == f"  INCOMPLETE: 60 of 120 batch chunks done, 60 missing ({listed} ...)"


@pytest.mark.parametrize(
    "mask, ranges, text",
    [
        ([], [], ""),
        ([0, 0], [], ""),
        ([1], [[0, 0]], "0"),
        ([1, 1], [[0, 1]], "0, 1"),
        ([1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1], [[0, 3], [7, 7], [9, 11]], "0-3, 7, 9-11"),
        ([0, 1, 1, 0, 1, 1, 1], [[1, 2], [4, 6]], "1, 2, 4-6"),
    ],
)
def test_chunk_ranges_and_format_ranges(mask, ranges, text):
    assert chunk_ranges(np.array(mask, dtype=bool)) == ranges
    assert format_ranges(ranges) == text


# the input's hparameters (what make_inputs writes) and the flags the resume command must carry
CONV_FORMS = [
    pytest.param(dict(stride=1, padding=1, dilation=1), "--stride 1 --padding 1 --dilation 1", id="defaults"),
    pytest.param(dict(stride=[2, 1], padding=[1, 2, 0, 1], dilation=2), "--stride 2,1 --padding 1,2,0,1 --dilation 2",
                 id="asymmetric"),
    pytest.param(dict(stride=2, padding=[2, 1], dilation=[1, 2]), "--stride 2 --padding 2,1 --dilation 1,2",
                 id="pairs"),
    pytest.param(dict(stride=2, padding="same", dilation=1), "--stride 2 --padding same --dilation 1", id="same"),
]


@pytest.mark.parametrize("conv, flags", CONV_FORMS)
def test_the_resume_command_resumes_the_job(make_input, tmp_path, monkeypatch, conv, flags):
    """The command inspect prints, parsed by the CLI's own parser, plans a job of the same fingerprint,
    which finishes the output. The job took its conv parameters from the input's hparameters, and the
    resume takes them (and the batch chunk, fan-in and SIMD level) from the output."""
    monkeypatch.setattr(simd, "_active", None)  # in-process chunk tasks set this process's level
    inp, out = make_input(m=9, chunk=3, height=9, width=9, kernel=3, **conv), tmp_path / "out dir" / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=3, split_every=2, simd="numpy")
    plan.open_output()
    plan.run_chunk(1)
    plan.out.mark_interrupted("SIGTERM")

    summary = summarize(str(out))
    command = summary["resume_command"]
    assert command == shlex.join(["dconv", "backward", inp, str(out), "--resume"])  # the options are the output's
    assert summary["chunks"]["missing"] == [[0, 0], [2, 2]]
    lines = format_summary(summary).splitlines()
    assert lines[1] == "  INCOMPLETE: 1 of 3 batch chunks done, 2 missing (0, 2)"
    assert lines[2].startswith("  interrupted by SIGTERM at ")
    datetime.fromisoformat(lines[2].rsplit(" ", 1)[1])
    assert lines[3] == f"  resume with: {command}"

    words = shlex.split(command)
    assert words[:2] == ["dconv", "backward"]
    args = build_parser().parse_args(words[1:])
    resumed = plan_job(args.inputs, args.out, dconv.JobOptions.build(None, **dconv.JobOptions.given(args)))
    assert resumed.fingerprint == plan.fingerprint == summary["provenance"]["fingerprint"]
    result = dconv.run_job(resumed, scheduler="threads")
    assert result.computed_chunks == 2 and summarize(str(out))["complete"]


def test_no_resume_command_for_in_memory_inputs(rng, tmp_path):
    arrays = {"A_prev": rng.standard_normal((4, 5, 5, 2)), "dZ": rng.standard_normal((4, 3, 3, 3)),
              "W": rng.standard_normal((3, 3, 2, 3))}
    out = tmp_path / "out.zarr"
    plan_job(arrays, out, batch_chunk=2).open_output()
    summary = summarize(str(out))
    assert summary["resume_command"] is None
    assert "  resume: run the job again on the same arrays with resume=True" in format_summary(summary).splitlines()
    assert resume_command(str(out), {"input": "<arrays>"}) is None


def test_no_compression_ratio_until_the_output_is_complete(make_input, tmp_path, monkeypatch):
    """An unfinished dA_prev has chunks not yet written; they would count as compressed away."""
    monkeypatch.setattr(simd, "_active", None)
    inp, out = make_input(m=64, chunk=16, in_channels=16), tmp_path / "out.zarr"  # dA_prev 512 KiB
    plan = plan_job(inp, out, batch_chunk=16)
    plan.open_output()
    plan.run_chunk(0)
    summary = summarize(str(out))
    assert [info["compression_ratio"] for info in summary["arrays"].values()] == [None, None, None]
    assert [info["stored_bytes"] for info in summary["arrays"].values()] == [None, None, None]  # not listed
    assert json.loads(json.dumps(summary))["arrays"]["dA_prev"]["compression_ratio"] is None
    dA_prev_line = next(line for line in format_summary(summary).splitlines() if line.strip().startswith("dA_prev"))
    assert dA_prev_line.endswith("compression n/a")

    dconv.backward_job(inp, out, batch_chunk=16, resume=True, scheduler="threads")
    ratio = summarize(str(out))["arrays"]["dA_prev"]["compression_ratio"]
    assert ratio == pytest.approx(1.0, abs=0.01)  # stored uncompressed: every chunk written, no ratio to speak of


def test_summary_reports_the_failure_reason(make_input, tmp_path):
    inp = make_input(m=4)
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=2)
    plan.open_output()
    plan.out.update(status="failed", reason="RuntimeError: boom")
    summary = summarize(str(out))
    assert summary["status"] == "failed" and not summary["complete"]
    lines = format_summary(summary).splitlines()
    assert "  reason: RuntimeError: boom" in lines
    assert f"  resume with: {summary['resume_command']}" in lines
    plan.out.mark_failed(RuntimeError())  # no message: no dangling colon
    assert summarize(str(out))["provenance"]["reason"] == "RuntimeError"


@pytest.mark.parametrize("kind", ["missing", "plain_group"])
def test_summary_of_something_else(tmp_path, kind):
    path = tmp_path / "x.zarr"
    if kind == "plain_group":
        zarr.create_group(store=str(path), zarr_format=3)
    with pytest.raises(InputError, match="does not exist|not a dconv output"):
        summarize(str(path))


def test_summary_of_a_job_resumed_at_another_level(make_input, tmp_path, monkeypatch):
    """Chunk 1 ran at numpy, then the job was killed and resumed at auto: inspect says which chunk ran where."""
    auto = simd.resolve_level("auto")
    if auto == "numpy":
        pytest.skip("the compiled loops were not built")
    monkeypatch.setattr(simd, "_active", None)  # in-process chunk tasks set this process's level
    inp, out = make_input(m=20, chunk=7), tmp_path / "out.zarr"  # chunks of 7, 7 and 6 samples
    plan = plan_job(inp, out, batch_chunk=7, simd="numpy")
    plan.open_output()
    plan.run_chunk(1)
    killed = summarize(str(out))
    assert killed["simd"] == {"requested": "numpy", "chunks": {"numpy": 1}, "runs": [[1, 1, "numpy"]], "runs_count": 1}
    assert "  simd: numpy 1 chunk (DCONV_SIMD=numpy)" in format_summary(killed).splitlines()

    dconv.backward_job(inp, out, batch_chunk=7, resume=True, simd="auto", scheduler="threads")
    summary = summarize(str(out))
    assert summary["simd"]["chunks"] == {auto: 2, "numpy": 1}
    assert summary["simd"]["runs"] == [[0, 0, auto], [1, 1, "numpy"], [2, 2, auto]]
    assert summary["provenance"]["simd"] == {"requested": "auto", "chunks": {auto: 2, "numpy": 1}}
    lines = format_summary(summary).splitlines()
    assert f"  simd: {auto} 2 chunks, numpy 1 chunk (DCONV_SIMD=auto)" in lines
    assert f"    chunks 0 {auto}, 1 numpy, 2 {auto}" in lines


def test_level_runs_and_format_levels():
    levels = ["avx2"] * 4 + ["numpy"] * 2 + ["unknown"]
    done = np.array([1, 1, 0, 1, 1, 1, 1], dtype=bool)
    assert level_runs(levels, done) == [[0, 1, "avx2"], [3, 3, "avx2"], [4, 5, "numpy"], [6, 6, "unknown"]]
    assert level_runs(levels, np.zeros(7, dtype=bool)) == []
    assert format_levels({"avx2": 3, "numpy": 1}) == "avx2 3 chunks, numpy 1 chunk"
    assert format_levels({}) == "no chunks"


def _as_written_before_records(out, done, status):
    """Rewrite a finished output's bookkeeping as dconv wrote it before the tree records:
    ``_progress/done``, ``level`` and ``nonfinite``, one Zarr chunk per batch chunk."""
    group = zarr.open_group(str(out), mode="r+")
    n_chunks = len(done)
    codes = group["_progress/level"][:]
    del group["_progress/level"]
    progress = group["_progress"]
    for name, values in (("done", np.asarray(done, dtype="uint8")), ("level", codes * np.asarray(done, dtype="uint8"))):
        progress.create_array(name, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, overwrite=True)[...] = values
    progress["level"].attrs["codes"] = list(LEVEL_CODES)
    progress.create_array("nonfinite", shape=(n_chunks,), chunks=(1,), dtype="int64", fill_value=0, overwrite=True)
    provenance = dict(group.attrs["dconv"])
    provenance.pop("sums", None)
    group.attrs["dconv"] = {**provenance, "status": status}


def test_outputs_written_before_the_records_are_still_read(make_input, tmp_path):
    inp = make_input(m=6, chunk=2, height=4, width=4)
    out = tmp_path / "out.zarr"
    first = dconv.backward_job(inp, out, batch_chunk=2, scheduler="threads")
    _as_written_before_records(out, [1, 1, 1], "complete")
    summary = summarize(str(out))
    assert summary["chunks"]["done"] == 3 and summary["complete"]
    again = dconv.backward_job(inp, out, batch_chunk=2, scheduler="threads", resume=True)
    assert again.already_complete and again.nonfinite == first.nonfinite
    np.testing.assert_array_equal(again.dW, first.dW)

    _as_written_before_records(out, [1, 0, 1], "interrupted")
    summary = summarize(str(out))
    assert (summary["chunks"]["done"], summary["chunks"]["missing"]) == (2, [[1, 1]])
    with pytest.raises(InputError, match="written by an earlier dconv.*overwrite=True"):
        dconv.backward_job(inp, out, batch_chunk=2, scheduler="threads", resume=True)

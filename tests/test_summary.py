"""dconv.summary: what `dconv inspect` reports about complete and unfinished outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputError, simd
from dconv.plan import plan_job
from dconv.store.summary import format_levels, format_summary, level_runs, summarize

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
    arrays = summary["arrays"]
    assert arrays["dA_prev"]["shape"] == [10, 8, 8, 3] and arrays["dA_prev"]["chunks"] == [3, 8, 8, 3]
    assert arrays["dA_prev"]["dimension_names"] == ["m", "H", "W", "C_prev"]
    assert arrays["dW"]["dimension_names"] == ["fh", "fw", "C_prev", "C"]
    assert all(info["dtype"] == "float64" for info in arrays.values())
    assert all(info["stored_bytes"] > 0 for info in arrays.values())
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
    assert "INCOMPLETE" not in text
    assert any(line.strip().startswith("dA_prev") and "(10, 8, 8, 3)" in line and "chunks (3, 8, 8, 3)" in line
               and "dims ('m', 'H', 'W', 'C_prev')" in line for line in lines)
    assert "  norms: |dW| = " in text and "non-finite values: dA_prev 0, dW 0, db 0" in text
    assert "    batch_chunk: 3" in lines and "    split_every: 2" in lines
    word = simd.parse_word(os.environ.get("DCONV_SIMD"))
    assert f"  simd: {simd.resolve_level(word)} 4 chunks (DCONV_SIMD={word})" in lines
    assert not any(line.startswith("    chunks ") for line in lines)  # one level: no per-chunk list


@pytest.mark.parametrize("m, batch_chunk, shown_more", [(6, 2, False), (60, 1, True)])
def test_summary_of_an_output_that_never_ran(make_input, tmp_path, m, batch_chunk, shown_more):
    """Layout created, no chunk done: incomplete, every chunk missing (the list is capped at 50)."""
    inp = make_input(m=m, chunk=7, height=4, width=4)
    out = tmp_path / "out.zarr"
    plan_job(inp, out, batch_chunk=batch_chunk).open_output()
    summary = summarize(str(out))
    n_chunks = -(-m // batch_chunk)
    assert (summary["status"], summary["complete"]) == ("running", False)
    assert summary["chunks"]["missing"] == list(range(min(n_chunks, 50)))
    assert summary["chunks"]["missing_count"] == n_chunks and summary["chunks"]["done"] == 0
    assert "norms" not in summary
    assert summary["simd"]["chunks"] == {} and summary["simd"]["runs_count"] == 0
    text = format_summary(summary)
    assert "  simd: no chunks (DCONV_SIMD=" in text
    assert f"INCOMPLETE: 0 of {n_chunks} batch chunks done, {n_chunks} missing" in text
    assert text.splitlines()[1].endswith(" ...)") == shown_more


def test_summary_reports_the_failure_reason(make_input, tmp_path):
    inp = make_input(m=4)
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=2)
    plan.open_output()
    plan.out.update_provenance(status="failed", reason="RuntimeError: boom")
    summary = summarize(str(out))
    assert summary["status"] == "failed" and not summary["complete"]
    assert "  reason: RuntimeError: boom" in format_summary(summary).splitlines()


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

"""A resume carries its own options: ``dconv backward IN OUT --resume`` takes every recorded option from the
output, refuses a flag that contradicts it before any cluster starts, and the printed resume command is
just that, plus the cluster flags of the run it resumes. Also the one-line messages met on the same walk.

Every resumed output is compared bit for bit with an uninterrupted run of the same job.
"""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import zarr

import dconv
from _fault_helpers import assert_bitwise_equal, provenance_of
from dconv.plan import plan_job
from dconv.statistics import format_stats
from dconv.store.summary import resume_command

JOBS = {
    "geometry": dict(batch_chunk=4, split_every=2, stride=2, padding="same", dilation=1),
    "dilated": dict(batch_chunk=3, split_every=3, stride=1, padding=[0, 1, 1, 0], dilation=2),
    "stats, no dA_prev": dict(batch_chunk=4, stats=True, dA_prev=False, keep_partials=True),
    "check_finite, simd": dict(batch_chunk=5, check_finite=True, simd="numpy"),
}


def half_done(inp, out, **options) -> None:
    """An output whose job was "killed" after chunks 0 and 2: the layout, and two leaf records."""
    plan = plan_job(inp, out, **options)
    plan.open_output()
    plan.run_chunk(0)
    plan.run_chunk(2)


@pytest.mark.parametrize("options", JOBS.values(), ids=JOBS)
def test_a_resume_with_no_options_takes_the_outputs_own(make_input, tmp_path, options):
    conv = {name: options[name] for name in ("stride", "padding", "dilation") if name in options}
    inp = make_input(m=20, chunk=4, **conv)
    whole = tmp_path / "whole.zarr"
    dconv.backward_job(inp, whole, scheduler="synchronous", **options)
    out = tmp_path / "out.zarr"
    half_done(inp, out, **options)

    resumed = dconv.backward_job(inp, out, resume=True, scheduler="synchronous")

    assert resumed.computed_chunks == resumed.n_chunks - 2
    names = ["dW", "db"] + (["dA_prev"] if options.get("dA_prev", True) else ["stats/sample_grad_norm2"])
    assert_bitwise_equal_arrays(out, whole, names)
    recorded = provenance_of(out)
    assert recorded["status"] == "complete"
    for name in ("batch_chunk", "split_every", "check_finite", "keep_partials"):
        assert recorded.get(name) == provenance_of(whole).get(name), name


def assert_bitwise_equal_arrays(out, reference, names) -> None:
    for name in names:
        got, want = zarr.open_array(f"{out}/{name}")[...], zarr.open_array(f"{reference}/{name}")[...]
        assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize(
    "given, named",
    [
        ({"batch_chunk": 8}, "batch_chunk: 8 here, 4 in out"),
        ({"split_every": 3}, "split_every: 3 here, 2 in out"),
        ({"stride": 2}, "stride: [2, 2] here, [1, 1] in out"),
        ({"stats": True}, "stats: True here, False in out"),
        ({"dA_prev": False}, "dA_prev: False here, True in out"),
    ],
)
def test_a_contradicting_option_is_refused_at_planning_and_finished_chunks_are_kept(make_input, tmp_path, given, named):
    """Refused by plan_job, which reads metadata only: before any cluster starts, and never "start again"."""
    inp = make_input(m=20, chunk=4)
    out = tmp_path / "out.zarr"
    half_done(inp, out, batch_chunk=4, split_every=2)
    with pytest.raises(dconv.InputError, match="with other options than it was made with") as error:
        plan_job(inp, out, resume=True, **given)
    assert named in str(error.value) and "overwrite" not in str(error.value)
    assert plan_job(inp, out, resume=True).out.done_chunks().sum() == 2  # nothing was lost


def test_the_cli_refusal_names_the_flag_and_starts_no_cluster(make_input, tmp_path, forked_dconv):
    inp = make_input(m=20, chunk=4)
    out = tmp_path / "out.zarr"
    half_done(inp, out, batch_chunk=4)
    result = forked_dconv.run(["backward", inp, out, "--resume", "--batch-chunk", "8"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "(--batch-chunk: 8 here, 4 in out)" in result.stderr
    assert "local cluster" not in result.stderr and "--overwrite" not in result.stderr


def test_another_input_is_refused_naming_it(make_input, tmp_path):
    inp, other = make_input(m=20, chunk=4), make_input(m=20, chunk=4, seed=5)
    out = tmp_path / "out.zarr"
    half_done(inp, out, batch_chunk=4)
    with pytest.raises(dconv.InputError, match=r"made by another job \(input: .* here, .* in out\); give the input"):
        plan_job(other, out, resume=True)


def test_the_resume_command_is_the_input_the_output_and_the_cluster_flags(make_input, tmp_path):
    inp = make_input(m=20, chunk=4)
    out = tmp_path / "out.zarr"
    half_done(inp, out, batch_chunk=4, stats=True, dA_prev=False)
    assert dconv.summarize(str(out))["resume_command"] == shlex.join(["dconv", "backward", inp, str(out), "--resume"])
    provenance = {"input": inp, "cluster": {"scheduler_file": "/shared/sf.json"}}
    assert resume_command(str(out), provenance).endswith(" --resume --scheduler-file /shared/sf.json")
    assert resume_command(str(out), {"input": inp, "cluster": {"workers": 3}}).endswith(" --resume --workers 3")
    assert resume_command(str(out), {"input": "<arrays>"}) is None


def test_an_output_of_the_last_release_still_resumes(make_input, tmp_path):
    """Outputs written before this change have no carried options and no cluster in their provenance."""
    inp = make_input(m=20, chunk=4)
    whole = tmp_path / "whole.zarr"
    dconv.backward_job(inp, whole, batch_chunk=4, stats=True, scheduler="synchronous")
    out = tmp_path / "out.zarr"
    half_done(inp, out, batch_chunk=4, stats=True)
    group = zarr.open_group(str(out), mode="r+")
    old = {k: v for k, v in group.attrs["dconv"].items() if k not in ("cluster", "check_finite", "keep_partials")}
    group.attrs["dconv"] = old
    assert dconv.summarize(str(out))["resume_command"].endswith("--resume")
    dconv.backward_job(inp, out, resume=True, scheduler="synchronous")
    assert_bitwise_equal(out, whole)


def nan_input(make_input):
    inp = make_input(m=20, chunk=4)
    good = zarr.open_array(f"{inp}/dZ", mode="r+")[9, 0, 0, 0]
    zarr.open_array(f"{inp}/dZ", mode="r+")[9, 0, 0, 0] = np.nan
    return inp, good


def test_a_check_finite_failure_prints_a_resume_command_that_keeps_checking(make_input, tmp_path, forked_dconv):
    inp, good = nan_input(make_input)
    out = tmp_path / "out.zarr"
    failed = forked_dconv.run(["backward", inp, out, "--batch-chunk", "4", "--check-finite", "--scheduler", "synchronous"])
    assert failed.returncode == 2, failed.stderr
    command = failed.stderr.strip().split("once the input is mended, resume with: ")[1]
    assert shlex.split(command)[:5] == ["dconv", "backward", inp, str(out), "--resume"]

    rerun = forked_dconv.run(shlex.split(command)[1:])  # still NaN: still refused, never "complete" with |dW| = nan
    assert rerun.returncode == 2 and "non-finite" in rerun.stderr
    assert provenance_of(out)["status"] != "complete"

    zarr.open_array(f"{inp}/dZ", mode="r+")[9, 0, 0, 0] = good
    mended = forked_dconv.run(shlex.split(command)[1:])
    assert mended.returncode == 0, mended.stderr
    whole = tmp_path / "whole.zarr"
    dconv.backward_job(inp, whole, batch_chunk=4, scheduler="synchronous")
    assert_bitwise_equal(out, whole)
    assert provenance_of(out)["check_finite"] is True


def test_a_result_that_is_not_finite_is_named_without_check_finite(make_input, tmp_path):
    inp, _ = nan_input(make_input)
    said = []
    plan = plan_job(inp, tmp_path / "out.zarr", batch_chunk=4)
    result = dconv.run_job(plan, scheduler="synchronous", say=said.append)
    counts = result.nonfinite
    assert counts["dW"] > 0 and counts["db"] == 1
    assert [line for line in said if "not finite" in line] == [
        f"dconv: warning: the result is not finite (NaN or Inf values: dW {counts['dW']} and db 1), so the inputs "
        "hold some; a run with check_finite=True to another out (or with overwrite=True) names the first chunk "
        "that holds them"
    ]
    text = dconv.format_summary(dconv.summarize(str(tmp_path / "out.zarr")))
    assert "a run with --check-finite to another out (or with --overwrite) names the first chunk" in text
    # the advice, followed as given: the chunk is named
    with pytest.raises(dconv.NonFiniteInput, match=r"dZ\[8:12\] holds 1 non-finite values"):
        dconv.backward_job(inp, tmp_path / "out.zarr", batch_chunk=4, check_finite=True, overwrite=True,
                           scheduler="synchronous")


def test_a_zarr_v2_input_is_read(tmp_path, rng):
    arrays = {"A_prev": rng.standard_normal((6, 7, 7, 3)), "dZ": rng.standard_normal((6, 7, 7, 4)),
              "W": rng.standard_normal((3, 3, 3, 4))}
    group = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    for name, value in arrays.items():
        group.create_array(name, shape=value.shape, chunks=(2, *value.shape[1:]) if name != "W" else value.shape,
                           dtype="float64")[...] = value
    group.attrs["hparameters"] = {"stride": 1, "pad": 1}
    from_v2 = dconv.backward_job(str(tmp_path / "v2.zarr"), tmp_path / "a.zarr", scheduler="synchronous")
    from_memory = dconv.backward_job(arrays, tmp_path / "b.zarr", padding=1, scheduler="synchronous")
    assert from_v2.dW.tobytes() == from_memory.dW.tobytes()
    assert_bitwise_equal(tmp_path / "a.zarr", tmp_path / "b.zarr")


def test_messages_name_what_the_user_gave(make_input, tmp_path, forked_dconv):
    inp = make_input(m=20, chunk=4)
    simd = forked_dconv.run(["backward", inp, tmp_path / "o", "--simd", "bogus", "--dry-run"])
    assert simd.returncode == 2 and simd.stderr.startswith("dconv: error: --simd must be one of"), simd.stderr
    dry = forked_dconv.run(["backward", inp, tmp_path / "o", "--dry-run"])
    assert "writes  dA_prev, dW, db" in dry.stdout and "--dA-prev" not in dry.stdout

    group = zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    for name, shape in (("A_prev", (2, 8, 8, 3)), ("dZ", (2, 8, 8, 4)), ("W", (3, 3, 3, 4))):
        group.create_array(name, shape=shape, dtype="float32")
    with pytest.raises(dconv.InputError, match="no hparameters attribute .* padding 0 .* were assumed"):
        plan_job(str(tmp_path / "bare.zarr"), tmp_path / "o2")

    chosen = make_input(m=64, chunk=32, height=16, width=16, in_channels=8, out_channels=8)
    need = plan_job(chosen, tmp_path / "o3", batch_chunk=32).task_memory()
    plan = plan_job(chosen, tmp_path / "o3", max_memory=int(need * 0.9))
    assert plan.batch_chunk < 32
    (warning,) = [line for line in plan.warnings(2) if "Zarr chunk" in line]
    assert "(the most max_memory allows)" in warning and "batch_chunk" not in warning


@pytest.mark.parametrize(
    "figures, reason",
    [({"m": 1, "grad_norm2": None}, "it needs m >= 2"), ({"m": 9, "grad_norm2": -22.4}, "is not positive")],
)
def test_inspect_says_why_the_noise_scale_is_undefined(figures, reason):
    stats = {"noise_scale": None, "trace_cov": 1.0, "mean_grad_norm2": 1.0, "sum_sample_norm2": 1.0, **figures}
    assert reason in format_stats(stats)[1]

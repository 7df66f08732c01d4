"""The `dconv` command, each run a process of its own: make-inputs, backward, inspect, run SPEC.toml,
dry runs, exit codes and one-line errors, the progress bar, and a real `dask scheduler` cluster.

Most runs are forked from a process that has imported dconv (``cli``: conftest's ``forked_dconv``),
which saves the import of each run; the backward job on the embedded local cluster and ``--version``
run in a fresh interpreter (``dconv_cli``). Jobs that are not about the embedded cluster run on the
session's `dask scheduler` cluster (``--scheduler``), which starts no cluster of their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

import dconv
from dconv import simd
from dconv.store import open_inputs

from _pipeline import assert_matches, kernel_gradients, provenance, read_inputs, read_output
from conftest import dconv_command

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
SMALL = ["--height", "7", "--width", "6", "--in-channels", "3", "--out-channels", "4"]


def dconv_cli(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    """Run ``dconv ARGS``; ``env`` holds variables set (or, with None, removed) on top of this process's."""
    environment = {**os.environ, **(env or {})}
    environment = {name: value for name, value in environment.items() if value is not None}
    return subprocess.run(
        dconv_command() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env=environment,
    )


@pytest.fixture(scope="module")
def cli(forked_dconv):
    """``cli(*ARGS, cwd=None, timeout=120, env=None)``: as :func:`dconv_cli`, forked (env: DCONV_SIMD only)."""

    def run(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
        return forked_dconv.run(args, cwd=cwd, env=env, timeout=timeout)

    return run


def assert_one_line_error(process: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code``, nothing on stdout, one line on stderr, no traceback; returns the line."""
    assert process.returncode == code, (process.returncode, process.stdout, process.stderr)
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("dconv: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert process.stdout == ""
    return lines[0]


def progress_bar_lines(stderr: str) -> list[str]:
    """The progress lines: stderr is a pipe here, so plain ``dconv: 3 of 3 chunks, ...`` lines, not a tqdm bar."""
    return [line for line in stderr.splitlines() if re.match(r"dconv: \d+ of \d+ chunks, ", line)]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_job(tmp_path_factory, cli):
    """make-inputs, then backward on 2 local workers (the embedded cluster, in a fresh interpreter), both
    through the CLI (run once for the module)."""
    root = tmp_path_factory.mktemp("cli")
    inp, out = root / "in.zarr", root / "out.zarr"
    made = cli(
        "make-inputs", inp, "--m", 23, *SMALL, "--kernel", "3,2", "--stride", 2, "--padding", "same",
        "--dtype", "float64", "--chunk", 7, "--seed", 11,
    )
    backward = dconv_cli(
        "backward", inp, out, "--workers", 2, "--quiet", "--batch-chunk", 5, "--split-every", 2
    )
    return {"input": inp, "out": out, "make": made, "backward": backward}


# --------------------------------------------------------------------------- make-inputs, backward, inspect


@pytest.mark.cluster
def test_make_inputs(cli_job):
    made, inp = cli_job["make"], cli_job["input"]
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith(f"dconv: wrote input group {inp} (m=23, 7x6x3 -> 4, kernel 3x2, float64")
    arrays = read_inputs(inp)
    assert arrays["A_prev"].shape == (23, 7, 6, 3) and arrays["A_prev"].dtype == np.float64
    assert arrays["dZ"].shape == (23, 4, 3, 4)  # "same", stride 2: ceil(7/2), ceil(6/2)
    assert arrays["W"].shape == (3, 2, 3, 4)
    opened = open_inputs(str(inp))
    assert opened.A_prev.chunks[0] == 7
    assert opened.hparameters == {"stride": 2, "pad": "same", "dilation": 1}


@pytest.mark.cluster
def test_backward_on_two_local_workers(cli_job):
    backward, out = cli_job["backward"], cli_job["out"]
    assert backward.returncode == 0, backward.stderr
    assert backward.stdout.startswith(f"dconv: wrote {out}: 5 of 5 chunks computed")
    assert "|dW| = " in backward.stdout
    # --quiet: neither a progress bar nor the dashboard link
    assert progress_bar_lines(backward.stderr) == []
    assert "dashboard" not in backward.stderr
    expected = kernel_gradients(read_inputs(cli_job["input"]), stride=2, padding="same")
    assert_matches(read_output(out), expected, "float64")
    stored = provenance(out)
    assert (stored["status"], stored["batch_chunk"], stored["split_every"]) == ("complete", 5, 2)
    assert dconv.open_result(str(out))["dA_prev"].chunks == (5, 7, 6, 3)


@pytest.mark.cluster
def test_inspect_human(cli, cli_job):
    out = cli_job["out"]
    process = cli("inspect", out)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[0] == f"{out}: complete"
    assert "  5 of 5 batch chunks done" in lines
    assert any("dA_prev" in line and "(23, 7, 6, 3)" in line and "chunks (5, 7, 6, 3)" in line for line in lines)
    assert any(line.startswith("  norms: |dW| = ") for line in lines)


@pytest.mark.cluster
def test_inspect_json(cli, cli_job):
    out = cli_job["out"]
    process = cli("inspect", out, "--json")
    assert process.returncode == 0, process.stderr
    summary = json.loads(process.stdout)
    assert summary["complete"] is True and summary["status"] == "complete"
    assert summary["chunks"] == {"total": 5, "done": 5, "missing": [], "missing_count": 0}
    assert summary["arrays"]["dW"]["dimension_names"] == ["fh", "fw", "C_prev", "C"]
    dW = read_output(out)["dW"]
    assert summary["norms"]["dW"] == pytest.approx(float(np.linalg.norm(dW)), rel=1e-12)


def test_inspect_json_is_strict_json_when_gradients_are_not_finite(cli, tmp_path):
    """A NaN in A_prev makes dW NaN; `inspect --json` must still print JSON (RFC 8259 has no NaN)."""
    rng = np.random.default_rng(13)
    a_prev = rng.standard_normal((4, 5, 5, 2))
    a_prev[1, 2, 2, 0] = np.nan
    arrays = {"A_prev": a_prev, "dZ": rng.standard_normal((4, 3, 3, 3)), "W": rng.standard_normal((3, 3, 2, 3))}
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(arrays, out, batch_chunk=2, scheduler="threads")
    assert result.nonfinite["dW"] > 0  # the premise: a non-finite norm to report

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    process = cli("inspect", out, "--json")
    assert process.returncode == 0, process.stderr
    summary = json.loads(process.stdout, parse_constant=reject)
    assert summary["nonfinite"]["dW"] == result.nonfinite["dW"]


def test_inspect_of_an_unfinished_output_exits_3(cli, make_input, tmp_path):
    from dconv.plan import plan_job

    out = tmp_path / "out.zarr"
    plan_job(make_input(m=4), out, batch_chunk=2).open_output()
    process = cli("inspect", out)
    assert process.returncode == 3
    assert "INCOMPLETE: 0 of 2 batch chunks done, 2 missing (0, 1)" in process.stdout
    assert json.loads(cli("inspect", out, "--json").stdout)["complete"] is False


# --------------------------------------------------------------------------- run SPEC.toml


@pytest.mark.cluster
def test_run_spec_with_command_line_override(cli, dask_cluster, tmp_path):
    """Relative paths from the working directory; --batch-chunk overrides [job]; the rest comes from the spec
    (on the session's cluster: its workers run in another directory)."""
    address = dask_cluster["address"]
    (tmp_path / "spec.toml").write_text(textwrap.dedent(f"""
        [input]
        path = "data/in.zarr"

        [input.make]
        m = 17
        height = 6
        width = 6
        in_channels = 2
        out_channels = 3
        kernel = [2, 3]
        padding = [1, 0, 2, 1]
        dilation = 2
        dtype = "float32"
        chunk = 4
        seed = 5

        [output]
        path = "results/out.zarr"

        [job]
        batch_chunk = 4
        split_every = 3

        [cluster]
        scheduler = "{address}"
    """))
    process = cli("run", "spec.toml", "--batch-chunk", 6, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    inp, out = tmp_path / "data" / "in.zarr", tmp_path / "results" / "out.zarr"
    assert "dconv: making synthetic input data/in.zarr (m=17, 6x6x2 -> 3, kernel 2x3" in process.stderr
    assert process.stdout.startswith(f"dconv: wrote {out}: 3 of 3 chunks computed")
    stored = provenance(out)
    assert (stored["batch_chunk"], stored["split_every"], stored["n_chunks"]) == (6, 3, 3)
    assert stored["params"] == {"stride": [1, 1], "padding": [[1, 0], [2, 1]], "dilation": [2, 2]}
    expected = kernel_gradients(read_inputs(inp), padding=((1, 0), (2, 1)), dilation=2)
    assert_matches(read_output(out), expected, "float32")
    assert dconv.open_result(str(out))["dA_prev"].chunks[0] == 6
    # without --quiet the progress goes to stderr, and only there: plain lines (stderr is not a terminal)
    bar = progress_bar_lines(process.stderr)
    assert bar and bar[-1].startswith("dconv: 3 of 3 chunks, "), process.stderr
    assert "\r" not in process.stderr and "chunks/s" not in process.stdout
    assert f"dconv: scheduler {address}, dashboard" in process.stderr


def test_dry_run_writes_nothing(cli, make_input, tmp_path):
    inp = make_input(m=20, chunk=7, padding=1)
    before = snapshot(Path(inp))
    out = tmp_path / "out.zarr"
    process = cli("backward", inp, out, "--dry-run", "--batch-chunk", 6, "--split-every", 2)
    assert process.returncode == 0, process.stderr
    assert f"input   {inp}" in process.stdout
    assert f"output  {out}" in process.stdout
    assert "chunks  4 of up to 6 samples (m = 20), tree fan-in 2" in process.stdout
    assert "memory  at most about" in process.stdout
    assert not out.exists()
    assert snapshot(Path(inp)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(inp).name]


def test_dry_run_with_overwrite_leaves_an_existing_output_alone(cli, make_input, tmp_path):
    inp = make_input(m=6, padding=1)
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=4, scheduler="threads")
    before = snapshot(out)
    process = cli("backward", inp, out, "--dry-run", "--overwrite", "--batch-chunk", 2)
    assert process.returncode == 0, process.stderr
    assert "chunks  3 of up to 2 samples (m = 6)" in process.stdout
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "options, expected",
    [
        ([], ["chunks  3 of up to 4 samples (m = 10), tree fan-in 3", "conv    stride 1, padding 1"]),
        (["--batch-chunk", "6"], ["chunks  2 of up to 6 samples (m = 10), tree fan-in 3"]),
        (["--split-every", "5", "--padding", "same"],
         ["chunks  3 of up to 4 samples (m = 10), tree fan-in 5", "conv    stride 1, padding 'same', pads ((1, 1), (1, 1))"]),
        (["--padding", "1,1,1,1"], ["pads ((1, 1), (1, 1))"]),
        (["--workers", "2"], ["chunks  3 of up to 4 samples"]),  # overrides the spec's scheduler: nothing to reach
    ],
)
def test_command_line_options_override_the_spec(cli, make_input, tmp_path, options, expected):
    """Seen through --dry-run: the plan uses the spec, except where an option says otherwise."""
    inp = make_input(m=10, padding=1)
    (tmp_path / "spec.toml").write_text(textwrap.dedent(f"""
        [input]
        path = "{inp}"
        [output]
        path = "out.zarr"
        [conv]
        padding = 1
        [job]
        batch_chunk = 4
        split_every = 3
        [cluster]
        scheduler = "tcp://127.0.0.1:1"
    """))
    process = cli("run", "spec.toml", "--dry-run", *options, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    for fragment in expected:
        assert fragment in process.stdout, (fragment, process.stdout)
    assert not (tmp_path / "out.zarr").exists()


def test_dry_run_of_a_spec_that_would_make_its_input(cli, tmp_path):
    """The shipped large-batch spec (24 GiB of input) in an empty directory: a plan, no bytes written."""
    process = cli("run", PIPELINES / "large-batch.toml", "--dry-run", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "out/large-batch-input.zarr does not exist yet" in process.stdout
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- errors: exit 2, one line


def test_errors_name_options_as_keywords_in_python_and_as_flags_on_the_command_line(cli, make_input, tmp_path):
    """The same refusal: `overwrite=True` for a Python caller, `--overwrite` for a command-line user."""
    inp = make_input(m=4)
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"dconv": {}}}')
    with pytest.raises(dconv.InputError, match=r"pass overwrite=True to replace it or resume=True to continue it"):
        dconv.plan_job(inp, out)
    with pytest.raises(dconv.InputError, match=r"batch_chunk 64 needs about .* more than max_memory"):
        dconv.plan_job(inp, tmp_path / "other.zarr", batch_chunk=64, max_memory="1KiB")
    line = assert_one_line_error(cli("backward", inp, out, "--quiet"), 2, "pass --overwrite to replace it")
    assert "--resume to continue it" in line and "=True" not in line
    line = assert_one_line_error(
        cli("backward", inp, tmp_path / "other.zarr", "--batch-chunk", "64", "--max-memory", "1KiB"), 2,
        "--batch-chunk 64 needs about",
    )
    assert "more than --max-memory" in line and "batch_chunk" not in line


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--batch-chunk", "0"], "--batch-chunk must be an int >= 1; got 0 instead."),
        (["--split-every", "1"], "--split-every must be an int >= 2; got 1 instead."),
        (["--stride", "0"], "stride must be >= 1"),
        (["--dilation", "1,0"], "dilation must be >= 1"),
        (["--stride", "3"], "dZ has shape"),  # valid value, but not for this input's dZ
        (["--overwrite", "--resume"], "give --overwrite or --resume, not both."),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "give either workers (a local cluster) or scheduler"),
        (["--max-memory", "lots"], "--max-memory must be a size such as 512MiB"),
        (["--simd", "avx3"], "--simd must be one of"),
    ],
)
def test_bad_option_value_is_a_one_line_usage_error(cli, make_input, tmp_path, options, fragment):
    inp = make_input(m=4, padding=1)
    out = tmp_path / "out.zarr"
    assert_one_line_error(cli("backward", inp, out, "--quiet", *options), 2, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--batch-chunk", "abc"], "argument --batch-chunk: invalid int value: 'abc'"),
        (["--workers", "0"], "argument --workers: expected an integer >= 1; got 0"),
        (["--padding", "1,2,3"], "argument --padding: expected P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, 'same' or 'valid'; got '1,2,3'"),
        (["--stride", "x"], "argument --stride: expected an integer or comma-separated integers"),
    ],
)
def test_unparsable_option_is_a_usage_error(cli, make_input, tmp_path, options, fragment):
    inp = make_input(m=4)
    process = cli("backward", inp, tmp_path / "out.zarr", *options)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("dconv backward: error: ") and fragment in lines[0], lines[0]
    assert not (tmp_path / "out.zarr").exists()


def test_existing_out_is_refused_and_untouched(cli, make_input, tmp_path):
    inp = make_input(m=6, padding=1)
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=4, scheduler="threads")
    before = snapshot(out)
    process = cli("backward", inp, out, "--quiet", "--batch-chunk", 2)
    assert_one_line_error(process, 2, f"out '{out}' already exists; pass --overwrite to replace it")
    assert snapshot(out) == before


def test_bad_spec_is_a_one_line_usage_error(cli, tmp_path):
    (tmp_path / "spec.toml").write_text('[input]\npath = "in.zarr"\n[output]\npath = "o.zarr"\n[job]\nbatch_chunks = 4\n')
    assert_one_line_error(cli("run", "spec.toml", cwd=tmp_path), 2, "Did you mean 'batch_chunk'?")
    assert_one_line_error(cli("run", "missing.toml", cwd=tmp_path), 2, "cannot read spec file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_inspect_of_a_non_output_is_a_usage_error(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nothing.zarr"), 2, "does not exist")


# --------------------------------------------------------------------------- existing Dask clusters


@pytest.mark.cluster
def test_backward_on_a_dask_scheduler_cluster(cli, dask_cluster, make_input, tmp_path):
    """`dask scheduler` + 2 `dask worker` processes; the CLI connects with --scheduler ADDRESS."""
    address = dask_cluster["address"]
    inp = make_input(m=19, chunk=4, dtype="float64", kernel=(2, 3), stride=(1, 2), padding=((2, 0), (0, 1)))
    out = tmp_path / "out.zarr"
    process = cli("backward", inp, out, "--scheduler", address, "--batch-chunk", 3, "--split-every", 2)
    assert process.returncode == 0, process.stderr
    assert f"dconv: scheduler {address}, dashboard" in process.stderr
    bar = progress_bar_lines(process.stderr)
    assert bar and bar[-1].startswith("dconv: 7 of 7 chunks, "), process.stderr
    assert process.stdout.startswith(f"dconv: wrote {out}: 7 of 7 chunks computed")
    expected = kernel_gradients(read_inputs(inp), stride=(1, 2), padding=((2, 0), (0, 1)))
    assert_matches(read_output(out), expected, "float64")
    # the cluster is still there for the next user
    assert all(p.poll() is None for p in dask_cluster["processes"])


@pytest.mark.cluster
def test_relative_paths_on_a_dask_scheduler_cluster(cli, dask_cluster, tmp_path):
    """`dconv backward in.zarr out.zarr --scheduler ...` from a directory the workers were not started in."""
    name = f"rel-{uuid.uuid4().hex}"
    made = cli("make-inputs", f"{name}-in.zarr", "--m", 7, *SMALL, "--padding", 1, "--dtype", "float64",
                     "--chunk", 3, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    try:
        process = cli("backward", f"{name}-in.zarr", f"{name}-out.zarr", "--scheduler", dask_cluster["address"],
                            "--quiet", "--batch-chunk", 2, cwd=tmp_path)
        assert process.returncode == 0, process.stderr
        expected = kernel_gradients(read_inputs(tmp_path / f"{name}-in.zarr"), padding=1)
        assert_matches(read_output(tmp_path / f"{name}-out.zarr"), expected, "float64")
    finally:  # the workers run in pytest's working directory: leave nothing there
        stray = Path.cwd() / f"{name}-out.zarr"
        if stray.exists():
            shutil.rmtree(stray)
        assert not stray.exists()


# An unknown scheduler address (exit 2 after the connect timeout, nothing written) is
# test_catalogue.py's "scheduler-nothing-listens": it waits there alongside the other cases.


@pytest.mark.cluster
def test_resume_on_the_command_line_overrides_a_spec_that_overwrites(cli, dask_cluster, make_input, tmp_path):
    """quickstart.toml says overwrite = true; `dconv run SPEC --resume` continues instead of refusing."""
    inp, out = make_input(m=12), tmp_path / "out.zarr"
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[input]\npath = "{inp}"\n[output]\npath = "{out}"\noverwrite = true\n'
        f'[job]\nbatch_chunk = 4\n[cluster]\nscheduler = "{dask_cluster["address"]}"\n'
    )
    first = cli("run", spec, "--quiet")
    assert first.returncode == 0, first.stderr
    resumed = cli("run", spec, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "0 of 3 chunks computed" in resumed.stdout
    both = cli("run", spec, "--quiet", "--resume", "--overwrite")
    assert both.returncode == 2 and "give --overwrite or --resume, not both" in both.stderr


def lacking_level() -> str:
    """A compiled level this CPU does not run (there is always one: avx512/avx2 or neon)."""
    return next(level for level in simd.LEVELS if level not in simd.simd_levels())


def test_version_names_the_simd_level_and_the_levels_this_machine_runs():
    result = dconv_cli("--version", env={"DCONV_SIMD": None})
    assert result.returncode == 0, result.stderr
    runs = ", ".join(simd.simd_levels() + ["numpy"])
    built = "" if simd.simd_levels() else f"; {simd.missing_loops_reason()}"
    level = simd.resolve_level("auto")
    assert result.stdout == f"dconv {dconv.__version__}; SIMD level {level} (DCONV_SIMD=auto; this machine runs {runs}{built})\n"


@pytest.mark.parametrize("word", ["bogus", "lacking"])
def test_version_reports_a_bad_dconv_simd_instead_of_failing(cli, word):
    word = lacking_level() if word == "lacking" else word
    result = cli("--version", env={"DCONV_SIMD": word})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dconv {dconv.__version__}; no SIMD level: DCONV_SIMD")
    assert word in lines[0] and "numpy" in lines[0]  # the word, and what this machine runs or accepts


# --------------------------------------------------------------------------- DCONV_SIMD: exit 2, one line


@pytest.mark.parametrize("command", ["backward", "run"])
@pytest.mark.parametrize("word", ["bogus", "lacking"])
def test_a_bad_dconv_simd_exits_2_before_any_work(cli, make_input, tmp_path, command, word):
    """Refused before the local cluster starts, and before `run` makes its input."""
    word = lacking_level() if word == "lacking" else word
    inp = make_input(m=4)
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[input]\npath = "{tmp_path / "made.zarr"}"\n[input.make]\nm = 4\n[output]\npath = "{tmp_path / "out.zarr"}"\n'
    )
    args = ["backward", inp, tmp_path / "out.zarr"] if command == "backward" else ["run", spec]
    process = cli(*args, "--quiet", env={"DCONV_SIMD": word})
    line = assert_one_line_error(process, 2, "DCONV_SIMD")
    expected = "must be one of" if word == "bogus" else f"DCONV_SIMD={word}: "
    assert expected in line and "numpy" in line  # the word, and what this machine runs or accepts
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "made.zarr").exists()


@pytest.mark.cluster
def test_a_level_a_worker_lacks_exits_2_naming_the_worker(cli, mixed_levels_cluster, make_input, tmp_path):
    better = [level for level in simd.simd_levels() if level != "baseline"]
    if not better:
        pytest.skip("this CPU runs no level above baseline")
    out = tmp_path / "out.zarr"
    process = cli(
        "backward", make_input(m=4), out, "--scheduler", mixed_levels_cluster["address"], "--quiet",
        env={"DCONV_SIMD": better[0]},
    )
    assert_one_line_error(
        process, 2, f"DCONV_SIMD={better[0]}: worker {mixed_levels_cluster['baseline_worker']} cannot run it "
        "(it runs baseline, numpy)"
    )
    assert not out.exists()


def test_the_command_exits_at_once_with_main_s_code_its_output_whole_and_exit_handlers_run(cli, make_input, tmp_path):
    """`dconv` (:func:`dconv.cli.run`) skips the interpreter's teardown, nothing else: the exit code is
    :func:`main`'s, everything written to a pipe arrives, and the exit handlers registered before it ran."""
    inp, out = make_input(m=4), tmp_path / "out.zarr"
    assert cli("backward", inp, out, "--batch-chunk", "2", "--quiet").returncode == 0
    marker = tmp_path / "handler-ran"
    script = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
        sys.argv = ["dconv", *sys.argv[1:]]
        from dconv.cli import run
        run()
        raise AssertionError("run() returned")
    """)
    listing = subprocess.run([sys.executable, "-c", script, "inspect", str(out), "--json"],
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["status"] == "complete"
    assert marker.read_text() == "ran"
    marker.unlink()
    missing = subprocess.run([sys.executable, "-c", script, "inspect", str(tmp_path / "nothing.zarr")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nothing.zarr" in missing.stderr
    assert marker.read_text() == "ran"

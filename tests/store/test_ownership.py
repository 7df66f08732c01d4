"""One overwrite rule for everything dconv writes (:mod:`dconv.store.ownership`).

``--overwrite`` / ``overwrite=True`` / ``[output] overwrite`` replace only a group dconv
wrote, of the kind being written, holding nothing else; everything else is refused in one
line and left byte for byte as it was. Also: memory:// refused on the command line, the
dtype option's message, and dimension names that xarray does not turn into coordinates.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputError
from dconv.store import DIMENSIONS, OUTPUT_LAYOUT, make_inputs, open_inputs
from dconv.store.lease import LEASE_NAME as LEASE
from dconv.store.ownership import INPUT_MARKER, LEGACY_INPUT_DIMENSIONS, remove_own
from dconv.store.writer import InputWriter

from test_cli import assert_one_line_error, cli  # noqa: F401  (cli: the forked `dconv` fixture)
from test_s3 import bucket, new_fs, s3_endpoint, storage_options  # noqa: F401  (moto's S3 server)

SMALL = {"m": 4, "height": 5, "width": 5, "in_channels": 2, "out_channels": 3, "dtype": "float64"}
SMALL_FLAGS = ["--m", 4, "--height", 5, "--width", 5, "--in-channels", 2, "--out-channels", 3]
PRECIOUS = b"\\documentclass{article} % a thesis, not dconv's\n"


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself), by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dconv_output(inputs: str, out: Path) -> Path:
    dconv.backward_job(inputs, out, batch_chunk=2, scheduler="threads")
    return out


# --------------------------------------------------------------------------- what is refused, untouched


def foreign_dir(tmp_path: Path, make_input) -> Path:
    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "thesis.tex").write_bytes(PRECIOUS)
    return tmp_path / "mydir"


def plain_file(tmp_path: Path, make_input) -> Path:
    (tmp_path / "file.txt").write_bytes(PRECIOUS)
    return tmp_path / "file.txt"


def output_of_dconv(tmp_path: Path, make_input) -> Path:
    return dconv_output(make_input(**SMALL), tmp_path / "out.zarr")


def zarr_group_of_someone_else(tmp_path: Path, make_input, name: str = "A_prev") -> Path:
    group = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3, attributes={"owner": "a colleague"})
    group.create_array(name, shape=(2, 3), dtype="float64")[...] = 1.5
    return tmp_path / "theirs.zarr"


def zarr_group_named_like_an_output(tmp_path: Path, make_input) -> Path:
    return zarr_group_of_someone_else(tmp_path, make_input, name="dW")


def input_group_with_a_foreign_file(tmp_path: Path, make_input) -> Path:
    path = Path(make_input(**SMALL))
    (path / "thesis.tex").write_bytes(PRECIOUS)
    return path


@pytest.mark.parametrize(
    "target, found",
    [
        (foreign_dir, "is not a dconv input group (it holds 'thesis.tex')"),
        (plain_file, "is a file, not a dconv input group"),
        (output_of_dconv, "is a dconv output, not a dconv input group"),
        (zarr_group_of_someone_else, "is a Zarr group dconv did not write (it has no 'dconv_input' attribute)"),
        (input_group_with_a_foreign_file, "is not a dconv input group (it holds 'thesis.tex')"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_make_inputs_overwrite_refuses_what_dconv_did_not_write(cli, make_input, tmp_path, target, found):
    path = target(tmp_path, make_input)
    before = snapshot(path)
    process = cli("make-inputs", path, *SMALL_FLAGS, "--overwrite")
    line = assert_one_line_error(process, 2, f"'{path}' exists and {found}")
    assert line.endswith("refusing to overwrite it. Choose another path or remove it yourself.")
    assert snapshot(path) == before


def input_group(tmp_path: Path, make_input) -> Path:
    return Path(make_input(**SMALL))


def output_with_a_foreign_file(tmp_path: Path, make_input) -> Path:
    out = output_of_dconv(tmp_path, make_input)
    (out / "thesis.tex").write_bytes(PRECIOUS)
    return out


def output_with_a_foreign_file_in_a_spec(tmp_path: Path, make_input) -> Path:
    return output_with_a_foreign_file(tmp_path, make_input)


@pytest.mark.parametrize(
    "target, found",
    [
        (foreign_dir, "is not a dconv output (it holds 'thesis.tex')"),
        (plain_file, "is a file, not a dconv output"),
        (input_group, "is a dconv input group, not a dconv output"),
        (zarr_group_of_someone_else, "is not a dconv output (it holds 'A_prev')"),
        (zarr_group_named_like_an_output, "is a Zarr group dconv did not write (it has no 'dconv' attribute)"),
        (output_with_a_foreign_file, "is not a dconv output (it holds 'thesis.tex')"),
        (output_with_a_foreign_file_in_a_spec, "is not a dconv output (it holds 'thesis.tex')"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_backward_overwrite_refuses_what_dconv_did_not_write(cli, make_input, tmp_path, target, found):
    inputs = make_input(**SMALL)
    out = target(tmp_path, make_input)
    before = snapshot(out)
    if target is output_with_a_foreign_file_in_a_spec:
        spec = f'[input]\npath = "{inputs}"\n[output]\npath = "{out}"\noverwrite = true\n'
        (tmp_path / "spec.toml").write_text(spec)
        process = cli("run", tmp_path / "spec.toml", "--quiet")
    else:
        process = cli("backward", inputs, out, "--overwrite", "--quiet")
    line = assert_one_line_error(process, 2, f"out '{out}' exists and {found}")
    assert line.endswith("refusing to overwrite it. Choose another path or remove it yourself.")
    assert snapshot(out) == before


def test_input_writer_overwrite_refuses_a_project_directory(rng, tmp_path):
    (tmp_path / "proj" / "src").mkdir(parents=True)
    (tmp_path / "proj" / "src" / "main.py").write_bytes(b"print('my model')\n")
    before = snapshot(tmp_path / "proj")
    with pytest.raises(InputError, match=r"^'.*proj' exists and is not a dconv input group \(it holds 'src'\)"):
        InputWriter(tmp_path / "proj", rng.standard_normal((3, 3, 2, 4)), overwrite=True)
    assert snapshot(tmp_path / "proj") == before


# --------------------------------------------------------------------------- what is replaced


def test_make_inputs_overwrite_replaces_its_own_group_and_marks_it(cli, tmp_path):
    path = tmp_path / "in.zarr"
    assert cli("make-inputs", path, *SMALL_FLAGS, "--seed", 1).returncode == 0
    first = snapshot(path)
    process = cli("make-inputs", path, *SMALL_FLAGS, "--seed", 2, "--overwrite")
    assert process.returncode == 0, process.stderr
    assert snapshot(path) != first
    marker = {"writer": "make_inputs", "version": dconv.__version__}
    assert zarr.open_group(path, mode="r").attrs[INPUT_MARKER] == marker


def test_backward_overwrite_replaces_its_own_output_lease_and_records_included(make_input, tmp_path):
    inputs = make_input(**SMALL)
    out = dconv_output(inputs, tmp_path / "out.zarr")
    (out / LEASE).write_text('{"holder": "a job that was killed"}')  # left by a killed job: dconv's own name
    os.utime(out / LEASE, (time.time() - 3600,) * 2)  # its heartbeat stopped an hour ago: stale
    dconv.backward_job(inputs, out, batch_chunk=4, scheduler="threads", overwrite=True)
    assert zarr.open_group(out, mode="r").attrs["dconv"]["batch_chunk"] == 4


def test_legacy_input_group_is_replaced_and_a_look_alike_is_not(tmp_path):
    """An input group written before the marker (only ``hparameters``, the old dimension names) is
    still read and may be overwritten; the same arrays without dconv's dimension names are someone else's."""

    def unmarked(path: Path, dims: dict) -> Path:
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes={"hparameters": {"stride": 1, "pad": 1}})
        for name, shape in {"A_prev": (2, 4, 4, 2), "dZ": (2, 4, 4, 3), "W": (3, 3, 2, 3)}.items():
            group.create_array(name, shape=shape, dtype="float64", dimension_names=dims.get(name))[...] = 0.5
        return path

    legacy = unmarked(tmp_path / "legacy.zarr", LEGACY_INPUT_DIMENSIONS)
    assert open_inputs(str(legacy)).A_prev.metadata.dimension_names == ("m", "H", "W", "C_prev")
    make_inputs(str(legacy), **SMALL, overwrite=True)
    assert INPUT_MARKER in zarr.open_group(legacy, mode="r").attrs

    look_alike = unmarked(tmp_path / "mine.zarr", {})
    before = snapshot(look_alike)
    with pytest.raises(InputError, match="is a Zarr group dconv did not write"):
        make_inputs(str(look_alike), **SMALL, overwrite=True)
    assert snapshot(look_alike) == before


def test_input_writer_replaces_at_the_first_good_append(rng, tmp_path):
    """``overwrite=True``: the old group survives the writer until a batch passes its checks; a later
    failing append leaves the new group with the batches appended before it."""
    path = tmp_path / "in.zarr"
    make_inputs(str(path), **SMALL)
    old = snapshot(path)
    W = rng.standard_normal((3, 3, 2, 4))
    good = (rng.standard_normal((2, 6, 6, 2)), rng.standard_normal((2, 6, 6, 4)))
    with pytest.raises(KeyError, match="the caller's"):
        with InputWriter(path, W, padding=1, overwrite=True) as writer:
            with pytest.raises(InputError, match="W has 2 input channels"):
                writer.append(np.zeros((2, 6, 6, 5)), good[1])  # refused: nothing deleted
            assert snapshot(path) == old
            raise KeyError("the caller's")
    assert snapshot(path) == old

    with pytest.raises(InputError, match="got no batch"):
        InputWriter(path, W, padding=1, overwrite=True).close()
    assert snapshot(path) == old

    with InputWriter(path, W, padding=1, overwrite=True) as writer:
        writer.append(*good)
        with pytest.raises(InputError, match="samples must have shape"):
            writer.append(np.zeros((2, 7, 7, 2)), np.zeros((2, 7, 7, 4)))
    replaced = open_inputs(str(path))
    np.testing.assert_array_equal(replaced.A_prev[...], good[0])
    np.testing.assert_array_equal(replaced.W[...], W)
    assert zarr.open_group(path, mode="r").attrs[INPUT_MARKER]["writer"] == "InputWriter"


@pytest.mark.parametrize("kind", ["input", "output"])
def test_remove_own_deletes_only_dconv_names(make_input, tmp_path, kind):
    """Between the check and the removal, a user's file may land in the group: it survives."""
    path = Path(make_input(**SMALL)) if kind == "input" else output_of_dconv(tmp_path, make_input)
    (path / "thesis.tex").write_bytes(PRECIOUS)
    remove_own(str(path), None, kind)
    assert snapshot(path) == {"thesis.tex": PRECIOUS}


# --------------------------------------------------------------------------- on S3


def test_s3_overwrite_refuses_a_foreign_object_and_removes_only_dconv_names(s3_endpoint, bucket):
    options = storage_options(s3_endpoint)
    url, fs = f"s3://{bucket}/in.zarr", new_fs(s3_endpoint)
    make_inputs(url, **SMALL, storage_options=options)
    fs.pipe(f"{bucket}/in.zarr/notes.txt", PRECIOUS)
    with pytest.raises(InputError, match=r"in.zarr' exists and is not a dconv input group \(it holds 'notes.txt'\)"):
        make_inputs(url, **SMALL, overwrite=True, storage_options=options)
    assert INPUT_MARKER in json.loads(fs.cat(f"{bucket}/in.zarr/zarr.json"))["attributes"]
    remove_own(url, options, "input")
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/in.zarr") == [f"{bucket}/in.zarr/notes.txt"]
    assert fs.cat(f"{bucket}/in.zarr/notes.txt") == PRECIOUS


def test_s3_make_inputs_overwrite_replaces_its_own_group(s3_endpoint, bucket):
    options = storage_options(s3_endpoint)
    url = f"s3://{bucket}/in.zarr"
    make_inputs(url, **SMALL, seed=1, storage_options=options)
    make_inputs(url, **{**SMALL, "m": 3}, seed=2, overwrite=True, storage_options=options)
    assert open_inputs(url, options).A_prev.shape[0] == 3
    assert json.loads(new_fs(s3_endpoint).cat(f"{bucket}/in.zarr/zarr.json"))["attributes"][INPUT_MARKER]["writer"] == (
        "make_inputs"
    )


# --------------------------------------------------------------------------- small input-side items


@pytest.mark.parametrize(
    "args, name",
    [
        (["make-inputs", "memory://in.zarr", *SMALL_FLAGS], "OUT"),
        (["backward", "memory://in.zarr", "out.zarr", "--dry-run"], "INPUTS"),
        (["backward", "in.zarr", "memory://out.zarr", "--dry-run"], "OUT"),
    ],
    ids=["make-inputs OUT", "backward INPUTS", "backward OUT"],
)
def test_memory_urls_are_refused_on_the_command_line(cli, tmp_path, args, name):
    assert_one_line_error(
        cli(*args, cwd=tmp_path), 2, f"{name} must be a path or a URL of lasting storage; got 'memory://"
    )


def test_dtype_option_message(cli, tmp_path):
    line = assert_one_line_error(cli("make-inputs", tmp_path / "in.zarr", *SMALL_FLAGS, "--dtype", "float16"), 2)
    assert line == "dconv: error: --dtype must be float32 or float64; got 'float16' instead."
    assert not (tmp_path / "in.zarr").exists()


def test_no_dimension_is_named_as_an_array_and_xarray_sees_no_coordinate(tmp_path):
    xarray = pytest.importorskip("xarray")
    arrays = {*DIMENSIONS, *(entry.name.rpartition("/")[2] for entry in OUTPUT_LAYOUT if entry.has_array)}
    assert {dim for dims in DIMENSIONS.values() for dim in dims} & arrays == set()
    path = make_inputs(str(tmp_path / "in.zarr"), **SMALL)
    dataset = xarray.open_zarr(path, consolidated=False)
    assert set(dataset.data_vars) == {"A_prev", "dZ", "W", "b"} and not dataset.coords


def test_a_job_planned_before_another_wrote_its_output_is_refused_when_it_runs(make_input, tmp_path):
    """Two jobs planned on one new output, run one after the other: the second, under the lease, finds
    what the first wrote and refuses it as its plan would have, instead of replacing it."""
    from dconv.plan import plan_job

    inputs, out = make_input(**SMALL), tmp_path / "out.zarr"
    first, second = plan_job(inputs, out, batch_chunk=4), plan_job(inputs, out, batch_chunk=4)
    dconv.run_job(first, scheduler="synchronous")
    before = snapshot(out)
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        dconv.run_job(second, scheduler="synchronous")
    assert snapshot(out) == before


def test_an_output_whose_replacement_is_cut_short_never_claims_to_be_complete(make_input, tmp_path, monkeypatch):
    from dconv.store import output

    inputs = make_input(**SMALL)
    out = dconv_output(inputs, tmp_path / "out.zarr")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the job dies while the old output's arrays are being removed

    monkeypatch.setattr(output, "remove_own", killed)
    with pytest.raises(KeyboardInterrupt):
        dconv.backward_job(inputs, out, batch_chunk=4, scheduler="synchronous", overwrite=True)
    assert zarr.open_group(out, mode="r").attrs["dconv"]["status"] == "replacing"
    assert not dconv.summarize(str(out))["complete"]


def test_lease_files_a_killed_renewal_or_takeover_left_are_dconvs_own(make_input, tmp_path):
    inputs = make_input(**SMALL)
    out = dconv_output(inputs, tmp_path / "out.zarr")
    for leftover in (f"{LEASE}.0123abcd.tmp", f"{LEASE}.stale-0123abcd"):
        (out / leftover).write_text("{}")
    dconv.backward_job(inputs, out, batch_chunk=4, scheduler="synchronous", overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(LEASE)) == []

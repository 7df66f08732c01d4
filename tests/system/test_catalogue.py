"""The bad-input catalogue: every way a user can hand dconv something wrong, through the CLI.

Each case runs ``dconv`` as a process of its own (forked from one that has imported dconv:
conftest's ``forked_dconv``) and asserts that it

- exits with code 2 (bad input or usage),
- prints exactly one line on stderr, which names the problem and the offending value,
- prints no Python traceback,
- marks nothing "complete", and
- leaves every store that existed before (the input, an existing OUT) byte for byte as it was.

Also here: NaN/Inf inputs propagate by default and ``inspect --json`` counts them;
``--check-finite`` turns them into a fast exit 2.

Jobs that reach the workers run on the session's `dask scheduler` cluster (``--scheduler``), except
one, on the embedded local cluster, whose workers must stay silent on stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr

import dconv
from _fault_helpers import describe, done_flags, read_arrays, snapshot, status_of
from conftest import free_port

JOB = ["--workers", "1", "--quiet"]  # every backward run: small local cluster, no progress bar


def on_cluster(address: str) -> list[str]:
    """A backward run's options on the session's cluster at ``address``: no cluster to start, no progress bar."""
    return ["--scheduler", address, "--quiet"]


@dataclass
class Case:
    """One bad-input scenario, ready to run."""

    args: list[Any]
    needles: list[str]  # regexes (case-insensitive) the one stderr line must all match
    out: Path | None = None  # the job's OUT, if any: must not end up "complete"
    protect: list[Path] = field(default_factory=list)  # stores that must be left untouched
    timeout: float = 60
    slow: bool = False  # reaches a cluster or waits for one: started first, to overlap with the rest


class Context:
    """What a case builder gets: a scratch directory, the seeded-input factory and the session's cluster."""

    def __init__(self, tmp_path: Path, make_input: Callable[..., str], scheduler: Callable[[], str]) -> None:
        self.tmp = tmp_path
        self.make_input = make_input
        self.scheduler = scheduler  # the address of the session's `dask scheduler`, started on first call
        self.out = tmp_path / "out.zarr"

    def good(self, **kwargs: Any) -> Path:
        """A valid input: m=20, 8x8x3 -> 4 channels, 3x3 kernel, stride 1, padding 1, chunks of 7 samples."""
        return Path(self.make_input(**kwargs))

    def backward(self, inputs: Path, *extra: Any, out: Path | None = None) -> list[Any]:
        return ["backward", inputs, out or self.out, *JOB, *extra]

    def backward_on_cluster(self, inputs: Path, *extra: Any) -> list[Any]:
        return ["backward", inputs, self.out, *on_cluster(self.scheduler()), *extra]

    def replace_array(self, inputs: Path, name: str, *, shape=None, dtype=None, fill: bool = True) -> None:
        """Replace ``name`` in ``inputs`` by a plain-zarr array of another shape and/or dtype."""
        group = zarr.open_group(str(inputs), mode="r+")
        old = group[name]
        data = np.asarray(old[...])
        shape = tuple(shape or old.shape)
        dtype = dtype or old.dtype
        del group[name]
        with warnings.catch_warnings():  # zarr warns that string/struct/bytes dtypes have no v3 spec yet
            warnings.simplefilter("ignore")
            new = group.create_array(name, shape=shape, dtype=dtype, chunks=(min(7, shape[0]), *shape[1:]))
        if fill and shape == data.shape and np.dtype(dtype).kind in "biufc":
            new[...] = data.astype(dtype)

    def complete_output(self, inputs: Path, out: Path, **kwargs: Any) -> Path:
        """A finished dconv output of ``inputs`` at ``out`` (computed in this process)."""
        dconv.backward_job(str(inputs), str(out), scheduler="synchronous", **kwargs)
        assert status_of(out) == "complete"
        return out

    def spec(self, text: str, name: str = "spec.toml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


CASES: dict[str, Callable[[Context], Case]] = {}


def case(name: str):
    def register(build: Callable[[Context], Case]) -> Callable[[Context], Case]:
        assert name not in CASES, name
        CASES[name] = build
        return build

    return register


def lit(text: Any) -> str:
    return re.escape(str(text))


# --------------------------------------------------------------------------- the input store


@case("input-missing")
def _(c: Context) -> Case:
    missing = c.tmp / "no-such-input.zarr"
    return Case(c.backward(missing), [lit(missing.name), r"does not exist|not found|no such|missing"], out=c.out)


@case("input-plain-directory")
def _(c: Context) -> Case:
    plain = c.tmp / "plain-dir"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a zarr store\n")
    return Case(c.backward(plain), [lit(plain.name), r"not a zarr group"], out=c.out, protect=[plain])


@case("input-is-zarr-array")
def _(c: Context) -> Case:
    array_path = c.tmp / "an-array.zarr"
    zarr.create_array(str(array_path), shape=(20, 8, 8, 3), dtype="float64")[...] = 1.0
    return Case(c.backward(array_path), [lit(array_path.name), r"array", r"not a group"], out=c.out, protect=[array_path])


# --------------------------------------------------------------------------- arrays, shapes


@case("array-missing")
def _(c: Context) -> Case:
    inputs = c.good()
    del zarr.open_group(str(inputs), mode="r+")["W"]
    return Case(c.backward(inputs), [r"'?\bW\b'?", r"no array|missing|not found"], out=c.out, protect=[inputs])


@case("array-wrong-ndim")
def _(c: Context) -> Case:
    inputs = c.good()
    c.replace_array(inputs, "W", shape=(3, 3, 3))
    return Case(c.backward(inputs), [r"\bW\b", r"4-D|4 dim|ndim|rank", lit((3, 3, 3))], out=c.out, protect=[inputs])


@case("shapes-disagree-channels")
def _(c: Context) -> Case:
    inputs = c.good()
    c.replace_array(inputs, "W", shape=(3, 3, 5, 4))
    return Case(c.backward(inputs), [r"\bW\b", r"A_prev", lit((3, 3, 5, 4))], out=c.out, protect=[inputs])


@case("shapes-disagree-dZ-spatial")
def _(c: Context) -> Case:
    inputs = c.good()
    c.replace_array(inputs, "dZ", shape=(20, 6, 6, 4))
    return Case(c.backward(inputs), [r"\bdZ\b", lit((20, 6, 6, 4)), r"\(20, 8, 8, 4\)"], out=c.out, protect=[inputs])


@case("shapes-disagree-hyperparameters")
def _(c: Context) -> Case:
    inputs = c.good()  # dZ is 8x8 for stride 1: stride 2 gives 3x3 with padding 0
    return Case(
        c.backward(inputs, "--stride", "2", "--padding", "0"),
        [r"\bdZ\b", lit((20, 8, 8, 4)), lit((20, 3, 3, 4)), r"stride 2"],
        out=c.out,
        protect=[inputs],
    )


@case("batch-sizes-differ")
def _(c: Context) -> Case:
    inputs = c.good()
    c.replace_array(inputs, "dZ", shape=(19, 8, 8, 4))
    return Case(c.backward(inputs), [r"batch", r"\b19\b", r"\b20\b"], out=c.out, protect=[inputs])


# --------------------------------------------------------------------------- dtypes (written with plain zarr)

BAD_DTYPES = {
    "bool": ("A_prev", "bool", r"\bbool"),
    "int": ("dZ", "int32", r"int32"),
    "uint": ("W", "uint8", r"uint8"),
    "complex": ("A_prev", "complex128", r"complex128"),
    "float16": ("dZ", "float16", r"float16"),
    "string": ("dZ", str, r"str"),
    "bytes": ("A_prev", "S8", r"S8|bytes"),
    "structured": ("W", np.dtype([("a", "<f8"), ("b", "<i4")]), r"'a'"),
}


def _dtype_case(name: str, array: str, dtype: Any, pattern: str) -> None:
    @case(f"dtype-{name}")
    def _(c: Context) -> Case:
        inputs = c.good()
        c.replace_array(inputs, array, dtype=dtype)
        return Case(
            c.backward(inputs), [rf"\b{array}\b", pattern, r"float32|float64|dtype"], out=c.out, protect=[inputs]
        )


for _name, (_array, _dtype, _pattern) in BAD_DTYPES.items():
    _dtype_case(_name, _array, _dtype, _pattern)


# --------------------------------------------------------------------------- corrupt metadata and chunks


@case("metadata-array-garbage")
def _(c: Context) -> Case:
    inputs = c.good()
    (inputs / "A_prev" / "zarr.json").write_bytes(b"\x00\x9f garbage {{{ not json")
    return Case(c.backward(inputs), [r"A_prev", r"metadata|corrupt"], out=c.out, protect=[inputs])


@case("metadata-array-json-garbage")
def _(c: Context) -> Case:
    inputs = c.good()  # valid JSON, invalid array metadata
    (inputs / "A_prev" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array", "shape": "oops"}')
    return Case(c.backward(inputs), [r"A_prev", r"metadata|corrupt"], out=c.out, protect=[inputs])


@case("metadata-group-garbage")
def _(c: Context) -> Case:
    inputs = c.good()
    (inputs / "zarr.json").write_text("garbage, not a group document")
    return Case(c.backward(inputs), [lit(inputs.name), r"metadata|corrupt"], out=c.out, protect=[inputs])


@case("metadata-group-json-garbage")
def _(c: Context) -> Case:
    inputs = c.good()
    (inputs / "zarr.json").write_text("[1, 2, 3]")
    return Case(c.backward(inputs), [lit(inputs.name), r"metadata|corrupt"], out=c.out, protect=[inputs])


# A message that names chunk 1 of the m axis (and no range of other chunks).
CHUNK_1 = r"chunks? (index )?\(?1(\.\.1)?\b(?!\.\.)|c/1/0/0/0|\(1, 0, 0, 0\)"


def _chunk_case(name: str, array: str, damage: str, batch_chunk: int, key: str, pattern: str, local: bool) -> None:
    """``local``: on the embedded cluster (its workers must print nothing); else on the session's cluster."""

    @case(name)
    def _(c: Context) -> Case:
        inputs = c.good()  # chunks of 7 samples: chunk 1 is samples 7..13
        path = inputs / array / "c" / Path(*key.split("/"))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 16)
        run = c.backward if local else c.backward_on_cluster
        return Case(
            run(inputs, "--batch-chunk", batch_chunk),
            [rf"\b{array}\b", pattern, r"corrupt|truncated|cannot (read|decode)"],
            out=c.out,
            protect=[inputs],
            slow=True,
        )


_chunk_case("chunk-A_prev-corrupt", "A_prev", "corrupt", 7, "1/0/0/0", CHUNK_1, local=True)
_chunk_case("chunk-A_prev-truncated", "A_prev", "truncated", 7, "1/0/0/0", CHUNK_1, local=False)
_chunk_case("chunk-A_prev-corrupt-unaligned-batch", "A_prev", "corrupt", 10, "1/0/0/0", CHUNK_1, local=False)
_chunk_case("chunk-W-corrupt", "W", "corrupt", 7, "0/0/0/0", r"chunk", local=False)


# --------------------------------------------------------------------------- hyperparameters and job options

PARAMETER_CASES = {
    "stride-zero": (["--stride", "0"], [r"stride", r"\b0\b"]),
    "stride-pair-zero": (["--stride", "1,0"], [r"stride", r"\(1, 0\)|\[1, 0\]|1,0"]),
    "dilation-zero": (["--dilation", "0"], [r"dilation", r"\b0\b"]),
    "dilation-negative": (["--dilation=-1"], [r"dilation", r"-1\b"]),
    "padding-negative": (["--padding", "-1"], [r"padding", r"-1\b"]),
    "padding-negative-pair": (["--padding", "1,-1"], [r"padding", r"-1\b"]),
    "padding-unknown-word": (["--padding", "sme"], [r"padding", r"'?sme'?"]),
    "batch-chunk-zero": (["--batch-chunk", "0"], [r"batch[_-]chunk", r"\b0\b"]),
    "batch-chunk-negative": (["--batch-chunk", "-3"], [r"batch[_-]chunk", r"-3\b"]),
    "split-every-one": (["--split-every", "1"], [r"split[_-]every", r"\b1\b"]),
    "kernel-larger-than-input-dilated": (["--dilation", "5"], [r"kernel", r"larger|too (large|big)|exceeds", r"\b11\b"]),
}


def _parameter_case(name: str, options: list[str], needles: list[str]) -> None:
    @case(name)
    def _(c: Context) -> Case:
        inputs = c.good()
        return Case(c.backward(inputs, *options), needles, out=c.out, protect=[inputs])


for _name, (_options, _needles) in PARAMETER_CASES.items():
    _parameter_case(_name, _options, _needles)


@case("kernel-larger-than-padded-input")
def _(c: Context) -> Case:
    inputs = c.good(height=2, width=2, padding=1)  # 3x3 kernel fits only with the stored padding 1
    return Case(
        c.backward(inputs, "--padding", "0"), [r"kernel", r"larger|too (large|big)|exceeds", r"\b2\b"],
        out=c.out, protect=[inputs],
    )


# --------------------------------------------------------------------------- cluster


@case("scheduler-nothing-listens")
def _(c: Context) -> Case:
    """Exit 2 after the connect timeout (2 s here: the default 10 s was the catalogue's longest wait, by far);
    OUT is not created (protected while absent)."""
    inputs = c.good()
    address = f"tcp://127.0.0.1:{free_port()}"
    args = ["backward", inputs, c.out, "--quiet", "--scheduler", address, "--connect-timeout", "2"]
    needles = [r"^dconv: error: ", rf"Dask scheduler.* at '{lit(address)}'", r"scheduler", r"\b2 s\b"]
    return Case(args, needles, out=c.out, protect=[inputs, c.out], timeout=40, slow=True)


# --------------------------------------------------------------------------- spec files

SPEC_BODY = """\
[input]
path = "{inputs}"

[output]
path = "{out}"
{output_extra}
[job]
batch_chunk = 7
{job_extra}
[cluster]
workers = 1
{tail}"""


def _spec_text(c: Context, inputs: Path, *, output_extra: str = "", job_extra: str = "", tail: str = "") -> str:
    return SPEC_BODY.format(inputs=inputs, out=c.out, output_extra=output_extra, job_extra=job_extra, tail=tail)


@case("spec-missing")
def _(c: Context) -> Case:
    missing = c.tmp / "no-such-spec.toml"
    return Case(["run", missing, "--quiet"], [lit(missing.name), r"cannot read|no such|does not exist|not found"])


@case("spec-is-directory")
def _(c: Context) -> Case:
    directory = c.tmp / "spec-dir.toml"
    directory.mkdir()
    return Case(["run", directory, "--quiet"], [lit(directory.name), r"cannot read|directory"])


@case("spec-not-utf8")
def _(c: Context) -> Case:
    path = c.tmp / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00\x81 binary garbage")
    return Case(["run", path, "--quiet"], [lit(path.name), r"cannot read|utf-8|decode"])


@case("spec-invalid-toml")
def _(c: Context) -> Case:
    path = c.spec("[input\npath = \n", "broken.toml")
    return Case(["run", path, "--quiet"], [lit(path.name), r"toml", r"line 1"])


@case("spec-typo-key")
def _(c: Context) -> Case:
    inputs = c.good()
    path = c.spec(_spec_text(c, inputs, job_extra="split_evry = 4\n"))
    return Case(
        ["run", path, "--quiet"],
        [r"split_evry", r"\[job\]", r"(mean|suggest|perhaps|close)\W.*\bsplit_every\b"],
        out=c.out, protect=[inputs],
    )


@case("spec-typo-table")
def _(c: Context) -> Case:
    inputs = c.good()
    path = c.spec(_spec_text(c, inputs, tail="[clutser]\nworkers = 2\n").replace("[cluster]\nworkers = 1\n", ""))
    return Case(
        ["run", path, "--quiet"], [r"clutser", r"(mean|suggest|perhaps|close)\W.*\bcluster\b"],
        out=c.out, protect=[inputs],
    )


@case("spec-unknown-key")
def _(c: Context) -> Case:
    inputs = c.good()
    path = c.spec(_spec_text(c, inputs, output_extra="compression = 'zstd'\n"))
    return Case(["run", path, "--quiet"], [r"compression", r"unknown", r"\[output\]"], out=c.out, protect=[inputs])


@case("spec-wrong-type")
def _(c: Context) -> Case:
    inputs = c.good()
    path = c.spec(_spec_text(c, inputs).replace("batch_chunk = 7", 'batch_chunk = "7"'))
    return Case(["run", path, "--quiet"], [r"batch_chunk", r"'7'|\"7\"", r"integer|int"], out=c.out, protect=[inputs])


@case("spec-padding-word-typo")
def _(c: Context) -> Case:
    inputs = c.good()
    path = c.spec(_spec_text(c, inputs, tail='[conv]\npadding = "smae"\n'))
    return Case(["run", path, "--quiet"], [r"padding", r"smae"], out=c.out, protect=[inputs])


# --------------------------------------------------------------------------- OUT


@case("out-exists-dconv-output")
def _(c: Context) -> Case:
    inputs = c.good()
    c.complete_output(inputs, c.out, batch_chunk=7)
    return Case(c.backward(inputs), [lit(c.out.name), r"exists", r"--overwrite|--resume"], protect=[inputs, c.out])


@case("out-exists-foreign-directory")
def _(c: Context) -> Case:
    inputs = c.good()
    c.out.mkdir()
    (c.out / "thesis.txt").write_text("years of work\n")
    return Case(c.backward(inputs), [lit(c.out.name), r"exists"], protect=[inputs, c.out])


@case("out-exists-foreign-directory-overwrite")
def _(c: Context) -> Case:
    inputs = c.good()
    c.out.mkdir()
    (c.out / "thesis.txt").write_text("years of work\n")
    return Case(c.backward(inputs, "--overwrite"), [lit(c.out.name), r"not a dconv output|refus"], protect=[inputs, c.out])


@case("out-inside-input")
def _(c: Context) -> Case:
    inputs = c.good()
    out = inputs / "gradients.zarr"
    return Case(c.backward(inputs, out=out), [r"inside", lit(inputs.name)], out=out, protect=[inputs])


@case("out-is-input-overwrite")
def _(c: Context) -> Case:
    inputs = c.good()
    return Case(c.backward(inputs, "--overwrite", out=inputs), [r"inside|same", lit(inputs.name)], protect=[inputs])


@case("input-inside-out-overwrite")
def _(c: Context) -> Case:
    # OUT is an earlier dconv output, and the input was put inside it: --overwrite would delete the input.
    out = c.complete_output(c.good(), c.tmp / "previous.zarr", batch_chunk=7)
    inputs = out / "inputs.zarr"
    shutil.copytree(c.good(seed=3), inputs)
    return Case(c.backward(inputs, "--overwrite", out=out), [r"inside|contains", lit(inputs.name)], protect=[out])


@case("resume-other-inputs")
def _(c: Context) -> Case:
    first, other = c.good(seed=1), c.good(seed=2)  # same shapes, other data and location
    c.complete_output(first, c.out, batch_chunk=7)
    return Case(  # on the session's cluster: dconv refuses only once the cluster is up
        c.backward_on_cluster(other, "--batch-chunk", "7", "--resume"),
        [r"resume", lit(other)],
        protect=[first, other, c.out],
        slow=True,
    )


# --------------------------------------------------------------------------- the test
#
# The cases are independent processes, so they run concurrently (a few at a time) in
# one module-scoped fixture; each parametrized test then checks its own case. Only the
# cases selected for this session are built and run (and the session's cluster started
# only if one of them uses it).

CONCURRENCY = 4


@dataclass
class Outcome:
    case: Case | None
    before: dict
    cwd: Path
    result: Any = None
    elapsed: float = 0.0
    error: BaseException | None = None


def _factory(root: Path) -> Callable[..., str]:
    """conftest's make_input, for a module-scoped fixture: seeded input groups under ``root``."""
    from dconv.store import make_inputs

    counter = iter(range(10_000))

    def make(**kwargs: Any) -> str:
        path = str(root / f"input-{next(counter)}.zarr")
        for key, value in dict(m=20, height=8, width=8, in_channels=3, out_channels=4, chunk=7, dtype="float64").items():
            kwargs.setdefault(key, value)
        return make_inputs(path, **kwargs)

    return make


@pytest.fixture(scope="module")
def catalogue(request, tmp_path_factory, forked_dconv) -> dict[str, Outcome]:
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_is_refused" and item.module is request.module
    ]
    outcomes: dict[str, Outcome] = {}

    def scheduler() -> str:
        return request.getfixturevalue("dask_cluster")["address"]

    for name in selected:
        root = tmp_path_factory.mktemp(name)
        try:
            bad = CASES[name](Context(root, _factory(root), scheduler))
        except Exception as e:  # a broken setup fails its own case only
            outcomes[name] = Outcome(None, {}, root, error=e)
            continue
        outcomes[name] = Outcome(bad, {path: snapshot(path) for path in bad.protect}, root)

    def run(name: str) -> None:
        outcome = outcomes[name]
        t0 = time.monotonic()
        try:
            outcome.result = forked_dconv.run(outcome.case.args, cwd=outcome.cwd, timeout=outcome.case.timeout)
        except BaseException as e:  # a timeout: reported by the case's test
            outcome.error = e
        outcome.elapsed = time.monotonic() - t0

    # the slow cases first, so that they overlap with the rest
    order = sorted(outcomes, key=lambda n: not (outcomes[n].case and outcomes[n].case.slow))
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(run, [name for name in order if outcomes[name].case is not None]))
    return outcomes


def check_usage_error(result, needles: list[str]) -> str:
    """Exit 2, one stderr line matching every needle, no traceback, nothing on stdout; returns the line."""
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert result.stdout == "", describe(result)
    # the plan's warnings (one line each, "dconv: warning: ...") may come first: the error is one line
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("dconv: warning: ")]
    assert len(lines) == 1, f"stderr should be one line:\n{describe(result)}"
    for needle in needles:
        assert re.search(needle, lines[0], re.IGNORECASE), f"{needle!r} not in the message:\n{describe(result)}"
    return lines[0]


# Cases that fail against the current dconv; each reason is reported upstream with a reproducer.
WORKER_LOG = (
    "dconv bug: the local cluster's workers print distributed's 'Compute Failed' ERROR log "
    "(with a 'Traceback:' field) on stderr besides the one-line message"
)
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n for n in CASES],
)
def test_bad_input_is_refused(name, catalogue):
    outcome = catalogue[name]
    bad, result = outcome.case, outcome.result
    if bad is None:
        raise AssertionError(f"setting up the case failed: {outcome.error!r}") from outcome.error
    if outcome.error is not None:
        raise AssertionError(f"dconv {bad.args} did not finish: {outcome.error!r}")
    try:
        check_usage_error(result, bad.needles)
    finally:  # data safety is checked even when the message is wrong
        for path, contents in outcome.before.items():
            assert snapshot(path) == contents, f"{path} was modified or destroyed:\n{describe(result)}"
        if bad.out is not None and bad.out not in bad.protect:
            assert status_of(bad.out) != "complete", f"{bad.out} was marked complete:\n{describe(result)}"
    assert outcome.elapsed < bad.timeout


# --------------------------------------------------------------------------- NaN and Inf


def _plant_nonfinite(inputs: str) -> dict[str, np.ndarray]:
    """Put NaN and +-Inf into A_prev and dZ; return the arrays as now stored."""
    group = zarr.open_group(inputs, mode="r+")
    a, dz = np.asarray(group["A_prev"][...]), np.asarray(group["dZ"][...])
    a[3, 2, 2, 1] = np.nan
    a[15, 0, 0, 0] = np.inf
    dz[9, 4, 4, 2] = -np.inf
    group["A_prev"][...] = a
    group["dZ"][...] = dz
    return {"A_prev": a, "dZ": dz, "W": np.asarray(group["W"][...])}


def _nonfinite(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def inspect_json(forked_dconv, out: Any) -> tuple[int, dict]:
    result = forked_dconv.run(["inspect", out, "--json"])
    assert "Traceback" not in result.stderr, describe(result)
    return result.returncode, json.loads(result.stdout)


@pytest.mark.cluster
def test_nonfinite_inputs_propagate_and_are_counted(forked_dconv, dask_cluster, make_input, tmp_path):
    inputs = make_input()
    arrays = _plant_nonfinite(inputs)
    out = tmp_path / "out.zarr"
    job = ["backward", inputs, out, *on_cluster(dask_cluster["address"]), "--batch-chunk", "5"]
    result = forked_dconv.run(job, cwd=tmp_path)
    assert result.returncode == 0, describe(result)

    with np.errstate(invalid="ignore", over="ignore"):
        expected = dconv.conv2d_backward(arrays["dZ"], arrays["A_prev"], arrays["W"], stride=1, padding=1)
    stored = read_arrays(out)
    counts = {name: _nonfinite(stored[name]) for name in ("dA_prev", "dW", "db")}
    assert counts == {name: _nonfinite(getattr(expected, name)) for name in ("dA_prev", "dW", "db")}
    assert all(count > 0 for count in counts.values()), counts  # NaN/Inf reached all three outputs
    # the finite values are the ones the kernel computes
    for name in counts:
        finite = np.isfinite(getattr(expected, name))
        np.testing.assert_allclose(stored[name][finite], getattr(expected, name)[finite], rtol=1e-10, atol=1e-12)

    code, summary = inspect_json(forked_dconv, out)
    assert code == 0
    assert summary["status"] == "complete"
    assert summary["nonfinite"] == counts


@pytest.mark.cluster
def test_check_finite_fails_fast(forked_dconv, dask_cluster, make_input, tmp_path):
    inputs = make_input(m=40)
    group = zarr.open_group(inputs, mode="r+")
    dz = np.asarray(group["dZ"][...])
    dz[2, 1, 1, 0] = np.nan  # in the third of 40 one-sample chunks
    group["dZ"][...] = dz
    before = snapshot(inputs)
    out = tmp_path / "out.zarr"
    job = ["backward", inputs, out, *on_cluster(dask_cluster["address"]), "--batch-chunk", "1", "--check-finite"]
    result = forked_dconv.run(job, cwd=tmp_path)
    try:
        check_usage_error(result, [r"\bdZ\b", r"non-?finite|nan", r"\b2\b"])
    finally:
        assert snapshot(inputs) == before
        assert status_of(out) != "complete"
    flags = done_flags(out)
    assert flags is None or not flags.all(), "the job ran every chunk before failing"

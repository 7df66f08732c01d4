"""Object storage: dconv against a real S3 API (moto's server on 127.0.0.1), end to end.

Covers the CLI (make-inputs -> backward -> inspect) with credentials from the
standard AWS environment variables, the Python API and the CLI with credentials
given only as fsspec storage options (and never written or printed), a ``dconv
run`` spec whose ``[storage]`` table carries the endpoint, an input written by
plain zarr + s3fs, and the structural guarantee that workers read and write the
store themselves.

moto accepts any credentials; the secret below is distinctive so that a leak is
found by a plain substring search.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from dconv.graph import CHUNK_PREFIX
from dconv.sources import ZarrBatches
from dconv.job import JobResult
from dconv.plan import plan_job
from dconv.store import OutputStore

from conftest import free_port

s3fs = pytest.importorskip("s3fs")

ACCESS_KEY = "AKIDdconvS3testKEY42"
SECRET = "s3cr3t-value-xyz"
NEEDLES = (SECRET, ACCESS_KEY)
REGION = "us-east-1"
REL_TOL = 1e-12  # same job, same chunking: the reduction order is the same
TORCH_TOL = 1e-10
CLI_TIMEOUT = 120  # seconds, for a subprocess that starts a local cluster
SHORT_TIMEOUT = 60

# Input geometry shared by the end-to-end tests: kernel 3, stride 1, padding 1 (make_inputs' default).
SHAPE = {"height": 8, "width": 8, "in_channels": 3, "out_channels": 4}


# --------------------------------------------------------------------------- helpers


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def assert_close(got: dict, want: dict, tol: float) -> None:
    for name in ("dA_prev", "dW", "db"):
        err = rel_err(got[name], want[name])
        assert err <= tol, (name, err, tol)


def storage_options(endpoint: str) -> dict:
    """Everything s3fs needs, given explicitly (no environment)."""
    return {"endpoint_url": endpoint, "key": ACCESS_KEY, "secret": SECRET}


def base_env() -> dict[str, str]:
    """This process's environment without any AWS_* variable, hermetic against local AWS config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",  # never probe an instance metadata service
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def aws_env_vars(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point boto at moto."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


def dead_endpoint() -> str:
    """An endpoint nothing listens on: anything that ignores the explicit options fails fast."""
    return f"http://127.0.0.1:{free_port()}"


def new_fs(endpoint: str):
    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options(endpoint))


def new_bucket(endpoint: str) -> str:
    name = f"dconv-{uuid.uuid4().hex[:12]}"
    new_fs(endpoint).mkdir(name)
    return name


@pytest.fixture(scope="module")
def run_dconv(forked_dconv):
    """``run_dconv(args, env, timeout, cwd)``: ``dconv ARGS`` as a process of its own with the environment
    ``env``, forked from one that has imported dconv and s3fs (conftest's ``forked_dconv``): ``env`` may differ
    from this process's environment only in variables read at run time (the AWS ones)."""

    def run(args: list, env: dict[str, str], timeout: float = SHORT_TIMEOUT, cwd=None) -> subprocess.CompletedProcess:
        changes = {name: env.get(name) for name in set(os.environ) | set(env) if os.environ.get(name) != env.get(name)}
        return forked_dconv.run(args, env=changes, timeout=timeout, cwd=cwd)

    return run


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_no_secret_in_text(*texts: str) -> None:
    for text in texts:
        for needle in NEEDLES:
            assert needle not in text, f"{needle!r} appears in:\n{text}"


def assert_no_secret_in_objects(endpoint: str, prefix: str, min_objects: int = 1) -> list[str]:
    """Read every object under ``prefix`` (and its S3 metadata); none may hold the key or secret."""
    fs = new_fs(endpoint)
    paths = fs.find(prefix)
    assert len(paths) >= min_objects, paths
    hits = []
    for path in paths:
        data = fs.cat_file(path)
        info = json.dumps(fs.info(path), default=str)
        for needle in NEEDLES:
            if needle.encode() in data or needle in info:
                hits.append((path, needle))
    assert not hits, hits
    return paths


def read_arrays(url: str, names, so: dict | None = None) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r", storage_options=so)
    return {name: np.asarray(group[name][...]) for name in names}


def read_result(url: str, so: dict) -> dict[str, np.ndarray]:
    group = dconv.open_result(url, storage_options=so)
    return {name: np.asarray(group[name][...]) for name in ("dA_prev", "dW", "db")}


def kernel_oracle(inputs: dict, **params) -> dict[str, np.ndarray]:
    grads = dconv.conv2d_backward(inputs["dZ"], inputs["A_prev"], inputs["W"], **params)
    return dict(zip(("dA_prev", "dW", "db"), grads))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1:<free port>, for this module; yields its URL."""
    pytest.importorskip("moto")
    script = Path(sys.executable).with_name("moto_server")
    if not script.exists():
        pytest.skip(f"moto_server not found next to {sys.executable}")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [str(script), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"moto_server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                opener.open(endpoint + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:  # any HTTP answer means it is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 30 s:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket for one test."""
    name = new_bucket(s3_endpoint)
    yield name
    with contextlib.suppress(Exception):
        new_fs(s3_endpoint).rm(name, recursive=True)


@pytest.fixture
def env_credentials(monkeypatch, s3_endpoint):
    """Credentials and endpoint in the standard AWS environment variables of this process."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**base_env(), **aws_env_vars(s3_endpoint)}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def no_env_credentials(monkeypatch):
    """No AWS credentials in the environment, and AWS_ENDPOINT_URL pointing at nothing.

    Anything that falls back on the environment instead of the explicit storage
    options fails (connection refused) rather than reaching moto.
    """
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in base_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead_endpoint())
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bare_workers(client, s3_endpoint):
    """The session LocalCluster, after checking its workers cannot reach moto through their environment."""
    endpoints = client.run(lambda: os.environ.get("AWS_ENDPOINT_URL"))
    assert s3_endpoint not in endpoints.values(), endpoints
    return client


# --------------------------------------------------------------------------- CLI, credentials from the environment

CLI_M, CLI_CHUNK, CLI_BATCH = 50, 7, 16  # 4 batch chunks (16, 16, 16, 2), misaligned with the input chunks


@pytest.fixture(scope="module")
def cli_job(s3_endpoint, run_dconv):
    """make-inputs -> backward --workers 2 -> inspect -> inspect --json, each a process of its own, on s3://.

    The subprocesses get the endpoint and credentials from AWS_* variables only.
    """
    bkt = new_bucket(s3_endpoint)
    inp, out = f"s3://{bkt}/in.zarr", f"s3://{bkt}/out.zarr"
    env = {**base_env(), **aws_env_vars(s3_endpoint)}
    make = run_dconv(
        ["make-inputs", inp, "--m", CLI_M, "--chunk", CLI_CHUNK, "--dtype", "float64", "--seed", 7,
         "--height", SHAPE["height"], "--width", SHAPE["width"],
         "--in-channels", SHAPE["in_channels"], "--out-channels", SHAPE["out_channels"]],
        env,
    )
    assert make.returncode == 0, describe(make)
    backward = run_dconv(
        ["backward", inp, out, "--batch-chunk", CLI_BATCH, "--workers", 2, "--quiet"], env, timeout=CLI_TIMEOUT
    )
    assert backward.returncode == 0, describe(backward)
    with ThreadPoolExecutor(2) as pool:  # two independent processes
        inspect, inspect_json = pool.map(lambda args: run_dconv(args, env),
                                         (["inspect", out], ["inspect", out, "--json"]))
    return {
        "bucket": bkt, "inp": inp, "out": out, "env": env,
        "make": make, "backward": backward, "inspect": inspect, "inspect_json": inspect_json,
    }


@pytest.mark.cluster
def test_cli_env_credentials_inspect_reports_complete(cli_job):
    out, n_chunks = cli_job["out"], math.ceil(CLI_M / CLI_BATCH)
    assert cli_job["backward"].stdout.startswith(f"dconv: wrote {out}: {n_chunks} of {n_chunks} chunks computed")

    text = cli_job["inspect"]
    assert text.returncode == 0, describe(text)
    lines = text.stdout.splitlines()
    assert lines[0] == f"{out}: complete"
    assert f"{n_chunks} of {n_chunks} batch chunks done" in text.stdout
    assert "INCOMPLETE" not in text.stdout

    proc = cli_job["inspect_json"]
    assert proc.returncode == 0, describe(proc)
    summary = json.loads(proc.stdout)
    assert summary["complete"] is True and summary["status"] == "complete"
    assert summary["location"] == out
    assert summary["chunks"] == {"total": n_chunks, "done": n_chunks, "missing": [], "missing_count": 0}
    assert summary["arrays"]["dA_prev"]["shape"] == [CLI_M, SHAPE["height"], SHAPE["width"], SHAPE["in_channels"]]
    assert summary["arrays"]["dA_prev"]["chunks"][0] == CLI_BATCH
    assert summary["provenance"]["input"] == cli_job["inp"]
    assert summary["provenance"]["batch_chunk"] == CLI_BATCH
    # The credentials came from the environment: they are not in any output either.
    for name in ("make", "backward", "inspect", "inspect_json"):
        assert_no_secret_in_text(cli_job[name].stdout, cli_job[name].stderr)
    assert_no_secret_in_objects(cli_job["env"]["AWS_ENDPOINT_URL"], cli_job["out"].removeprefix("s3://"), 10)


@pytest.mark.cluster
def test_cli_output_opens_in_xarray(cli_job, s3_endpoint):
    xr = pytest.importorskip("xarray")
    so = storage_options(s3_endpoint)
    ds = xr.open_zarr(cli_job["out"], consolidated=False, storage_options=so)
    try:
        assert set(ds.data_vars) == {"dA_prev", "dW", "db"}
        assert ds["dA_prev"].dims == ("m", "n_H_prev", "n_W_prev", "C_prev")
        assert ds.sizes["m"] == CLI_M
        assert (ds.sizes["C_prev"], ds.sizes["C"]) == (SHAPE["in_channels"], SHAPE["out_channels"])
        stored = read_result(cli_job["out"], so)
        for name in ("dA_prev", "dW", "db"):
            np.testing.assert_array_equal(ds[name].values, stored[name])
    finally:
        ds.close()


@pytest.mark.cluster
def test_cli_output_matches_same_job_on_local_copy(cli_job, env_credentials, client, tmp_path):
    """The s3:// run equals the same job (same batch_chunk) on a local copy of the input."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and credentials from AWS_* (monkeypatched)
    local_in, local_out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    fs.get(cli_job["inp"].removeprefix("s3://"), str(local_in), recursive=True)
    assert (local_in / "A_prev" / "zarr.json").exists()
    result = dconv.backward_job(str(local_in), str(local_out), batch_chunk=CLI_BATCH, client=client)
    local = read_arrays(str(local_out), ("dA_prev", "dW", "db"))
    # An in-process zarr read with no storage options at all: endpoint and credentials from the environment.
    remote = read_arrays(cli_job["out"], ("dA_prev", "dW", "db"))
    assert remote["dA_prev"].dtype == np.float64
    assert_close(remote, local, REL_TOL)
    assert_close({"dA_prev": remote["dA_prev"], "dW": result.dW, "db": result.db}, local, REL_TOL)


@pytest.mark.cluster
def test_cli_output_matches_torch_autograd(cli_job, s3_endpoint):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    so = storage_options(s3_endpoint)
    inputs = read_arrays(cli_job["inp"], ("A_prev", "dZ", "W"), so)
    x = torch.from_numpy(np.ascontiguousarray(inputs["A_prev"].transpose(0, 3, 1, 2))).requires_grad_()
    k = torch.from_numpy(np.ascontiguousarray(inputs["W"].transpose(3, 2, 0, 1))).requires_grad_()
    bias = torch.zeros(SHAPE["out_channels"], dtype=torch.float64, requires_grad=True)
    z = F.conv2d(x, k, bias, stride=1, padding=1)
    z.backward(torch.from_numpy(np.ascontiguousarray(inputs["dZ"].transpose(0, 3, 1, 2))))
    want = {
        "dA_prev": x.grad.numpy().transpose(0, 2, 3, 1),
        "dW": k.grad.numpy().transpose(2, 3, 1, 0),
        "db": bias.grad.numpy().reshape(1, 1, 1, -1),
    }
    assert_close(read_result(cli_job["out"], so), want, TORCH_TOL)


# --------------------------------------------------------------------------- Python API, explicit storage options


@pytest.mark.cluster
def test_api_explicit_storage_options_and_no_secret_in_output(s3_endpoint, bucket, bare_workers, no_env_credentials):
    so = storage_options(s3_endpoint)
    inp, out = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
    dconv.make_inputs(inp, m=37, chunk=8, dtype="float64", seed=3, storage_options=so, **{
        "height": 7, "width": 6, "in_channels": 3, "out_channels": 5, "stride": 2, "padding": "same"})
    result = dconv.backward_job(inp, out, batch_chunk=10, split_every=2, client=bare_workers, storage_options=so)

    inputs = read_arrays(inp, ("A_prev", "dZ", "W"), so)
    want = kernel_oracle(inputs, stride=2, padding="same")
    stored = read_result(out, so)
    assert_close(stored, want, REL_TOL)
    assert_close({"dA_prev": stored["dA_prev"], "dW": result.dW, "db": result.db}, want, REL_TOL)
    assert (result.n_chunks, result.computed_chunks, result.out) == (4, 4, out)

    # Nothing written holds the key or the secret: every object of input and output, and its metadata.
    paths = assert_no_secret_in_objects(s3_endpoint, bucket, min_objects=20)
    assert f"{bucket}/out.zarr/zarr.json" in paths and f"{bucket}/in.zarr/zarr.json" in paths
    attrs = dict(zarr.open_group(out, mode="r", storage_options=so).attrs)
    assert attrs["dconv"]["status"] == "complete" and attrs["dconv"]["input"] == inp
    assert_no_secret_in_text(json.dumps(attrs), repr(result), str(result.seconds))


# --------------------------------------------------------------------------- CLI, --storage-option only


@pytest.mark.cluster
def test_cli_storage_options_pass_through_and_never_print_secret(s3_endpoint, bucket, bare_workers, run_dconv):
    """Endpoint and credentials only as --storage-option; AWS_ENDPOINT_URL points at nothing.

    The successful job runs on the session cluster, whose workers have no AWS settings at all,
    so they reach moto only through the options; the failing one starts its own worker, so
    the worker's log lands in the captured stderr too.
    """
    so = storage_options(s3_endpoint)
    options = [arg for k, v in so.items() for arg in ("--storage-option", f"{k}={v}")]
    env = {**base_env(), "AWS_ENDPOINT_URL": dead_endpoint()}
    inp, out = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
    procs = {}

    procs["make"] = run_dconv(
        ["make-inputs", inp, "--m", 30, "--chunk", 9, "--dtype", "float64", "--seed", 11,
         "--height", 6, "--width", 7, "--in-channels", 2, "--out-channels", 3, *options], env)
    assert procs["make"].returncode == 0, describe(procs["make"])
    procs["backward"] = run_dconv(
        ["backward", inp, out, "--batch-chunk", 8, "--scheduler", bare_workers.scheduler.address, "--quiet",
         *options], env, timeout=CLI_TIMEOUT)
    assert procs["backward"].returncode == 0, describe(procs["backward"])
    procs["inspect"] = run_dconv(["inspect", out, *options], env)
    assert procs["inspect"].returncode == 0, describe(procs["inspect"])
    assert procs["inspect"].stdout.splitlines()[0] == f"{out}: complete"
    assert_close(read_result(out, so), kernel_oracle(read_arrays(inp, ("A_prev", "dZ", "W"), so), padding=1), REL_TOL)

    # The cases below are independent processes: they run concurrently, and are checked one by one.
    fs = new_fs(s3_endpoint)
    fs.copy(f"{bucket}/in.zarr", f"{bucket}/no_dz.zarr", recursive=True)
    fs.rm(f"{bucket}/no_dz.zarr/dZ", recursive=True)
    fs.copy(f"{bucket}/in.zarr", f"{bucket}/corrupt.zarr", recursive=True)
    fs.pipe(f"{bucket}/corrupt.zarr/A_prev/c/1/0/0/0", b"not a blosc frame")
    cases = {
        # without the options
        "no_options": (["inspect", out], SHORT_TIMEOUT),
        # an input without dZ
        "missing_array": (["backward", f"s3://{bucket}/no_dz.zarr", f"s3://{bucket}/o1.zarr", "--workers", 1, "--quiet",
                           "--debug", *options], SHORT_TIMEOUT),
        # a missing input store
        "missing_store": (["backward", f"s3://{bucket}/nothing.zarr", f"s3://{bucket}/o2.zarr", "--quiet", *options],
                          SHORT_TIMEOUT),
        # a corrupt A_prev chunk
        "corrupt": (["backward", f"s3://{bucket}/corrupt.zarr", f"s3://{bucket}/o3.zarr", "--batch-chunk", 8,
                     "--workers", 1, "--quiet", "--debug", *options], CLI_TIMEOUT),
        # an output that does not exist
        "inspect_missing": (["inspect", f"s3://{bucket}/o4.zarr", "--json", *options], SHORT_TIMEOUT),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(run_dconv, args, env, timeout) for name, (args, timeout) in cases.items()}
        procs.update((name, future.result()) for name, future in futures.items())

    # Without the options the same command cannot reach the store (so they were what made it work).
    assert procs["no_options"].returncode != 0, describe(procs["no_options"])

    # Error cases. An input without dZ: rejected before anything runs, with the array named.
    assert procs["missing_array"].returncode == 2, describe(procs["missing_array"])
    assert "has no array 'dZ'" in procs["missing_array"].stderr
    assert not fs.exists(f"{bucket}/o1.zarr")
    # A missing input store.
    assert procs["missing_store"].returncode == 2, describe(procs["missing_store"])
    assert "does not exist" in procs["missing_store"].stderr
    # A corrupt A_prev chunk: the job fails on a worker (whose log goes to this stderr too) ...
    assert procs["corrupt"].returncode != 0, describe(procs["corrupt"])
    assert "corrupt" in procs["corrupt"].stderr
    # ... and inspect reports it failed, with the reason recorded in the store.
    procs["inspect_failed"] = run_dconv(["inspect", f"s3://{bucket}/o3.zarr", *options], env)
    assert procs["inspect_failed"].returncode == 3, describe(procs["inspect_failed"])
    assert "failed" in procs["inspect_failed"].stdout and "reason:" in procs["inspect_failed"].stdout
    # An output that does not exist.
    assert procs["inspect_missing"].returncode == 2, describe(procs["inspect_missing"])

    for name, proc in procs.items():
        assert proc.stdout or proc.stderr, name
        assert_no_secret_in_text(proc.stdout, proc.stderr)
    assert_no_secret_in_objects(s3_endpoint, bucket, min_objects=40)


def test_output_store_repr_hides_credentials():
    store = OutputStore("s3://bucket/out.zarr", {"key": ACCESS_KEY, "secret": SECRET})
    assert_no_secret_in_text(repr(store), str(store))


# --------------------------------------------------------------------------- dconv run with a [storage] table


@pytest.mark.cluster
def test_run_spec_storage_table(s3_endpoint, bucket, bare_workers, tmp_path, run_dconv):
    """[input]/[output] on s3://, endpoint and credentials only in [storage]; the input is made by [input.make]."""
    inp, out = f"s3://{bucket}/spec-in.zarr", f"s3://{bucket}/spec-out.zarr"
    spec = tmp_path / "job.toml"
    spec.write_text(
        f"""
[input]
path = "{inp}"

[input.make]
m = 26
height = 6
width = 5
in_channels = 2
out_channels = 3
dtype = "float64"
chunk = 5
seed = 5

[output]
path = "{out}"

[job]
batch_chunk = 8
split_every = 2

[cluster]
scheduler = "{bare_workers.scheduler.address}"

[storage]
endpoint_url = "{s3_endpoint}"
key = "{ACCESS_KEY}"
secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    env = {**base_env(), "AWS_ENDPOINT_URL": dead_endpoint()}
    proc = run_dconv(["run", spec, "--quiet"], env, timeout=CLI_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert f"dconv: wrote {out}: 4 of 4 chunks computed" in proc.stdout
    assert_no_secret_in_text(proc.stdout, proc.stderr)

    so = storage_options(s3_endpoint)
    assert_close(read_result(out, so), kernel_oracle(read_arrays(inp, ("A_prev", "dZ", "W"), so), padding=1), REL_TOL)
    provenance = dict(zarr.open_group(out, mode="r", storage_options=so).attrs["dconv"])
    assert provenance["input"] == inp and provenance["batch_chunk"] == 8
    assert_no_secret_in_objects(s3_endpoint, bucket, min_objects=20)


# --------------------------------------------------------------------------- an input written by plain zarr + s3fs


@pytest.mark.cluster
def test_plain_zarr_input_on_s3(s3_endpoint, bucket, bare_workers, no_env_credentials):
    """A group made with zarr.create_group (default codecs, no b, chunked along every axis, no
    dimension names) with a classic hparameters attribute; batch_chunk 10 straddles its chunks."""
    so = storage_options(s3_endpoint)
    url, out = f"s3://{bucket}/plain.zarr", f"s3://{bucket}/plain-out.zarr"
    rng = np.random.default_rng(20261126)
    data = {
        "A_prev": rng.standard_normal((33, 9, 7, 3)),
        "dZ": rng.standard_normal((33, 9, 7, 4)),  # stride 1, pad 1, 3x3 kernel: same spatial size
        "W": rng.standard_normal((3, 3, 3, 4)) / 5,
    }
    chunks = {"A_prev": (7, 5, 7, 2), "dZ": (13, 9, 4, 4), "W": (2, 3, 3, 4)}
    root = zarr.create_group(url, storage_options=so, zarr_format=3)
    root.attrs["hparameters"] = {"stride": 1, "pad": 1}
    for name, array in data.items():
        root.create_array(name, shape=array.shape, chunks=chunks[name], dtype=array.dtype)[...] = array

    result = dconv.backward_job(url, out, batch_chunk=10, client=bare_workers, storage_options=so)

    want = kernel_oracle(data, stride=1, padding=1)
    stored = read_result(out, so)
    assert_close(stored, want, REL_TOL)
    assert_close({"dA_prev": stored["dA_prev"], "dW": result.dW, "db": result.db}, want, REL_TOL)
    provenance = dict(zarr.open_group(out, mode="r", storage_options=so).attrs["dconv"])
    assert provenance["params"]["padding"] == [[1, 1], [1, 1]] and provenance["n_chunks"] == 4


# --------------------------------------------------------------------------- data never flows through the client


@pytest.mark.cluster
def test_workers_read_and_write_the_store_themselves(s3_endpoint, bucket, bare_workers, no_env_credentials):
    so = storage_options(s3_endpoint)
    inp, out = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
    m, batch_chunk = 48, 16
    dconv.make_inputs(inp, m=m, height=16, width=16, in_channels=8, out_channels=4, chunk=12, dtype="float64",
                      storage_options=so)
    batch_bytes = batch_chunk * 16 * 16 * 8 * 8  # one A_prev batch: 256 KiB

    plan = plan_job(inp, out, batch_chunk=batch_chunk, storage_options=so)
    # The inputs are references to the S3 arrays, not data: each task reads its own rows.
    for batches, name in ((plan.a_sources, "A_prev"), (plan.dz_sources, "dZ")):
        assert isinstance(batches, ZarrBatches), type(batches)
        assert batches.name == name
        assert isinstance(batches.array.store, zarr.storage.FsspecStore)
        assert "s3" in batches.array.store.fs.protocol
        assert len(pickle.dumps(batches)) < batch_bytes / 50

    # The chunk tasks carry only integers and one reference to the job's shared context
    # (W, the geometry, the output, the input references), which holds no batch data.
    graph = plan.graph()
    dsk = dict(graph.to_delayed().__dask_graph__())
    chunk_tasks = {k: t for k, t in dsk.items() if isinstance(k, tuple) and str(k[0]).startswith(CHUNK_PREFIX)}
    assert len(chunk_tasks) == len(plan.bounds)
    for key, task in chunk_tasks.items():
        assert not any(isinstance(arg, np.ndarray) for arg in task.args), key
        assert len(task.dependencies) == 1, task.dependencies  # only the shared context
        assert len(pickle.dumps(task)) < 400, key
    graph_bytes = sum(len(pickle.dumps(task)) for task in dsk.values())
    assert graph_bytes < batch_bytes / 4, graph_bytes  # the whole graph is smaller than a quarter of one batch

    result = dconv.backward_job(inp, out, batch_chunk=batch_chunk, client=bare_workers, storage_options=so)
    # The client gets back only the reduced dW and db: there is no dA_prev in the result.
    assert isinstance(result, JobResult)
    assert "dA_prev" not in {f.name for f in fields(result)} and not hasattr(result, "dA_prev")
    assert result.dW.shape == (3, 3, 8, 4) and result.db.shape == (1, 1, 1, 4)
    # The workers wrote every dA_prev chunk object to S3 themselves.
    fs = new_fs(s3_endpoint)
    written = sorted(p.rsplit("/c/", 1)[1] for p in fs.find(f"{bucket}/out.zarr/dA_prev") if "/c/" in p)
    assert written == [f"{i}/0/0/0" for i in range(m // batch_chunk)]
    inputs = read_arrays(inp, ("A_prev", "dZ", "W"), so)
    assert_close(read_result(out, so), kernel_oracle(inputs, padding=1), REL_TOL)

"""dconv.job.backward_job end to end: results against the single-process kernel, batch chunking,
in-memory and plain-Zarr inputs, xarray, overwrite refusal, and bitwise reproducibility of dW/db
across schedulers and worker counts. Fault tolerance and bad inputs live in test_faults.py and
test_catalogue.py."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputError, SimdLevelError, simd
from dconv.cluster import ClusterOptions
from dconv.options import JobOptions
from dconv.plan import plan_job
from dconv.store import OutputStore

from _pipeline import CONVS, PIPELINE_TOL, assert_matches, kernel_gradients, provenance, read_inputs, read_output, rel_err
from conftest import free_port

CONV_IDS = list(CONVS)



# --------------------------------------------------------------------------- against the kernel


@pytest.mark.cluster
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("conv", CONV_IDS)
def test_matches_kernel(make_input, client, tmp_path, conv, dtype):
    """dA_prev read back from Zarr, dW and db agree with conv2d_backward on the whole batch."""
    case = CONVS[conv]
    inp = make_input(m=13, chunk=5, dtype=dtype, **case.make_kwargs())
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(inp, out, batch_chunk=4, split_every=2, client=client, **case.params)
    expected = kernel_gradients(read_inputs(inp), **case.params)
    output = read_output(out)
    assert_matches(output, expected, dtype)
    # the returned dW/db are the stored ones
    np.testing.assert_array_equal(result.dW, output["dW"])
    np.testing.assert_array_equal(result.db, output["db"])
    assert result.db.shape == (1, 1, 1, 4)
    assert (result.n_chunks, result.computed_chunks) == (4, 4)
    assert result.nonfinite == {"dA_prev": 0, "dW": 0, "db": 0}


@pytest.mark.parametrize("conv", CONV_IDS)
def test_stored_hyperparameters_are_used(make_input, tmp_path, conv):
    """make_inputs records the conv in the hparameters attribute; a job without options uses it."""
    case = CONVS[conv]
    inp = make_input(m=6, **case.make_kwargs())
    dconv.backward_job(inp, tmp_path / "out.zarr", batch_chunk=4, scheduler="threads")
    assert_matches(read_output(tmp_path / "out.zarr"), kernel_gradients(read_inputs(inp), **case.params), "float64")


@pytest.mark.cluster
@pytest.mark.parametrize(
    "m, batch_chunk, input_chunk",
    [
        (20, 6, 7),  # m not a multiple of batch_chunk, Zarr chunks misaligned
        (21, 5, 7),  # misaligned, short last chunk
        (5, 8, 7),  # m < batch_chunk: one short chunk
        (14, 7, 7),  # aligned
        (9, 1, 4),  # one sample per task
        (1, 3, 1),  # a single sample
        (12, 4, 12),  # input in one Zarr chunk, several tasks
    ],
)
def test_batch_chunking(make_input, client, tmp_path, m, batch_chunk, input_chunk):
    inp = make_input(m=m, chunk=input_chunk, padding=1)
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(inp, out, batch_chunk=batch_chunk, split_every=3, client=client)
    n_chunks = -(-m // batch_chunk)
    assert (result.n_chunks, result.computed_chunks) == (n_chunks, n_chunks)
    assert_matches(read_output(out), kernel_gradients(read_inputs(inp), padding=1), "float64")
    group = dconv.open_result(str(out))
    assert group["dA_prev"].shape == (m, 8, 8, 3)
    assert group["dA_prev"].chunks == (min(batch_chunk, m), 8, 8, 3)
    assert provenance(out)["n_chunks"] == n_chunks
    assert provenance(out)["batch_chunk"] == batch_chunk


def test_default_options(make_input, tmp_path):
    """batch_chunk 256 rounded down to the input's Zarr chunk (7 here: 252), split_every 8 by default."""
    inp = make_input(m=10, padding=1)
    result = dconv.backward_job(inp, tmp_path / "out.zarr", scheduler="synchronous")
    assert result.n_chunks == 1
    stored = provenance(tmp_path / "out.zarr")
    assert (stored["batch_chunk"], stored["split_every"], stored["status"]) == (252, 8, "complete")
    assert_matches(read_output(tmp_path / "out.zarr"), kernel_gradients(read_inputs(inp), padding=1), "float64")


# --------------------------------------------------------------------------- in-memory inputs


def in_memory_arrays(seed: int, m: int = 11, dtypes=("float64",) * 3):
    rng = np.random.default_rng(seed)
    a_dtype, z_dtype, w_dtype = dtypes
    return {
        "A_prev": rng.standard_normal((m, 7, 6, 3)).astype(a_dtype),
        "dZ": rng.standard_normal((m, 4, 3, 5)).astype(z_dtype),  # stride 2, padding 1, kernel 3
        "W": rng.standard_normal((3, 3, 3, 5)).astype(w_dtype),
    }


CONV_S2P1 = {"stride": 2, "padding": 1}


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["numpy", "dask", "dask_odd_chunks"])
def test_in_memory_inputs(make_input, client, tmp_path, kind):
    """NumPy and Dask arrays (any chunking) give bitwise the same result as the same data in Zarr."""
    import dask.array as da

    arrays = in_memory_arrays(seed=3)
    if kind == "dask":
        inputs = {name: da.from_array(a) for name, a in arrays.items()}
    elif kind == "dask_odd_chunks":
        inputs = {
            "A_prev": da.from_array(arrays["A_prev"], chunks=(3, 5, 2, 2)),
            "dZ": da.from_array(arrays["dZ"], chunks=(7, 1, 3, 4)),
            "W": da.from_array(arrays["W"], chunks=(2, 3, 1, 5)),
        }
    else:
        inputs = arrays
    zarr_input = tmp_path / "same-data.zarr"
    group = zarr.create_group(store=str(zarr_input), zarr_format=3)
    for name, array in arrays.items():
        group.create_array(name, data=array, chunks=(5, *array.shape[1:]) if name != "W" else array.shape)

    result = dconv.backward_job(inputs, tmp_path / "mem.zarr", batch_chunk=4, split_every=2, client=client, **CONV_S2P1)
    from_zarr = dconv.backward_job(
        str(zarr_input), tmp_path / "zarr.zarr", batch_chunk=4, split_every=2, client=client, **CONV_S2P1
    )
    mem, ref = read_output(tmp_path / "mem.zarr"), read_output(tmp_path / "zarr.zarr")
    for name in ("dA_prev", "dW", "db"):
        assert mem[name].tobytes() == ref[name].tobytes(), name
    assert result.dW.tobytes() == from_zarr.dW.tobytes()
    assert_matches(mem, kernel_gradients(arrays, **CONV_S2P1), "float64")
    assert provenance(tmp_path / "mem.zarr")["input"] == "<in-memory arrays>"


def test_in_memory_mixed_dtypes_compute_in_float64(tmp_path):
    arrays = in_memory_arrays(seed=4, m=5, dtypes=("float32", "float64", "float32"))
    result = dconv.backward_job(arrays, tmp_path / "out.zarr", batch_chunk=2, scheduler="threads", **CONV_S2P1)
    assert result.dW.dtype == np.float64
    assert_matches(read_output(tmp_path / "out.zarr"), kernel_gradients(arrays, **CONV_S2P1), "float64")


def test_in_memory_float32(tmp_path):
    arrays = in_memory_arrays(seed=5, m=9, dtypes=("float32",) * 3)
    dconv.backward_job(arrays, tmp_path / "out.zarr", batch_chunk=2, scheduler="threads", **CONV_S2P1)
    assert_matches(read_output(tmp_path / "out.zarr"), kernel_gradients(arrays, **CONV_S2P1), "float32")


@pytest.mark.cluster
def test_rerun_into_same_output_with_new_data(client, tmp_path):
    """Same OUT, same W and shapes, other A_prev/dZ (overwrite): no stale result from the first run."""
    first = in_memory_arrays(seed=6)
    second = {**in_memory_arrays(seed=7), "W": first["W"]}
    out = tmp_path / "out.zarr"
    dconv.backward_job(first, out, batch_chunk=3, client=client, **CONV_S2P1)
    dconv.backward_job(second, out, batch_chunk=3, client=client, overwrite=True, **CONV_S2P1)
    assert_matches(read_output(out), kernel_gradients(second, **CONV_S2P1), "float64")


# --------------------------------------------------------------------------- inputs written by plain zarr


def write_plain_zarr_input(path: Path, seed: int, dtype="float64", hparameters=None, m=10):
    """An input group written by zarr alone: no dimension names, own chunking, classic hparameters.

    H = W = 5 and a 3x3 kernel give a 3x3 output both for stride 2, pad 1 and for stride 1, pad 0,
    and also for stride 2, padding "same": one input, several valid interpretations.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "A_prev": rng.standard_normal((m, 5, 5, 2)).astype(dtype),
        "dZ": rng.standard_normal((m, 3, 3, 3)).astype(dtype),
        "W": rng.standard_normal((3, 3, 2, 3)).astype(dtype),
    }
    group = zarr.create_group(store=str(path), zarr_format=3)
    if hparameters is not None:
        group.attrs["hparameters"] = hparameters
    layout = {  # (chunks, shards): A_prev sharded, dZ chunked across channels, W split in two
        "A_prev": ((3, 5, 5, 1), (6, 5, 5, 2)),
        "dZ": ((4, 3, 3, 1), None),
        "W": ((2, 3, 2, 3), None),
    }
    for name, array in arrays.items():
        chunks, shards = layout[name]
        created = group.create_array(name, shape=array.shape, chunks=chunks, shards=shards, dtype=dtype)
        created[...] = array
    return arrays


@pytest.mark.cluster
@pytest.mark.parametrize(
    "options, used",
    [
        ({}, {"stride": 2, "padding": 1}),  # from the hparameters attribute
        ({"stride": 1, "padding": 0}, {"stride": 1, "padding": 0}),  # explicit options win
        ({"padding": "same"}, {"stride": 2, "padding": "same"}),  # stride from the attribute
        ({"stride": 1, "padding": "valid"}, {"stride": 1, "padding": 0}),
    ],
    ids=["stored", "override", "partial_override", "override_valid"],
)
def test_plain_zarr_input_hparameters(client, tmp_path, options, used):
    arrays = write_plain_zarr_input(tmp_path / "in.zarr", seed=8, hparameters={"stride": 2, "pad": 1})
    out = tmp_path / "out.zarr"
    dconv.backward_job(str(tmp_path / "in.zarr"), out, batch_chunk=4, split_every=2, client=client, **options)
    output = read_output(out)
    assert_matches(output, kernel_gradients(arrays, **used), "float64")
    if options.get("stride") == 1:  # the override really changed the computation
        assert rel_err(output["dW"], kernel_gradients(arrays, stride=2, padding=1).dW) > 1e-3


def test_plain_zarr_input_without_hparameters_defaults_to_stride1_pad0(tmp_path):
    arrays = write_plain_zarr_input(tmp_path / "in.zarr", seed=9, dtype="float32")
    dconv.backward_job(str(tmp_path / "in.zarr"), tmp_path / "out.zarr", batch_chunk=3, scheduler="threads")
    assert_matches(read_output(tmp_path / "out.zarr"), kernel_gradients(arrays, stride=1, padding=0), "float32")


# --------------------------------------------------------------------------- xarray


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_opens_in_xarray(make_input, tmp_path, dtype):
    xr = pytest.importorskip("xarray")
    case = CONVS["dilation2"]
    inp = make_input(m=7, dtype=dtype, in_channels=3, out_channels=4, **case.make_kwargs())
    out = tmp_path / "out.zarr"
    dconv.backward_job(inp, out, batch_chunk=3, scheduler="threads")
    ds = xr.open_zarr(str(out), consolidated=False)
    assert set(ds.data_vars) == {"dA_prev", "dW", "db"}
    assert ds["dA_prev"].dims == ("m", "n_H_prev", "n_W_prev", "C_prev")
    assert ds["dW"].dims == ("fh", "fw", "C_prev", "C")
    assert ds["db"].dims[-1] == "C"
    # one C_prev dimension shared by dA_prev and dW, one C shared by dW and db
    assert dict(ds.sizes) == {"m": 7, "n_H_prev": 9, "n_W_prev": 8, "C_prev": 3, "fh": 3, "fw": 2, "C": 4,
                              "b_h": 1, "b_w": 1, "b_c": 1}
    for name in ("dA_prev", "dW", "db"):
        assert ds[name].dtype == np.dtype(dtype), name
    assert ds.attrs["dconv"]["status"] == "complete"
    assert ds["dA_prev"].chunks[0] == (3, 3, 1)
    expected = kernel_gradients(read_inputs(inp), **case.params)
    assert rel_err(ds["dA_prev"].values, expected.dA_prev) <= PIPELINE_TOL[np.dtype(dtype)]
    assert rel_err(ds["dW"].values, expected.dW) <= PIPELINE_TOL[np.dtype(dtype)]
    # the named dimension works as a name: reduce dA_prev over everything but C_prev
    assert ds["dA_prev"].sum(dim=["m", "n_H_prev", "n_W_prev"]).dims == ("C_prev",)


# --------------------------------------------------------------------------- existing outputs


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.cluster
def test_refuses_to_overwrite_then_overwrite_replaces(make_input, client, tmp_path):
    first = make_input(m=8, seed=1, padding=1)
    second = make_input(m=5, seed=2, padding=1)
    out = tmp_path / "out.zarr"
    dconv.backward_job(first, out, batch_chunk=3, client=client)
    before, before_arrays = snapshot(out), read_output(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    with pytest.raises(InputError, match="already exists"):
        dconv.backward_job(second, out, batch_chunk=3, client=client)
    with pytest.raises(InputError, match="already exists"):
        dconv.backward_job(second, out, batch_chunk=3, scheduler="threads")
    assert snapshot(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    after_arrays = read_output(out)
    for name in before_arrays:
        assert before_arrays[name].tobytes() == after_arrays[name].tobytes()

    dconv.backward_job(second, out, batch_chunk=3, client=client, overwrite=True)
    replaced = read_output(out)
    assert replaced["dA_prev"].shape[0] == 5
    assert_matches(replaced, kernel_gradients(read_inputs(second), padding=1), "float64")
    assert provenance(out)["input"] == second
    assert provenance(out)["n_chunks"] == 2
    assert dconv.open_result(str(out))["_progress/level"].shape == (2,)
    # nothing of the first run is left: the same files as the same job written afresh
    dconv.backward_job(second, tmp_path / "fresh.zarr", batch_chunk=3, client=client)
    assert set(snapshot(out)) == set(snapshot(tmp_path / "fresh.zarr"))


def test_refuses_a_non_zarr_path_too(make_input, tmp_path):
    inp = make_input(m=4)
    out = tmp_path / "some-file.txt"
    out.write_text("keep me")
    with pytest.raises(InputError, match="already exists"):
        dconv.backward_job(inp, out, scheduler="threads")
    assert out.read_text() == "keep me"


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.cluster
@pytest.mark.parametrize("conv, dtype", [("pad1", "float32"), ("same_stride2", "float64")])
def test_dw_db_bitwise_identical_across_workers_and_schedulers(make_input, client, tmp_path, conv, dtype):
    """Fixed chunks and a fixed tree order: 1 worker, 2 workers, threads, synchronous agree bit for bit.

    Stride 1 and stride 2 take different kernel paths; both must be reproducible.
    """
    case = CONVS[conv]
    inp = make_input(m=30, chunk=7, dtype=dtype, in_channels=4, out_channels=5, **case.make_kwargs())
    options = {"batch_chunk": 4, "split_every": 3}
    runs = {
        "two_workers": dconv.backward_job(inp, tmp_path / "two_workers.zarr", client=client, **options),
        "one_worker": dconv.backward_job(
            inp, tmp_path / "one_worker.zarr", cluster=ClusterOptions(workers=1), **options
        ),
        "threads": dconv.backward_job(inp, tmp_path / "threads.zarr", scheduler="threads", **options),
        "synchronous": dconv.backward_job(inp, tmp_path / "synchronous.zarr", scheduler="synchronous", **options),
    }
    reference = runs["two_workers"]
    assert reference.n_chunks == 8
    for name, result in runs.items():
        assert result.dW.dtype == np.dtype(dtype), name
        assert result.dW.tobytes() == reference.dW.tobytes(), name
        assert result.db.tobytes() == reference.db.tobytes(), name
    stored = {name: read_output(tmp_path / f"{name}.zarr") for name in runs}
    for name, output in stored.items():
        for array in ("dW", "db", "dA_prev"):
            assert output[array].tobytes() == stored["two_workers"][array].tobytes(), (name, array)
    assert_matches(stored["two_workers"], kernel_gradients(read_inputs(inp), **case.params), dtype)


# --------------------------------------------------------------------------- schedulers and clusters


@pytest.mark.cluster
@pytest.mark.parametrize("relative", ["input", "output", "both"])
def test_relative_paths_with_workers_in_another_directory(client, tmp_path, monkeypatch, relative):
    """Workers do not share the client's working directory (any `dask worker` started elsewhere):
    relative local paths must mean the client's directory, as the absolute provenance location says."""
    worker_dirs = set(client.run(os.getcwd).values())
    assert str(tmp_path) not in worker_dirs
    name = f"rel-{uuid.uuid4().hex}"
    monkeypatch.chdir(tmp_path)
    dconv.make_inputs(f"{name}-in.zarr", m=6, height=5, width=5, in_channels=2, out_channels=3,
                      dtype="float64", chunk=4, seed=12)
    inp = f"{name}-in.zarr" if relative in ("input", "both") else str(tmp_path / f"{name}-in.zarr")
    out = f"{name}-out.zarr" if relative in ("output", "both") else str(tmp_path / f"{name}-out.zarr")
    try:
        dconv.backward_job(inp, out, batch_chunk=2, split_every=2, client=client, padding=1)
        output = read_output(tmp_path / f"{name}-out.zarr")
        assert_matches(output, kernel_gradients(read_inputs(tmp_path / f"{name}-in.zarr"), padding=1), "float64")
    finally:
        strays = [Path(d) / f"{name}-{x}.zarr" for d in worker_dirs for x in ("in", "out")]
        for stray in strays:
            if stray.exists():
                shutil.rmtree(stray)
        assert not any(stray.exists() for stray in strays)




def test_unknown_scheduler_address_fails_fast(make_input, tmp_path):
    inp = make_input(m=4)
    address = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out.zarr"
    start = time.monotonic()
    with pytest.raises(InputError, match=f"Dask scheduler.* at '{address}'"):
        dconv.backward_job(inp, out, cluster=ClusterOptions(scheduler=address, connect_timeout=1))
    assert time.monotonic() - start < 10
    assert not out.exists(), "nothing may be written before a scheduler answers"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheduler": "processes"}, "scheduler must be one of"),
        ({"scheduler": "threads", "client": object()}, "either client or scheduler"),
    ],
)
def test_scheduler_arguments_are_checked(make_input, tmp_path, kwargs, match):
    inp = make_input(m=4)
    with pytest.raises(InputError, match=match):
        dconv.backward_job(inp, tmp_path / "out.zarr", **kwargs)
    assert not (tmp_path / "out.zarr").exists()


def test_plan_writes_nothing_and_describes_the_job(make_input, tmp_path):
    inp = make_input(m=20, chunk=7, padding=1)
    plan = plan_job(inp, tmp_path / "out.zarr", batch_chunk=6, split_every=2, simd="Baseline")
    text = plan.describe()
    assert "chunks  4 of up to 6 samples (m = 20), tree fan-in 2" in text
    assert "simd    DCONV_SIMD=baseline, resolved on each worker" in text
    assert inp in text and "out.zarr" in text
    assert not (tmp_path / "out.zarr").exists()
    assert os.listdir(tmp_path) == [Path(inp).name]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_goes_to_stderr(make_input, tmp_path, capsys, progress):
    inp = make_input(m=10, chunk=3)  # tasks read whole input chunks: no warning on stderr
    dconv.backward_job(inp, tmp_path / "out.zarr", batch_chunk=3, scheduler="threads", progress=progress)
    captured = capsys.readouterr()
    assert captured.out == ""
    if progress:  # stderr is not a terminal here: plain lines, the last at the end
        last = captured.err.strip().splitlines()[-1]
        assert last.startswith("dconv: 4 of 4 chunks, ") and "done in" in last, captured.err
        assert "\r" not in captured.err
    else:
        assert captured.err == ""


# --------------------------------------------------------------------------- optional: torch


@pytest.mark.cluster
@pytest.mark.parametrize("stride, pad", [(2, 1), (1, 0)])
def test_matches_torch_autograd_on_plain_zarr_input(client, tmp_path, stride, pad):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    arrays = write_plain_zarr_input(tmp_path / "in.zarr", seed=10, hparameters={"stride": stride, "pad": pad}, m=9)
    out = tmp_path / "out.zarr"
    dconv.backward_job(str(tmp_path / "in.zarr"), out, batch_chunk=2, split_every=2, client=client)
    output = read_output(out)

    x = torch.from_numpy(np.ascontiguousarray(arrays["A_prev"].transpose(0, 3, 1, 2))).requires_grad_()
    k = torch.from_numpy(np.ascontiguousarray(arrays["W"].transpose(3, 2, 0, 1))).requires_grad_()
    bias = torch.zeros(arrays["W"].shape[3], dtype=torch.float64, requires_grad=True)
    z = F.conv2d(x, k, bias, stride=stride, padding=pad)
    z.backward(torch.from_numpy(np.ascontiguousarray(arrays["dZ"].transpose(0, 3, 1, 2))))
    expected = {
        "dA_prev": x.grad.numpy().transpose(0, 2, 3, 1),
        "dW": k.grad.numpy().transpose(2, 3, 1, 0),
        "db": bias.grad.numpy().reshape(1, 1, 1, -1),
    }
    for name, want in expected.items():
        assert output[name].dtype == np.float64
        assert rel_err(output[name], want) <= 1e-10, name


# --------------------------------------------------------------------------- max_memory


@pytest.mark.parametrize(
    "text, expected",
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1e9", 10**9), ("10 KiB", 10 * 2**10), (4096, 4096)],
)
def test_max_memory_takes_sizes(text, expected):
    assert JobOptions(max_memory=text).max_memory == expected


@pytest.mark.parametrize("text", ["abc", 0, "-5MB", "3 parsecs", True])
def test_max_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(InputError, match="max_memory must be a size"):
        JobOptions(max_memory=text)


def test_max_memory_chooses_the_largest_chunk_that_fits(make_input, tmp_path):
    from dconv.plan import plan_job
    from dconv.sizing import task_memory

    group = zarr.open_group(make_input(m=40), mode="r")
    inp = {name: group[name][:] for name in ("A_prev", "dZ", "W")}  # in memory: no Zarr chunk to align to
    unbounded = plan_job(inp, tmp_path / "out.zarr", padding=1)
    budget = task_memory(17, unbounded.shapes, unbounded.geometry, unbounded.compute_dtype) + 100
    plan = plan_job(inp, tmp_path / "out.zarr", padding=1, max_memory=budget)
    chosen = plan.batch_chunk
    assert chosen == 17
    assert task_memory(chosen, plan.shapes, plan.geometry, plan.compute_dtype) <= budget
    assert task_memory(chosen + 1, plan.shapes, plan.geometry, plan.compute_dtype) > budget
    with pytest.raises(InputError, match=rf"batch_chunk {chosen + 1} needs about .* use batch_chunk <= {chosen}"):
        plan_job(inp, tmp_path / "out.zarr", padding=1, batch_chunk=chosen + 1, max_memory=budget)
    with pytest.raises(InputError, match="one sample needs about"):
        plan_job(inp, tmp_path / "out.zarr", padding=1, max_memory=100)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    "input_chunk, max_memory, expected",
    [(7, None, 252), (64, None, 256), (300, None, 256), (7, 600_000, None)],
)
def test_default_batch_chunk_is_aligned_to_the_input_chunks(make_input, tmp_path, input_chunk, max_memory, expected):
    from dconv.plan import plan_job

    plan = plan_job(make_input(m=400, chunk=input_chunk), tmp_path / "out.zarr", max_memory=max_memory)
    if expected is not None:
        assert plan.batch_chunk == expected
    else:  # chosen by memory, then rounded down to whole input chunks
        assert plan.batch_chunk % input_chunk == 0 and plan.batch_chunk >= input_chunk
    assert ("not a multiple" in (plan.straddle_warning() or "")) == (input_chunk > 256)  # 256 cuts a 300-sample chunk
    given = plan_job(make_input(m=400, chunk=input_chunk), tmp_path / "out.zarr", batch_chunk=input_chunk + 1)
    assert given.batch_chunk == input_chunk + 1  # a given batch_chunk is kept, with a warning
    assert "not a multiple of the input's Zarr chunk" in given.straddle_warning()


# --------------------------------------------------------------------------- SIMD level


def stored_levels(out) -> list[str]:
    return OutputStore(str(out)).progress().levels


@pytest.mark.cluster
def test_dconv_simd_numpy_runs_every_chunk_in_numpy(make_input, client, tmp_path, monkeypatch):
    """The client's DCONV_SIMD reaches workers that were started without it."""
    monkeypatch.setenv("DCONV_SIMD", "numpy")
    inp = make_input(m=13, chunk=5, dtype="float32", in_channels=16, out_channels=16, padding=1)
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(inp, out, batch_chunk=4, client=client)
    assert result.simd == {"numpy": 4}
    assert provenance(out)["simd"] == {"requested": "numpy", "chunks": {"numpy": 4}}
    assert stored_levels(out) == ["numpy"] * 4
    assert_matches(read_output(out), kernel_gradients(read_inputs(inp), padding=1), "float32")


@pytest.mark.cluster
def test_provenance_names_the_level_of_every_chunk(make_input, client, tmp_path, monkeypatch):
    monkeypatch.delenv("DCONV_SIMD", raising=False)
    inp = make_input(m=20, chunk=7)
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(inp, out, batch_chunk=3, client=client)
    best = set(client.run(simd.resolve_level, "auto").values())  # each worker's own best level
    levels = stored_levels(out)
    assert len(levels) == result.n_chunks == 7
    assert set(levels) <= best
    assert result.simd == dict(Counter(levels)) and sum(result.simd.values()) == 7
    assert provenance(out)["simd"] == {"requested": "auto", "chunks": result.simd}


def test_a_resumed_job_keeps_the_level_of_the_chunks_it_does_not_rerun(make_input, tmp_path, monkeypatch):
    """Chunk 1 ran at numpy before the job was "killed"; the resumed run (auto) keeps that record."""
    monkeypatch.setattr(simd, "_active", None)  # in-process chunk tasks set this process's level
    inp = make_input(m=20, chunk=7)  # chunks of 7, 7 and 6 samples
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=7, simd="numpy")
    plan.open_output()
    plan.run_chunk(1)

    result = dconv.backward_job(inp, out, batch_chunk=7, resume=True, simd="auto", scheduler="threads")
    auto = simd.resolve_level("auto")
    assert result.computed_chunks == 2
    assert stored_levels(out) == [auto, "numpy", auto]
    assert result.simd == dict(Counter([auto, "numpy", auto]))
    assert provenance(out)["simd"] == {"requested": "auto", "chunks": result.simd}


def test_an_unknown_simd_word_is_refused_while_planning(make_input, tmp_path, monkeypatch):
    inp = make_input(m=4)
    monkeypatch.setenv("DCONV_SIMD", "avx-512")
    with pytest.raises(SimdLevelError, match="DCONV_SIMD must be one of .*; got 'avx-512' instead"):
        plan_job(inp, tmp_path / "out.zarr")
    monkeypatch.delenv("DCONV_SIMD")
    with pytest.raises(SimdLevelError, match="got 'sse' instead"):
        dconv.backward_job(inp, tmp_path / "out.zarr", simd="sse", scheduler="threads")
    assert not (tmp_path / "out.zarr").exists()


def test_a_level_this_cpu_lacks_is_refused_by_an_in_process_scheduler(make_input, tmp_path):
    lacking = next(level for level in simd.LEVELS if level not in simd.simd_levels())
    with pytest.raises(SimdLevelError, match=f"^DCONV_SIMD={lacking}: .*; this machine runs "):
        dconv.backward_job(make_input(m=4), tmp_path / "out.zarr", simd=lacking, scheduler="threads")
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.cluster
def test_a_level_one_worker_lacks_is_refused_before_any_task(mixed_levels_cluster, make_input, tmp_path):
    """One worker runs only baseline: asking for a better level names that worker and runs nothing."""
    distributed = pytest.importorskip("distributed")
    better = [level for level in simd.simd_levels() if level != "baseline"]
    if not better:
        pytest.skip("this CPU runs no level above baseline")
    inp, out = make_input(m=12), tmp_path / "out.zarr"
    baseline_worker = mixed_levels_cluster["baseline_worker"]
    with distributed.Client(mixed_levels_cluster["address"], timeout=30) as client:
        with pytest.raises(SimdLevelError) as info:
            dconv.backward_job(inp, out, batch_chunk=4, client=client, simd=better[0])
        assert str(info.value) == (
            f"DCONV_SIMD={better[0]}: worker {baseline_worker} cannot run it (it runs baseline, numpy); "
            "no task was started."
        )
        assert not out.exists()
        result = dconv.backward_job(inp, out, batch_chunk=4, client=client, simd="baseline")  # both run it
    assert result.simd == {"baseline": 3} and stored_levels(out) == ["baseline"] * 3

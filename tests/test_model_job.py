"""Model jobs: every layer of a model input group in one job (:mod:`dconv.model`), NumPy-made groups.

Each layer's output must be bitwise its own single-layer job's; the model's statistics the sums of
the layers' (checked against dconv's loop oracle, one sample at a time); resume, lease, overwrite,
inspect and the CLI must treat the model output as one output. The CLI runs fork from a process that
has imported dconv (conftest's ``forked_dconv``), except the job that is SIGKILLed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr

import dconv
from dconv.reference import conv2d_backward_loops
from dconv.statistics import noise_figures

from _fault_helpers import describe, snapshot
from _models import LAYERS, model_group, read

ARRAYS = ("dA_prev", "dW", "db", "stats/sample_grad_norm2", "stats/dW_sq", "stats/db_sq")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_group(tmp_path_factory.mktemp("model") / "model.zarr", m=40)


@pytest.fixture(scope="module")
def model_out(model, tmp_path_factory, client):
    """The model job with the statistics, on the shared cluster, in chunks of 8 (5 per layer)."""
    out = tmp_path_factory.mktemp("model-out") / "out.zarr"
    result = dconv.backward_job(model, out, batch_chunk=8, stats=True, client=client)
    return out, result


def test_each_layer_is_bitwise_its_own_job(model, model_out, tmp_path):
    out, result = model_out
    assert isinstance(result, dconv.ModelResult) and list(result.layers) == list(LAYERS)
    for name in LAYERS:
        single = dconv.backward_job(f"{model}/layers/{name}", tmp_path / name, batch_chunk=8, stats=True,
                                    scheduler="threads")
        for array in ARRAYS:
            assert np.array_equal(read(out / "layers" / name, array), read(tmp_path / name, array)), (name, array)
        assert result.layers[name].values["stats"] == single.values["stats"]
        assert zarr.open_group(str(out / "layers" / name)).attrs["dconv"]["status"] == "complete"


def oracle(model: str) -> dict:
    """Every sample's whole-model |g_i|^2, |S|^2 and sum_i |g_i|^2 from the loop oracle, one sample at a time."""
    norms, S2 = 0.0, 0.0
    for name in LAYERS:
        group = zarr.open_group(f"{model}/layers/{name}", mode="r")
        hp = group.attrs["hparameters"]
        A, dZ, W = (np.asarray(group[n][...]) for n in ("A_prev", "dZ", "W"))
        params = dict(stride=hp["stride"], padding=hp["pad"], dilation=hp.get("dilation", 1))
        per = [conv2d_backward_loops(dZ[i : i + 1], A[i : i + 1], W, **params) for i in range(A.shape[0])]
        dW = np.stack([g[1] for g in per])
        db = np.stack([np.ravel(g[2]) for g in per])
        norms = norms + (dW**2).sum(axis=(1, 2, 3, 4)) + (db**2).sum(axis=1)
        S2 += (dW.sum(axis=0) ** 2).sum() + (db.sum(axis=0) ** 2).sum()
    return {"norms": norms, "S2": S2, "sum": norms.sum()}


def test_model_statistics_are_the_sums_of_the_layers(model, model_out):
    out, result = model_out
    want = oracle(model)
    norms = read(out, "stats/sample_grad_norm2")
    np.testing.assert_allclose(norms, want["norms"], rtol=1e-10)
    layer_sum = sum(read(out / "layers" / name, "stats/sample_grad_norm2") for name in LAYERS)
    assert np.array_equal(norms, layer_sum)  # added in layer order
    stats = result.stats
    expected = noise_figures(want["S2"], want["sum"], 40)
    for key in ("sum_sample_norm2", "grad_sum_norm2", "mean_grad_norm2", "grad_norm2", "trace_cov", "noise_scale"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-10), key
    assert stats["top_samples"]["index"] == np.argsort(-norms, kind="stable")[:10].tolist()
    shares = [row["share_sum_sample_norm2"] for row in stats["layers"]]
    assert [row["name"] for row in stats["layers"]] == list(LAYERS)
    assert math.fsum(shares) == pytest.approx(1.0, rel=1e-12)
    assert math.fsum(row["share_grad_sum_norm2"] for row in stats["layers"]) == pytest.approx(1.0, rel=1e-12)
    stored = zarr.open_group(str(out)).attrs["dconv_model_output"]
    assert stored["status"] == "complete" and stored["stats"] == json.loads(json.dumps(stats))


def test_inspect_shows_the_layers_and_the_model_figures(model_out, forked_dconv):
    out, result = model_out
    shown = forked_dconv.run(["inspect", out])
    assert shown.returncode == 0, describe(shown)
    for name in LAYERS:
        assert f"    {name} " in shown.stdout, shown.stdout
    assert "the model's gradient statistics over m = 40" in shown.stdout
    assert f"{result.stats['noise_scale']:.6g}" in shown.stdout
    summary = json.loads(forked_dconv.run(["inspect", out, "--json"]).stdout)
    assert summary["kind"] == "model" and summary["complete"] is True
    assert [layer["status"] for layer in summary["layers"]] == ["complete"] * 3


def test_resume_of_a_complete_model_runs_nothing(model, model_out, forked_dconv):
    out, _ = model_out
    before = snapshot(out)
    again = forked_dconv.run(["backward", model, out, "--resume"])
    assert again.returncode == 0, describe(again)
    assert "is already complete, nothing to do (3 layers, 15 chunks)" in again.stdout
    assert snapshot(out) == before


def test_layers_selects_and_is_recorded(model, tmp_path, client, forked_dconv):
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(model, out, batch_chunk=8, layers="fc,conv1", client=client)
    assert list(result.layers) == ["conv1", "fc"]  # model order
    assert sorted(p.name for p in (out / "layers").iterdir() if p.is_dir()) == ["conv1", "fc"]
    refused = forked_dconv.run(["backward", model, out, "--resume", "--layers", "conv2"])
    assert refused.returncode == 2, describe(refused)
    assert "layers: ['conv2'] here, ['conv1', 'fc'] in out" in refused.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "conv9"], "--layers must name layers of"),
        (["--layers", "conv1,conv1"], "layers must name each layer once"),
    ],
)
def test_bad_layer_names_are_one_line(model, tmp_path, args, message, forked_dconv):
    result = forked_dconv.run(["backward", model, tmp_path / "out.zarr", *args])
    assert result.returncode == 2, describe(result)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_layers_on_a_one_layer_input_is_refused(model, tmp_path, forked_dconv):
    result = forked_dconv.run(["backward", f"{model}/layers/conv1", tmp_path / "out.zarr", "--layers", "conv1"])
    assert result.returncode == 2, describe(result)
    assert "selects layers of a model input group" in result.stderr


def test_plan_job_points_a_model_group_at_plan_model(model, tmp_path):
    with pytest.raises(dconv.InputError, match="is a model input group: plan it with plan_model"):
        dconv.plan_job(model, tmp_path / "out.zarr")


def test_interrupted_in_the_second_layer_resumes_without_recomputing(model, model_out, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the second layer (the synchronous scheduler runs the layers in order):
    the first layer stays complete and is not computed again; the resume gives the uninterrupted bits."""
    import dconv.graph

    out = tmp_path / "out.zarr"
    real = dconv.graph.run_chunk_task
    seen: list[str] = []

    def interrupting(context, index, *args):
        seen.append(context.out.url)
        if "layers/conv2" in context.out.url and index == 2:
            raise KeyboardInterrupt
        return real(context, index, *args)

    monkeypatch.setattr(dconv.graph, "run_chunk_task", interrupting)
    with pytest.raises(dconv.JobInterrupted) as stopped:
        dconv.backward_job(model, out, batch_chunk=8, stats=True, scheduler="synchronous")
    assert stopped.value.done == 5 + 2 and stopped.value.total == 15
    assert stopped.value.resume_command == f"dconv backward {model} {out} --resume --scheduler synchronous"
    provenance = zarr.open_group(str(out)).attrs
    assert provenance["dconv_model_output"]["status"] == "interrupted"
    assert zarr.open_group(str(out / "layers/conv1")).attrs["dconv"]["status"] == "complete"
    assert zarr.open_group(str(out / "layers/conv2")).attrs["dconv"]["status"] == "interrupted"
    first = snapshot(out / "layers/conv1")

    monkeypatch.setattr(dconv.graph, "run_chunk_task", real)
    resumed = dconv.backward_job(model, out, resume=True, scheduler="synchronous")
    assert resumed.computed_chunks == 3 + 5
    assert resumed.layers["conv1"].already_complete and snapshot(out / "layers/conv1") == first
    reference, _ = model_out
    for name in LAYERS:
        for array in ARRAYS:
            assert np.array_equal(read(out / "layers" / name, array), read(reference / "layers" / name, array))
    assert np.array_equal(read(out, "stats/sample_grad_norm2"), read(reference, "stats/sample_grad_norm2"))


def test_a_second_job_on_a_running_model_output_is_refused(model, tmp_path, forked_dconv):
    from dconv.store.lease import hold

    out = tmp_path / "out.zarr"
    with hold(str(out), {}, 60.0, lambda line: None):
        result = forked_dconv.run(["backward", model, out])
    assert result.returncode == 2, describe(result)
    assert "is being written by another job" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_overwrite_replaces_a_model_output_and_refuses_a_layer_output(model, tmp_path, forked_dconv):
    out = tmp_path / "out.zarr"
    dconv.backward_job(model, out, batch_chunk=8, layers="fc", scheduler="threads")
    (tmp_path / "single.zarr").mkdir()
    dconv.backward_job(f"{model}/layers/fc", tmp_path / "single.zarr", batch_chunk=8, scheduler="threads",
                       overwrite=True)
    refused = forked_dconv.run(["backward", model, tmp_path / "single.zarr", "--overwrite"])
    assert refused.returncode == 2 and "is a dconv output, not a dconv model output" in refused.stderr, describe(refused)
    (out / "layers" / "fc" / "notes.txt").write_text("mine")
    before = snapshot(out)
    refused = forked_dconv.run(["backward", model, out, "--overwrite"])
    assert refused.returncode == 2 and "notes.txt" in refused.stderr, describe(refused)
    assert snapshot(out) == before
    (out / "layers" / "fc" / "notes.txt").unlink()
    replaced = forked_dconv.run(["backward", model, out, "--overwrite", "--batch-chunk", "8", "--layers", "conv1",
                        "--scheduler", "threads"])
    assert replaced.returncode == 0, describe(replaced)
    assert sorted(p.name for p in (out / "layers").iterdir() if p.is_dir()) == ["conv1"]


def test_dry_run_describes_every_layer(model, tmp_path, forked_dconv):
    result = forked_dconv.run(["backward", model, tmp_path / "out.zarr", "--dry-run", "--stats"])
    assert result.returncode == 0, describe(result)
    assert "model   " in result.stdout and "3 layers of m = 40 samples" in result.stdout
    for name, (kind, _) in LAYERS.items():
        assert f"layer {name} ({kind}):" in result.stdout
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.slow
def test_resume_after_sigkill_in_the_second_layer(tmp_path, forked_dconv):
    """SIGKILL of the whole job (client and workers) while the second layer is half done; inspect's resume
    command, run as printed once the lease is stale, finishes the job with the bits of an uninterrupted one.
    The killed job runs in a fresh interpreter; inspect and the resumed job, forked (``forked_dconv``)."""
    import os
    import shlex
    import signal
    import subprocess

    from conftest import dconv_command, wait_until
    from _fault_helpers import done_count, kill_group, live_group_members

    model = model_group(tmp_path / "model.zarr", m=640, chunk=8)
    reference = tmp_path / "reference.zarr"
    dconv.backward_job(model, reference, batch_chunk=8, stats=True, scheduler="threads")
    out = tmp_path / "out.zarr"
    args = ["backward", model, out, "--batch-chunk", "8", "--stats", "--workers", "2", "--lease-timeout", "1"]
    with open(tmp_path / "job.err", "w") as err:
        job = subprocess.Popen(dconv_command() + [str(a) for a in args], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_until(lambda: done_count(out / "layers/conv2") >= 16 or job.poll() is not None, timeout=120)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
    finally:
        kill_group(job)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "job.err").read_text()
    assert wait_until(lambda: not live_group_members(job.pid), timeout=10)
    done = done_count(out / "layers/conv2")
    assert 16 <= done < 80, f"{done} of 80 chunks of conv2 done: the kill came too late to test anything"

    inspected = forked_dconv.run(["inspect", out, "--json"])
    assert "Traceback" not in inspected.stderr, describe(inspected)
    code, summary = inspected.returncode, json.loads(inspected.stdout)
    assert code == 3 and summary["kind"] == "model" and not summary["complete"]
    command = summary["resume_command"]
    assert command == shlex.join(["dconv", "backward", model, str(out), "--resume", "--workers", "2"])
    from dconv.store.lease import read_lease

    assert wait_until(lambda: read_lease(out) is None or read_lease(out).age() > 1.5, timeout=10)
    resumed = forked_dconv.run(shlex.split(command)[1:], timeout=240)
    assert resumed.returncode == 0, describe(resumed)
    for name in LAYERS:
        for array in ARRAYS:
            assert np.array_equal(read(out / "layers" / name, array), read(reference / "layers" / name, array))
    assert np.array_equal(read(out, "stats/sample_grad_norm2"), read(reference, "stats/sample_grad_norm2"))
    assert forked_dconv.run(["inspect", out]).returncode == 0


def test_the_model_pipeline_spec_runs(tmp_path, forked_dconv):
    from pathlib import Path

    model_group(tmp_path / "out" / "model.zarr", m=24)
    spec = Path(__file__).resolve().parent.parent / "pipelines" / "model.toml"
    result = forked_dconv.run(["run", spec, "--scheduler", "threads"], cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "3 layers, 3 of 3 chunks computed" in result.stdout, result.stdout
    out = tmp_path / "out" / "model-grads.zarr"
    assert "dA_prev" not in zarr.open_group(str(out / "layers" / "conv1"))
    assert read(out, "stats/sample_grad_norm2").shape == (24,)
    assert forked_dconv.run(["inspect", out]).returncode == 0

"""Jobs with the gradient statistics (``stats=True``, ``--stats``) and without dA_prev (``dA_prev=False``).

The truth is dconv's loop oracle (:func:`dconv.reference.conv2d_backward_loops`) run on one
sample at a time in float64: ``g_i = (dW_i, db_i)``, and from those every array of the
``stats/`` group and every figure of ``attrs["dconv"]["stats"]``.

- float64 inputs agree to 1e-10 relative; ``grad_norm2`` and ``trace_cov`` relative to
  ``sum_i |g_i|^2 / (m - 1)``, the noise scale through them (:func:`noise_scale_tolerance`);
- float32 inputs agree with the float64 truth within the bound of :func:`float32_figure_bounds`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import dconv
from dconv import ClusterOptions, plan_job
from dconv.reference import conv2d_backward_loops

from _kernel_cases import Case

STATS = ("stats/sample_grad_norm2", "stats/dW_sq", "stats/db_sq")

# The layers of the job tests: every padding form, strides, dilation, a 1x1 kernel.
LAYERS = {
    "pad1": Case((0, 7, 6, 3), (3, 3, 3, 4), padding=1),
    "s2_same": Case((0, 9, 8, 4), (3, 3, 4, 5), stride=2, padding="same"),
    "dilated_valid": Case((0, 9, 9, 2), (2, 3, 2, 3), dilation=2, padding="valid"),
    "asym_s2x1": Case((0, 8, 7, 3), (3, 2, 3, 4), stride=(2, 1), padding=((0, 2), (1, 0))),
    "pointwise": Case((0, 5, 4, 8), (1, 1, 8, 6)),
}


def batch(case: Case, m: int, dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs whose samples share a mean gradient (so that |G|^2 > 0 and the noise scale is defined)
    plus noise of their own; A_prev (m, H, W, C_prev), W, dZ."""
    rng = np.random.default_rng(seed)
    a_shape = (m, *case.a_shape[1:])
    a = rng.standard_normal(a_shape[1:]) + 0.7 * rng.standard_normal(a_shape)
    w = rng.standard_normal(case.w_shape)
    z_shape = (m, *case._replace(a_shape=a_shape).z_shape()[1:])
    dz = rng.standard_normal(z_shape[1:]) + 0.7 * rng.standard_normal(z_shape)
    return {name: x.astype(dtype) for name, x in (("A_prev", a), ("W", w), ("dZ", dz))}


def per_sample(case: Case, arrays: dict, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(dW_i, db_i)`` of every sample by the loop oracle in float64, shapes (m, fh, fw, C_prev, C), (m, C);
    with ``absolute``, of ``|A_prev|`` and ``|dZ|``."""
    a, w, dz = (np.asarray(arrays[name], np.float64) for name in ("A_prev", "W", "dZ"))
    if absolute:
        a, dz = np.abs(a), np.abs(dz)
    grads = [conv2d_backward_loops(dz[i : i + 1], a[i : i + 1], w, **case.kwargs) for i in range(a.shape[0])]
    return np.array([g.dW for g in grads]), np.array([g.db.ravel() for g in grads])


def truth(case: Case, arrays: dict) -> dict:
    """The statistics' arrays and figures from the oracle's per-sample gradients, in float64."""
    dW, db = per_sample(case, arrays)
    m = dW.shape[0]
    norm2 = (dW * dW).reshape(m, -1).sum(axis=1) + (db * db).sum(axis=1)
    S2 = float((dW.sum(axis=0) ** 2).sum() + (db.sum(axis=0) ** 2).sum())
    total = float(norm2.sum())
    figures = {"m": m, "sum_sample_norm2": total, "mean_grad_norm2": S2 / m**2}
    if m > 1:
        figures["grad_norm2"] = (S2 - total) / (m * (m - 1))
        figures["trace_cov"] = (total - S2 / m) / (m - 1)
        figures["noise_scale"] = figures["trace_cov"] / figures["grad_norm2"]
    return {
        "stats/sample_grad_norm2": norm2,
        "stats/dW_sq": (dW * dW).sum(axis=0),
        "stats/db_sq": (db * db).sum(axis=0).reshape(1, 1, 1, -1),
        "figures": figures,
        "S2": S2,
    }


def noise_scale_tolerance(want: dict, delta_gn: float, delta_tr: float) -> float:
    """The bound on the noise scale's error when ``grad_norm2`` and ``trace_cov`` are off by at most
    ``delta_gn`` and ``delta_tr``: ``|dB| <= (delta_tr + |B| delta_gn) / (grad_norm2 - delta_gn)``."""
    gn, noise = want["grad_norm2"], want["noise_scale"]
    assert gn > delta_gn, "the test's batch must have a clearly positive |G|^2"
    return (delta_tr + abs(noise) * delta_gn) / (gn - delta_gn)


def float32_figure_bounds(case: Case, arrays: dict, batch_chunk: int) -> dict:
    """Bounds on the error of a float32 job's statistics against the float64 truth.

    Each element ``e`` of ``dW_i`` is a sum of at most ``n = Hp * Wp + 1`` products of float32
    inputs rounded in float32 (see tests/kernel/test_kernel_stats.py::float32_bound), so
    ``|e' - e| <= d_i = gamma_n (|A_i|^T |dZ_i|)``, ``gamma_n = n u / (1 - n u)``, ``u = 2**-24``;
    the statistics square and add in float64: ``|e'^2 - e^2| <= d_i (2|e| + d_i)``.
    A chunk's dW is one sum over its ``batch_chunk`` samples (one GEMM, or the compiled
    loop), so each element of ``S`` is off by at most ``D = gamma_N (sum_i |A_i|^T |dZ_i|)``
    with ``N = batch_chunk * n`` (the chunks' partials are then added in float64), and
    ``| |S'|^2 - |S|^2 | <= sum D (2|S| + D)``. db is summed in float64 throughout. The
    figures combine these; a slack of 1e-12 relative covers the float64 roundings.
    """
    dW, db = per_sample(case, arrays)
    dW_abs, _ = per_sample(case, arrays, absolute=True)
    m = dW.shape[0]
    geometry = dconv.params.backward_geometry(
        tuple(arrays["dZ"].shape), tuple(arrays["A_prev"].shape), case.w_shape, dconv.ConvParams.parse(**case.kwargs)
    )
    rows, cols = geometry.padded_hw
    u = 2.0**-24
    n = rows * cols + 1
    d = n * u / (1 - n * u) * dW_abs
    squares = (d * (2 * np.abs(dW) + d)).reshape(m, -1).sum(axis=1)
    N = min(batch_chunk, m) * n
    S, D = dW.sum(axis=0), N * u / (1 - N * u) * dW_abs.sum(axis=0)
    err_S2 = float((D * (2 * np.abs(S) + D)).sum())
    want = truth(case, arrays)
    err_total = float(squares.sum())
    slack = 1e-12 * (want["S2"] + want["figures"]["sum_sample_norm2"])
    bounds = {
        "stats/sample_grad_norm2": squares + 1e-12 * want["stats/sample_grad_norm2"],
        "sum_sample_norm2": err_total + slack,
        "mean_grad_norm2": (err_S2 + slack) / m**2,
    }
    if m > 1:
        bounds["grad_norm2"] = (err_S2 + err_total + slack) / (m * (m - 1))
        bounds["trace_cov"] = (err_total + err_S2 / m + slack) / (m - 1)
    return bounds


def run(arrays: dict, out, case: Case, **options):
    options.setdefault("scheduler", "synchronous")
    return dconv.backward_job(arrays, out, **case.kwargs, **options)


def stored(out, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")[name][...])


def provenance(out) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs["dconv"])


# --------------------------------------------------------------------------- agreement with the oracle


@pytest.mark.parametrize("m", [1, 2, 23])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_float64_statistics_match_the_per_sample_oracle(tmp_path, layer, m):
    """Every array and figure, to 1e-10 relative; chunks of 5 samples and a fan-in of 2 (a tree of several levels)."""
    case = LAYERS[layer]
    arrays = batch(case, m, np.float64)
    result = run(arrays, tmp_path / "out.zarr", case, stats=True, batch_chunk=5, split_every=2)
    want = truth(case, arrays)
    for name in STATS:
        got = stored(tmp_path / "out.zarr", name)
        assert got.dtype == np.float64 and got.shape == want[name].shape, name
        np.testing.assert_allclose(got, want[name], rtol=1e-10, atol=0, err_msg=name)
        assert result.values.get(name, got).tobytes() == got.tobytes(), name  # dW_sq, db_sq: the result is the store
    figures, expected = provenance(tmp_path / "out.zarr")["stats"], want["figures"]
    assert figures == json.loads(json.dumps(result.stats)), "the provenance holds the result's figures"
    assert figures["m"] == m
    for name in ("sum_sample_norm2", "mean_grad_norm2"):
        assert figures[name] == pytest.approx(expected[name], rel=1e-10, abs=0), name
    if m == 1:
        assert figures["grad_norm2"] is None and figures["trace_cov"] is None and figures["noise_scale"] is None
    else:
        scale = expected["sum_sample_norm2"] / (m - 1)
        for name in ("grad_norm2", "trace_cov"):
            assert abs(figures[name] - expected[name]) <= 1e-10 * scale, name
        tolerance = noise_scale_tolerance(expected, 1e-10 * scale, 1e-10 * scale)
        assert abs(figures["noise_scale"] - expected["noise_scale"]) <= tolerance
    norm2 = want["stats/sample_grad_norm2"]
    order = np.lexsort((np.arange(m), -norm2))[:10]
    assert figures["top_samples"]["index"] == order.tolist()
    np.testing.assert_allclose(figures["top_samples"]["sample_grad_norm2"], norm2[order], rtol=1e-10, atol=0)


@pytest.mark.parametrize("m", [2, 23])
@pytest.mark.parametrize("layer", ["pad1", "s2_same", "pointwise"])
def test_float32_statistics_are_within_the_derived_bound(tmp_path, layer, m):
    """float32 inputs against the float64 truth on the same (float32) values, within :func:`float32_figure_bounds`."""
    case = LAYERS[layer]
    arrays = batch(case, m, np.float32)
    run(arrays, tmp_path / "out.zarr", case, stats=True, batch_chunk=5, split_every=2)
    want, bounds = truth(case, arrays), float32_figure_bounds(case, arrays, batch_chunk=5)
    error = np.abs(stored(tmp_path / "out.zarr", "stats/sample_grad_norm2") - want["stats/sample_grad_norm2"])
    assert (error <= bounds["stats/sample_grad_norm2"]).all()
    figures = provenance(tmp_path / "out.zarr")["stats"]
    for name in ("sum_sample_norm2", "mean_grad_norm2", "grad_norm2", "trace_cov"):
        assert abs(figures[name] - want["figures"][name]) <= bounds[name], name
    tolerance = noise_scale_tolerance(want["figures"], bounds["grad_norm2"], bounds["trace_cov"])
    assert abs(figures["noise_scale"] - want["figures"]["noise_scale"]) <= tolerance


def test_figures_are_null_where_undefined(tmp_path):
    """Samples with no shared gradient: |G|^2 estimates at or below 0, and the noise scale is JSON null."""
    case = Case((2, 4, 4, 1), (1, 1, 1, 1))
    arrays = {
        "A_prev": np.ones((2, 4, 4, 1)),
        "W": np.ones((1, 1, 1, 1)),
        "dZ": np.stack([np.ones((4, 4, 1)), -np.ones((4, 4, 1))]),  # g_1 = -g_0: S = 0
    }
    result = run(arrays, tmp_path / "out.zarr", case, stats=True)
    figures = provenance(tmp_path / "out.zarr")["stats"]
    assert figures["grad_norm2"] == pytest.approx(-512.0) and figures["noise_scale"] is None
    assert result.stats["noise_scale"] is None
    text = (tmp_path / "out.zarr" / "zarr.json").read_text()
    assert '"noise_scale": null' in text


# --------------------------------------------------------------------------- what stats and dA_prev change


def test_without_stats_nothing_changes(tmp_path, make_input):
    """No stats/ group, no statistics in the provenance, and the identity of a job from before the option."""
    inp = make_input(m=12, chunk=4)
    result = dconv.backward_job(inp, tmp_path / "out.zarr", batch_chunk=4, scheduler="synchronous")
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert "stats" not in group and "stats" not in group.attrs["dconv"] and "stats" not in result.values
    identity = plan_job(inp, tmp_path / "other.zarr", batch_chunk=4).identity()
    assert set(identity) == {"input", "shapes", "dtypes", "params", "batch_chunk", "split_every"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer", ["pad1", "s2_same", "pointwise"])
def test_dW_db_are_bitwise_the_same_with_stats_and_without_dA_prev(tmp_path, layer, dtype):
    """dW and db of a plain job, a --stats job, a --no-dA-prev job and one with both: the same bits;
    dA_prev of the --stats job is the plain job's; a job without dA_prev writes no dA_prev array."""
    case = LAYERS[layer]
    arrays = batch(case, 17, dtype)
    runs = {
        "plain": {},
        "stats": {"stats": True},
        "no_dA_prev": {"dA_prev": False},
        "both": {"stats": True, "dA_prev": False},
    }
    results = {name: run(arrays, tmp_path / f"{name}.zarr", case, batch_chunk=4, **opts) for name, opts in runs.items()}
    for name, result in results.items():
        for array in ("dW", "db"):
            assert result.values[array].tobytes() == results["plain"].values[array].tobytes(), (name, array)
            assert stored(tmp_path / f"{name}.zarr", array).tobytes() == result.values[array].tobytes(), (name, array)
    assert stored(tmp_path / "stats.zarr", "dA_prev").tobytes() == stored(tmp_path / "plain.zarr", "dA_prev").tobytes()
    for name in ("no_dA_prev", "both"):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
        assert "dA_prev" not in group and not (tmp_path / f"{name}.zarr" / "dA_prev").exists()
        assert provenance(tmp_path / f"{name}.zarr")["nonfinite"] == {"dW": 0, "db": 0}
        assert provenance(tmp_path / f"{name}.zarr")["dA_prev"] is False
    for array in STATS:
        assert stored(tmp_path / "both.zarr", array).tobytes() == stored(tmp_path / "stats.zarr", array).tobytes()
    assert provenance(tmp_path / "both.zarr")["stats"] == provenance(tmp_path / "stats.zarr")["stats"]


def test_stats_group_opens_in_xarray(tmp_path, make_input):
    xr = pytest.importorskip("xarray")
    inp = make_input(m=12, chunk=4)
    dconv.backward_job(inp, tmp_path / "out.zarr", batch_chunk=4, stats=True, scheduler="synchronous")
    ds = xr.open_zarr(str(tmp_path / "out.zarr"), group="stats", consolidated=False)
    assert set(ds.data_vars) == {"sample_grad_norm2", "dW_sq", "db_sq"}
    assert ds["sample_grad_norm2"].dims == ("m",) and ds.sizes["m"] == 12
    assert ds["dW_sq"].dims == ("fh", "fw", "C_prev", "C") and ds["db_sq"].dims == ("b_h", "b_w", "b_c", "C")
    np.testing.assert_array_equal(ds["sample_grad_norm2"].values, stored(tmp_path / "out.zarr", STATS[0]))


# --------------------------------------------------------------------------- reproducibility and resume


@pytest.mark.cluster
def test_statistics_are_bitwise_the_same_across_workers_and_schedulers(make_input, client, tmp_path):
    inp = make_input(m=30, chunk=7, dtype="float32", in_channels=4, out_channels=5)
    options = {"batch_chunk": 4, "split_every": 3, "stats": True}
    runs = {
        "two_workers": dconv.backward_job(inp, tmp_path / "two_workers.zarr", client=client, **options),
        "one_worker": dconv.backward_job(inp, tmp_path / "one_worker.zarr", cluster=ClusterOptions(workers=1), **options),
        "threads": dconv.backward_job(inp, tmp_path / "threads.zarr", scheduler="threads", **options),
    }
    reference = tmp_path / "two_workers.zarr"
    for name in runs:
        for array in ("dW", "db", "dA_prev", *STATS):
            assert stored(tmp_path / f"{name}.zarr", array).tobytes() == stored(reference, array).tobytes(), (name, array)
        assert provenance(tmp_path / f"{name}.zarr")["stats"] == provenance(reference)["stats"], name


def test_a_resumed_job_gives_the_same_statistics_bit_for_bit(make_input, tmp_path):
    """Chunks 1 and 4 ran before the job was "killed"; the resumed run reads their records back."""
    inp = make_input(m=40, chunk=4)
    whole = dconv.backward_job(inp, tmp_path / "whole.zarr", batch_chunk=4, split_every=2, stats=True, scheduler="synchronous")
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=4, split_every=2, stats=True)
    plan.open_output()
    plan.run_chunk(1)
    plan.run_chunk(4)
    resumed = dconv.backward_job(inp, out, batch_chunk=4, split_every=2, stats=True, resume=True, scheduler="synchronous")
    assert resumed.computed_chunks == 8
    for array in ("dW", "db", "dA_prev", *STATS):
        assert stored(out, array).tobytes() == stored(tmp_path / "whole.zarr", array).tobytes(), array
    assert provenance(out)["stats"] == provenance(tmp_path / "whole.zarr")["stats"] == json.loads(json.dumps(whole.stats))


@pytest.mark.parametrize("first, then", [({}, {"stats": True}), ({"stats": True}, {"dA_prev": False})])
def test_resume_refuses_a_job_with_other_statistics_or_dA_prev(make_input, tmp_path, first, then):
    inp = make_input(m=12, chunk=4)
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=4, **first)
    plan.open_output()
    plan.run_chunk(0)
    (key, value), = then.items()
    with pytest.raises(dconv.InputError, match=f"other options than it was made with \\({key}: {value} here"):
        dconv.backward_job(inp, out, batch_chunk=4, resume=True, scheduler="synchronous", **then)


def test_inspect_shows_the_noise_scale_and_top_samples(tmp_path):
    case = LAYERS["pad1"]
    arrays = batch(case, 23, np.float64)
    run(arrays, tmp_path / "out.zarr", case, stats=True, batch_chunk=5)
    summary = dconv.summarize(str(tmp_path / "out.zarr"))
    figures = provenance(tmp_path / "out.zarr")["stats"]
    assert summary["stats"] == figures
    text = dconv.format_summary(summary)
    assert f"noise scale B_simple = tr(Sigma) / |G|^2 = {figures['noise_scale']:.6g}" in text
    first, value = figures["top_samples"]["index"][0], figures["top_samples"]["sample_grad_norm2"][0]
    assert f"largest |g_i|^2: sample {first} ({value:.6g})" in text
    assert "stats/sample_grad_norm2" in summary["arrays"]


def test_a_resume_keeps_stats_and_no_dA_prev(make_input, tmp_path):
    """The resume command names no option: the resume takes --stats and --no-dA-prev from the output."""
    inp = make_input(m=12, chunk=4)
    out = tmp_path / "out.zarr"
    plan = plan_job(inp, out, batch_chunk=4, stats=True, dA_prev=False)
    plan.open_output()
    plan.run_chunk(0)
    assert dconv.summarize(str(out))["resume_command"].endswith(" --resume")
    resumed = dconv.backward_job(inp, out, resume=True, scheduler="synchronous")
    assert resumed.stats["m"] == 12 and "dA_prev" not in zarr.open_group(str(out))


def test_task_memory_counts_the_statistics(make_input, tmp_path):
    inp = make_input(m=64, chunk=64, height=16, width=16, in_channels=8, out_channels=16)
    plain = plan_job(inp, tmp_path / "a.zarr", batch_chunk=32)
    stats = plan_job(inp, tmp_path / "b.zarr", batch_chunk=32, stats=True)
    assert stats.task_memory() > plain.task_memory()
    assert "stats/sample_grad_norm2" in stats.describe() and "noise scale" in stats.describe()


def test_top_samples_merge_the_same_way_whatever_the_tree():
    """The top list is reduced by merging: the same list from any grouping of the chunks."""
    from dconv.statistics import merge_top, top_samples

    norm2 = np.random.default_rng(1).standard_normal(50) ** 2
    norm2[[7, 30]] = norm2[3]  # ties are broken by the lower index
    norm2[41] = np.nan          # a non-finite norm is the worst outlier: first
    chunks = [top_samples(norm2[i : i + 6], i) for i in range(0, 50, 6)]
    left_to_right = chunks[0]
    for chunk in chunks[1:]:
        left_to_right = merge_top(left_to_right, chunk)
    pairs = [merge_top(chunks[i], chunks[i + 1]) if i + 1 < len(chunks) else chunks[i] for i in range(0, len(chunks), 2)]
    while len(pairs) > 1:
        pairs = [merge_top(pairs[i], pairs[i + 1]) if i + 1 < len(pairs) else pairs[i] for i in range(0, len(pairs), 2)]
    assert left_to_right.tobytes() == pairs[0].tobytes()
    finite = np.where(np.isnan(norm2), np.inf, norm2)
    assert left_to_right["index"].tolist() == np.lexsort((np.arange(50), -finite))[:10].tolist()
    short = top_samples(norm2[:3], 0)
    assert short["index"].tolist()[3:] == [-1] * 7


@pytest.mark.cluster
def test_spec_and_cli_take_stats_and_dA_prev(tmp_path, make_input, forked_dconv):
    """``[job] stats = true`` and ``dA_prev = false`` in a spec; ``dconv backward --stats --no-dA-prev``
    on the embedded cluster, and ``dconv inspect`` on its output."""
    inp = make_input(m=12, chunk=4)
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'[input]\npath = "{inp}"\n[output]\npath = "{tmp_path / "spec.zarr"}"\n'
        "[job]\nbatch_chunk = 4\nstats = true\ndA_prev = false\n"
    )
    loaded = dconv.load_spec(spec)
    assert loaded.options.stats is True and loaded.options.dA_prev is False
    ran = forked_dconv.run(
        ["backward", inp, tmp_path / "cli.zarr", "--batch-chunk", "4", "--stats", "--no-dA-prev", "--workers", "1"]
    )
    assert ran.returncode == 0, ran.stderr
    assert "noise scale" in ran.stdout + ran.stderr
    inspected = forked_dconv.run(["inspect", tmp_path / "cli.zarr"])
    assert inspected.returncode == 0 and "noise scale B_simple" in inspected.stdout, inspected.stderr
    group = zarr.open_group(str(tmp_path / "cli.zarr"), mode="r")
    assert "dA_prev" not in group and "stats/sample_grad_norm2" in group
    assert group.attrs["dconv"]["per_sample_stats"] is True and group.attrs["dconv"]["dA_prev"] is False


def test_a_task_with_stats_stays_within_its_bound_and_near_a_plain_one(make_input, tmp_path):
    """The peak a chunk task allocates (tracemalloc: NumPy reports its buffers), with and without the
    statistics: within the plan's bound, and the statistics add at most 10 %."""
    import tracemalloc

    inp = make_input(m=64, chunk=32, height=16, width=16, in_channels=16, out_channels=32, dtype="float32")
    peaks = {}
    for name, options in (("plain", {}), ("stats", {"stats": True})):
        plan = plan_job(inp, tmp_path / f"{name}.zarr", batch_chunk=32, **options)
        plan.open_output()
        plan.run_chunk(0)  # opens the arrays, imports: not the task's own memory
        tracemalloc.start()
        plan.run_chunk(1)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peaks[name] <= plan.task_memory(), (name, peaks[name], plan.task_memory())
    assert peaks["stats"] <= 1.1 * peaks["plain"], peaks


def test_shared_inputs_add_one_pattern_to_every_sample(tmp_path):
    """make_inputs(shared=s): the same noise as shared=0 (the default), plus s times one pattern per array,
    the same in every sample; a negative weight is refused."""
    from dconv.store import make_inputs

    plain = zarr.open_group(make_inputs(str(tmp_path / "plain.zarr"), m=6, height=5, width=5, in_channels=2,
                                        out_channels=3, chunk=4, dtype="float64"), mode="r")
    shared = zarr.open_group(make_inputs(str(tmp_path / "shared.zarr"), m=6, height=5, width=5, in_channels=2,
                                         out_channels=3, chunk=4, dtype="float64", shared=0.5), mode="r")
    for name in ("A_prev", "dZ"):
        added = shared[name][...] - plain[name][...]
        assert np.abs(added).max() > 0.1
        np.testing.assert_allclose(added, np.broadcast_to(added[0], added.shape), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(shared["W"][...], plain["W"][...])
    with pytest.raises(dconv.InputError, match="shared must be a number >= 0; got -1"):
        make_inputs(str(tmp_path / "bad.zarr"), m=2, shared=-1)


@pytest.mark.parametrize("path", ["group", "mapping"])
def test_a_layer_without_bias_leaves_db_out_of_the_statistics(path, tmp_path):
    """A conv without bias (an input group without ``b``, or ``"b": None``): g_i = dW_i alone; db is still written."""
    case = LAYERS["s2_same"]
    arrays = batch(case, 12, np.float64)
    if path == "group":
        with dconv.InputWriter(tmp_path / "in.zarr", arrays["W"], stride=2, padding="same") as writer:
            writer.append(arrays["A_prev"], arrays["dZ"])
        inputs, conv = str(tmp_path / "in.zarr"), {}
    else:
        inputs, conv = {**arrays, "b": None}, case.kwargs
    result = dconv.backward_job(inputs, tmp_path / "out.zarr", batch_chunk=5, stats=True, scheduler="threads", **conv)
    dW, db = per_sample(case, arrays)
    norm2 = (dW * dW).reshape(12, -1).sum(axis=1)
    out = zarr.open_group(str(tmp_path / "out.zarr"))
    np.testing.assert_allclose(out["stats/sample_grad_norm2"][...], norm2, rtol=1e-10)
    assert not np.asarray(out["stats/db_sq"][...]).any()
    np.testing.assert_allclose(out["db"][...].ravel(), db.sum(axis=0), rtol=1e-10)
    S2 = float((dW.sum(axis=0) ** 2).sum())
    assert result.stats["grad_sum_norm2"] == pytest.approx(S2, rel=1e-10)
    assert result.stats["sum_sample_norm2"] == pytest.approx(norm2.sum(), rel=1e-10)
    assert out.attrs["dconv"]["bias"] is False

"""Jobs with per-sample products: ``--dot QUERIES`` and ``--sketch K_IN,K_OUT`` (:mod:`dconv.products`).

The truth is dconv's loop oracle one sample at a time in float64: ``G_i = [dW_i as (K, C); db_i]``.
Exact inner products and orthogonal full-size sketches agree to 1e-10 relative; the job's other
arrays keep their bits; projections are stored, read back on resume and by ``sketch_like``.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import dconv
from dconv.reference import conv2d_backward_loops

from _fault_helpers import describe, run_cli
from _models import LAYERS as MODEL_LAYERS, model_group, read

# (recipe, the conv keywords of the oracle): stride 2 and padding, dilation, 1x1, a linear layer on (m, T, in)
CASES = {
    "s2_pad1": dict(height=7, width=6, in_channels=3, out_channels=4, kernel=3, stride=2, padding=1),
    "dilated": dict(height=9, width=8, in_channels=2, out_channels=3, kernel=3, dilation=2, padding=0),
    "pointwise": dict(height=4, width=3, in_channels=5, out_channels=6, kernel=1, padding=0),
    "linear_tokens": dict(height=1, width=4, in_channels=6, out_channels=3, kernel=1, padding=0),
}


def grads_of(group_url: str) -> np.ndarray:
    """Every sample's ``G_i`` (m, K + 1, C) of an input group, by the loop oracle."""
    group = zarr.open_group(group_url, mode="r")
    hp = group.attrs["hparameters"]
    A, dZ, W = (np.asarray(group[n][...], dtype=np.float64) for n in ("A_prev", "dZ", "W"))
    conv = dict(stride=hp["stride"], padding=hp["pad"], dilation=hp.get("dilation", 1))
    out = []
    for i in range(A.shape[0]):
        g = conv2d_backward_loops(dZ[i : i + 1], A[i : i + 1], W, **conv)
        out.append(np.concatenate([g.dW.reshape(-1, W.shape[3]), np.ravel(g.db)[None]]))
    return np.stack(out)


def rel(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=list(CASES))
def layer(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    inputs = dconv.make_inputs(str(root / "in.zarr"), m=21, dtype="float64", chunk=7, seed=1, **CASES[request.param])
    query_inputs = dconv.make_inputs(str(root / "q-in.zarr"), m=3, dtype="float64", seed=9, **CASES[request.param])
    dconv.queries_from_inputs(query_inputs, str(root / "q.zarr"))
    return root, inputs, grads_of(inputs), grads_of(query_inputs)


def test_dots_and_orthogonal_full_sketches_are_exact(layer, client):
    root, inputs, G, Q = layer
    K1, C = G.shape[1:]
    out = root / "out.zarr"
    dconv.backward_job(inputs, out, batch_chunk=7, stats=True, dot=str(root / "q.zarr"), sketch=(K1, C),
                       sketch_kind="orthogonal", sketch_dtype="float64", client=client, overwrite=True)
    assert rel(read(out, "dots/sample_dot"), np.einsum("ikc,jkc->ij", G, Q)) < 1e-10
    S = read(out, "sketch/values").reshape(G.shape[0], -1)
    assert rel(S @ S.T, np.einsum("ikc,jkc->ij", G, G)) < 1e-10
    group = zarr.open_group(str(out))
    assert group["sketch/values"].metadata.dimension_names == ("m", "k_in", "k_out")
    assert group.attrs["dconv"]["sketch"] == {"size": [K1, C], "kind": "orthogonal", "dtype": "float64"}


def test_products_leave_every_other_array_bitwise(layer, tmp_path):
    _, inputs, G, _ = layer
    plain = dconv.backward_job(inputs, tmp_path / "plain.zarr", batch_chunk=7, stats=True, scheduler="threads")
    dconv.backward_job(inputs, tmp_path / "sketched.zarr", batch_chunk=7, stats=True, sketch=(5, 2),
                       scheduler="threads")
    for name in ("dA_prev", "dW", "db", "stats/sample_grad_norm2", "stats/dW_sq"):
        assert np.array_equal(read(tmp_path / "plain.zarr", name), read(tmp_path / "sketched.zarr", name)), name
    assert read(tmp_path / "sketched.zarr", "sketch/values").dtype == np.float32
    assert plain.stats["noise_scale"] == dconv.open_result(str(tmp_path / "sketched.zarr")).attrs["dconv"]["stats"][
        "noise_scale"]


def test_the_batch_gradient_as_query_sums_to_S_squared(tmp_path):
    inputs = dconv.make_inputs(str(tmp_path / "in.zarr"), m=16, dtype="float64", shared=0.5, **CASES["s2_pad1"])
    first = dconv.backward_job(inputs, tmp_path / "first.zarr", stats=True, scheduler="threads")
    made = run_cli(["queries", tmp_path / "S.zarr", "--from-output", tmp_path / "first.zarr"])
    assert made.returncode == 0 and "(1 query)" in made.stdout, describe(made)
    dconv.backward_job(inputs, tmp_path / "second.zarr", dot=str(tmp_path / "S.zarr"), scheduler="threads")
    dots = read(tmp_path / "second.zarr", "dots/sample_dot")
    assert dots.shape == (16, 1)
    assert dots.sum() == pytest.approx(first.stats["grad_sum_norm2"], rel=1e-10)  # sum_i <g_i, S> = |S|^2


def test_sketch_like_and_resume_reuse_the_stored_projections(tmp_path, monkeypatch):
    import dconv.graph

    inputs = dconv.make_inputs(str(tmp_path / "in.zarr"), m=24, chunk=4, **CASES["s2_pad1"])
    a = tmp_path / "a.zarr"
    dconv.backward_job(inputs, a, batch_chunk=4, sketch=(6, 3), sketch_seed=7, scheduler="threads")
    b = tmp_path / "b.zarr"
    dconv.backward_job(inputs, b, batch_chunk=8, sketch_like=str(a), scheduler="threads")
    for name in ("sketch/P_in", "sketch/P_out"):
        assert np.array_equal(read(a, name), read(b, name))
    np.testing.assert_allclose(read(a, "sketch/values"), read(b, "sketch/values"), rtol=1e-5, atol=1e-6)

    c = tmp_path / "c.zarr"
    real = dconv.graph.run_chunk_task

    def stop_at_4(context, index, *args):
        if index == 4:
            raise KeyboardInterrupt
        return real(context, index, *args)

    monkeypatch.setattr(dconv.graph, "run_chunk_task", stop_at_4)
    with pytest.raises(dconv.JobInterrupted):
        dconv.backward_job(inputs, c, batch_chunk=4, sketch=(6, 3), sketch_seed=7, scheduler="synchronous")
    monkeypatch.setattr(dconv.graph, "run_chunk_task", real)
    dconv.backward_job(inputs, c, resume=True, scheduler="synchronous")
    for name in ("sketch/values", "sketch/P_in", "dW"):
        assert np.array_equal(read(a, name), read(c, name)), name


def test_a_model_job_adds_the_layers_dots(tmp_path, client):
    model = model_group(tmp_path / "model.zarr", m=20)
    queries = model_group(tmp_path / "q-model.zarr", m=2, seed=11)
    made = run_cli(["queries", tmp_path / "q.zarr", "--from-inputs", queries])
    assert made.returncode == 0, describe(made)
    out = tmp_path / "out.zarr"
    result = dconv.backward_job(model, out, batch_chunk=8, dot=str(tmp_path / "q.zarr"), sketch=(4, 2),
                                client=client)
    total = 0
    for name in MODEL_LAYERS:
        G, Q = grads_of(f"{model}/layers/{name}"), grads_of(f"{queries}/layers/{name}")
        dots = read(out / "layers" / name, "dots/sample_dot")
        assert rel(dots, np.einsum("ikc,jkc->ij", G, Q)) < 1e-10, name
        assert read(out / "layers" / name, "sketch/values").shape == (20, 4, 2)
        total = total + dots
    assert np.array_equal(read(out, "dots/sample_dot"), total)
    seeds = {name: read(out / "layers" / name, "sketch/P_out").tobytes() for name in MODEL_LAYERS}
    assert len(set(seeds.values())) == len(MODEL_LAYERS)  # a stream per layer
    assert result.layers["conv1"].values["dW"].shape == (3, 3, 3, 4)


def test_a_layer_without_bias_leaves_db_out_of_the_products(tmp_path):
    rng = np.random.default_rng(0)
    A, dZ, W = rng.standard_normal((9, 7, 6, 3)), rng.standard_normal((9, 4, 3, 4)), rng.standard_normal((3, 3, 3, 4))
    Q_dW, Q_db = rng.standard_normal((2, 3, 3, 3, 4)), rng.standard_normal((2, 4))
    dconv.write_queries(tmp_path / "q.zarr", {None: (Q_dW, Q_db)})
    arrays = {"A_prev": A, "dZ": dZ, "W": W, "b": None}
    dconv.backward_job(arrays, tmp_path / "out.zarr", stride=2, padding=1, dot=str(tmp_path / "q.zarr"),
                       scheduler="threads")
    dW = np.stack([conv2d_backward_loops(dZ[i : i + 1], A[i : i + 1], W, stride=2, padding=1).dW for i in range(9)])
    expected = np.einsum("iabcd,jabcd->ij", dW, Q_dW)
    assert rel(read(tmp_path / "out.zarr", "dots/sample_dot"), expected) < 1e-10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dot", "{tmp}/in.zarr"], "is not a query group"),
        (["--dot", "{tmp}/missing.zarr"], "does not exist"),
        (["--dot", "{tmp}/wrong.zarr"], "must be gradients of W (3, 3, 3, 4)"),
        (["--sketch-seed", "3"], "--sketch-seed shapes the sketches"),
        (["--sketch-like", "{tmp}/in.zarr"], "is not a dconv output with sketches"),
        (["--sketch", "0,3"], "sketch must be K_IN,K_OUT"),
        (["--sketch-dtype", "int8", "--sketch", "2,2"], "--sketch-dtype must be one of"),
    ],
)
def test_bad_product_options_are_one_line(tmp_path, args, message):
    dconv.make_inputs(str(tmp_path / "in.zarr"), m=4, **CASES["s2_pad1"])
    dconv.write_queries(tmp_path / "wrong.zarr", {None: (np.zeros((1, 1, 1, 3, 4)), np.zeros((1, 4)))})
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli(["backward", tmp_path / "in.zarr", tmp_path / "out.zarr", *args])
    assert result.returncode == 2, describe(result)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_model_sketches_score_against_a_query_model(tmp_path, client):
    """Train and query model jobs sketched with the same projections (sketch_like), then dconv score:
    the lists are those of the dense product of the layers' concatenated sketches."""
    train = model_group(tmp_path / "train.zarr", m=30)
    query = model_group(tmp_path / "query.zarr", m=3, seed=21)
    dconv.backward_job(train, tmp_path / "train-out.zarr", sketch=(6, 2), dA_prev=False, client=client)
    dconv.backward_job(query, tmp_path / "query-out.zarr", sketch_like=str(tmp_path / "train-out.zarr"),
                       dA_prev=False, client=client)
    result = dconv.score_job(tmp_path / "train-out.zarr", tmp_path / "query-out.zarr", tmp_path / "scores.zarr",
                             top=4, client=client)

    def features(out):
        return np.concatenate(
            [read(out / "layers" / name, "sketch/values").reshape(-1, 12) for name in MODEL_LAYERS], axis=1
        )

    scores = features(tmp_path / "train-out.zarr").astype(np.float64) @ features(tmp_path / "query-out.zarr").T
    for j in range(3):
        assert set(result.lists.positive_index[j]) == set(np.argsort(-scores[:, j])[:4])
        assert set(result.lists.negative_index[j]) == set(np.argsort(scores[:, j])[:4])

"""``dconv score``: blockwise top lists against a dense oracle, bitwise across blocks, trees, workers and resumes."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import zarr

import dconv
from dconv import score as score_module
from dconv.cli import main
from dconv.kernel.topk import dense_top
from dconv.score import PANEL, SPLIT_EVERY, build_graph, plan_score, score_job
from dconv.store.lease import acquire
from dconv.tree import tree_height

from _score_fixtures import features, model, one_layer, projections

M_TRAIN, M_QUERY, TOP = 100, 13, 5


def panel_products(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The oracle's float32 products (m_train, m_query): one GEMM per panel of PANEL train rows, as the tasks."""
    out = []
    for start in range(0, train.shape[0], PANEL):
        padded = np.zeros((PANEL, train.shape[1]), np.float32)
        rows = train[start : start + PANEL]
        padded[: len(rows)] = rows
        out.append((query @ padded.T).T[: len(rows)])
    return np.concatenate(out)


def assert_same(lists, expected) -> None:
    for name, value in expected.arrays().items():
        np.testing.assert_array_equal(getattr(lists, name), value, err_msg=name)


@pytest.fixture
def pair(tmp_path, rng):
    """A one-layer train output (with a repeated sample: ties, and a NaN sample) and a query output."""
    P = projections(rng, 3, 4)
    train = rng.standard_normal((M_TRAIN, 3, 4)).astype(np.float32)
    train[[20, 40, 77]] = train[9]                  # ties: the index decides
    train[3] = np.nan                               # NaN scores: in no list
    query = rng.standard_normal((M_QUERY, 3, 4)).astype(np.float32)
    norms = (rng.random(M_TRAIN) + 0.5), (rng.random(M_QUERY) + 0.5)
    paths = one_layer(tmp_path / "train.zarr", train, P, norms=norms[0]), one_layer(
        tmp_path / "query.zarr", query, P, norms=norms[1]
    )
    return paths, features([train]), features([query]), norms


@pytest.mark.parametrize("split_every", [SPLIT_EVERY, 2])
def test_blockwise_equals_dense_bitwise_across_blocks_and_trees(pair, tmp_path, monkeypatch, split_every):
    (train, query), F, Q, _ = pair
    monkeypatch.setattr(score_module, "SPLIT_EVERY", split_every)
    expected = dense_top(panel_products(F, Q), TOP)
    for block in (7, 16, M_TRAIN):
        result = score_job(train, query, tmp_path / f"s{block}.zarr", top=TOP, block=block, scheduler="synchronous")
        assert_same(result.lists, expected)
        group = zarr.open_group(str(tmp_path / f"s{block}.zarr"), mode="r")
        assert_same(type(result.lists)(**{n: group[f"top/{n}"][...] for n in expected.arrays()}), expected)
        assert group["top/positive_index"].metadata.dimension_names == ("query", "rank")
    assert 3 not in expected.positive_index and 3 not in expected.negative_index
    tied = expected.positive_index[np.isin(expected.positive_index, [9, 20, 40, 77]).any(axis=1)]
    for row in tied:  # a tied group appears in index order
        members = [i for i in row if i in (9, 20, 40, 77)]
        assert members == sorted(members)


def test_workers_and_threads_give_the_same_bits(pair, tmp_path, client):
    (train, query), F, Q, _ = pair
    expected = dense_top(panel_products(F, Q), TOP)
    on_cluster = score_job(train, query, tmp_path / "c.zarr", top=TOP, block=9, client=client)
    threads = score_job(train, query, tmp_path / "t.zarr", top=TOP, block=16, scheduler="threads")
    assert_same(on_cluster.lists, expected)
    assert_same(threads.lists, expected)


def test_short_lists_are_padded(tmp_path, rng):
    P = projections(rng, 2, 2)
    one_layer(tmp_path / "t.zarr", rng.standard_normal((3, 2, 2)).astype(np.float32), P)
    one_layer(tmp_path / "q.zarr", rng.standard_normal((2, 2, 2)).astype(np.float32), P)
    lists = score_job(tmp_path / "t.zarr", tmp_path / "q.zarr", tmp_path / "s.zarr", top=3, block=2,
                      scheduler="synchronous").lists
    assert (np.sort(lists.positive_index, axis=1) == [0, 1, 2]).all()


def test_tree_fan_in_and_depth(pair, tmp_path):
    (train, query), *_ = pair
    plan = plan_score(train, query, tmp_path / "s.zarr", top=TOP, block=1)
    graph, blocks = build_graph(plan, set())
    assert blocks == M_TRAIN
    nodes = [key for key in graph.dask if isinstance(key, tuple) and str(key[0]).startswith("dconv-score-node")]
    assert max(key[1] for key in nodes) == tree_height(M_TRAIN, SPLIT_EVERY) == 3
    for key in nodes:
        children = [arg for arg in graph.dask[key][3:]]
        assert 1 <= len(children) <= SPLIT_EVERY


def test_model_output_equals_one_layer_of_its_features(tmp_path, rng):
    shapes = [("conv1", 3, 4), ("fc", 2, 2)]
    Ps = [projections(rng, k_in, k_out) for _, k_in, k_out in shapes]
    tv = [rng.standard_normal((50, k_in, k_out)).astype(np.float32) for _, k_in, k_out in shapes]
    qv = [rng.standard_normal((6, k_in, k_out)).astype(np.float32) for _, k_in, k_out in shapes]
    model(tmp_path / "mt.zarr", [(n, v, P) for (n, _, _), v, P in zip(shapes, tv, Ps)])
    model(tmp_path / "mq.zarr", [(n, v, P) for (n, _, _), v, P in zip(shapes, qv, Ps)])
    F, Q = features(tv), features(qv)
    flat = projections(rng, 1, 16)
    one_layer(tmp_path / "t.zarr", F.reshape(50, 1, 16), flat)
    one_layer(tmp_path / "q.zarr", Q.reshape(6, 1, 16), flat)
    by_model = score_job(tmp_path / "mt.zarr", tmp_path / "mq.zarr", tmp_path / "s1.zarr", top=4, block=8,
                         scheduler="synchronous")
    by_layer = score_job(tmp_path / "t.zarr", tmp_path / "q.zarr", tmp_path / "s2.zarr", top=4,
                         scheduler="synchronous")
    assert_same(by_model.lists, by_layer.lists)
    assert_same(by_model.lists, dense_top(panel_products(F, Q), 4))


def test_normalize_and_full(pair, tmp_path):
    (train, query), F, Q, (n_train, n_query) = pair
    scale = lambda n: (1.0 / np.sqrt(n)).astype(np.float32)[:, None]  # noqa: E731
    products = panel_products(F * scale(n_train), Q * scale(n_query))
    result = score_job(train, query, tmp_path / "s.zarr", top=TOP, normalize=True, full=True, block=16,
                       scheduler="synchronous")
    assert_same(result.lists, dense_top(products, TOP))
    scores = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["scores"]
    assert scores.shape == (M_TRAIN, M_QUERY) and scores.chunks == (16, M_QUERY) and scores.dtype == np.float32
    assert scores.metadata.dimension_names == ("train", "query")
    np.testing.assert_array_equal(scores[...], products)


def test_dot_mode(tmp_path, rng):
    dots = rng.standard_normal((40, 6))
    dots[7] = dots[8]
    one_layer(tmp_path / "t.zarr", dots=dots, norms=rng.random(40) + 0.5)
    expected = dense_top(dots, 3)
    assert main([ "score", str(tmp_path / "t.zarr"), "-", str(tmp_path / "s.zarr"), "--top", "3", "--block", "7",
                  "--scheduler", "synchronous", "--quiet"]) == 0
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    np.testing.assert_array_equal(group["top/positive_index"][...], expected.positive_index)
    np.testing.assert_array_equal(group["top/negative_score"][...], expected.negative_score)
    assert group.attrs["dconv_score"]["mode"] == "dot"
    queries = rng.random(6) + 0.5
    one_layer(tmp_path / "q.zarr", dots=np.zeros((6, 1)), norms=queries)
    norms = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["stats/sample_grad_norm2"][...]
    cosine = dots * (1 / np.sqrt(norms))[:, None] * (1 / np.sqrt(queries))[None, :]
    result = score_job(tmp_path / "t.zarr", tmp_path / "q.zarr", tmp_path / "n.zarr", top=3, dots=True,
                       normalize=True, scheduler="synchronous")
    assert_same(result.lists, dense_top(cosine, 3))


def test_resume_after_an_interrupt_is_bitwise_the_same(pair, tmp_path, monkeypatch, capsys):
    (train, query), F, Q, _ = pair
    out = tmp_path / "s.zarr"
    run_block = score_module.run_block

    def stop_at_five(plan, queries, index):
        if index == 5:
            raise KeyboardInterrupt
        return run_block(plan, queries, index)

    monkeypatch.setattr(score_module, "run_block", stop_at_five)
    with pytest.raises(dconv.JobInterrupted) as stopped:
        score_job(train, query, out, top=TOP, block=9, full=True, scheduler="synchronous")
    done = stopped.value.done
    assert 0 < done < 12 and stopped.value.total == 12
    monkeypatch.setattr(score_module, "run_block", run_block)
    assert main(["inspect", str(out)]) == 3
    shown = capsys.readouterr().out
    assert "interrupted" in shown and f"{done} of 12 blocks done" in shown
    command = stopped.value.resume_command
    assert command == shlex.join(["dconv", "score", train, query, str(out), "--resume", "--scheduler", "synchronous"])
    assert main(shlex.split(command)[1:] + ["--quiet"]) == 0  # as printed
    assert f"{12 - done} of 12 blocks computed" in capsys.readouterr().out  # only what was missing
    score_job(train, query, tmp_path / "whole.zarr", top=TOP, block=9, full=True, scheduler="synchronous")
    group, whole = zarr.open_group(str(out), mode="r"), zarr.open_group(str(tmp_path / "whole.zarr"), mode="r")
    for name in ("top/positive_index", "top/positive_score", "top/negative_index", "top/negative_score", "scores"):
        np.testing.assert_array_equal(group[name][...], whole[name][...])
    assert group.attrs["dconv_score"]["status"] == "complete"
    assert not (out / "_progress" / "tree").exists()
    result = score_job(train, query, out, top=TOP, block=9, full=True, resume=True, scheduler="synchronous")
    assert result.already_complete
    assert main(["inspect", str(out)]) == 0
    assert "query 0: largest" in capsys.readouterr().out


def test_lease_and_overwrite(pair, tmp_path, capsys):
    (train, query), *_ = pair
    out = tmp_path / "s.zarr"
    lease = acquire(str(out), None, 60.0)
    try:
        with pytest.raises(dconv.InputError, match="lease|held"):
            score_job(train, query, out, scheduler="synchronous")
    finally:
        lease.release()
    score_job(train, query, out, top=2, scheduler="synchronous")
    score_job(train, query, out, top=3, scheduler="synchronous", overwrite=True)
    assert zarr.open_group(str(out), mode="r")["top/positive_index"].shape == (M_QUERY, 3)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(dconv.InputError, match="notes.txt"):
        score_job(train, query, out, scheduler="synchronous", overwrite=True)
    backward = one_layer(tmp_path / "backward.zarr", dots=np.zeros((2, 2)))
    with pytest.raises(dconv.InputError, match="is a dconv output, not a dconv score output"):
        score_job(train, query, backward, scheduler="synchronous", overwrite=True)


def _bad_inputs(tmp_path, rng):
    """Named cases: (argv after 'score', the words the one line must hold)."""
    P, other = projections(rng, 3, 4), projections(rng, 3, 4)
    v = lambda m, a=3, b=4: rng.standard_normal((m, a, b)).astype(np.float32)  # noqa: E731
    t = one_layer(tmp_path / "t.zarr", v(20), P)
    q = one_layer(tmp_path / "q.zarr", v(5), P)
    cases = {
        "incomplete": ([one_layer(tmp_path / "run.zarr", v(20), P, status="running"), q], "complete"),
        "no sketches": ([t, one_layer(tmp_path / "bare.zarr", None, None, dots=np.zeros((5, 2)))], "sketches"),
        "other layers": ([model(tmp_path / "m.zarr", [("a", v(20), P)]), q], "same layers"),
        "other shapes": ([t, one_layer(tmp_path / "s.zarr", v(5, 2, 4), projections(rng, 2, 4))], "sketch shapes"),
        "other projections": ([t, one_layer(tmp_path / "p.zarr", v(5), other)], "projections"),
        "no norms": ([t, q, "--normalize"], "sample_grad_norm2"),
        "top 0": ([t, q, "--top", "0"], "top must be"),
        "top > m": ([t, q, "--top", "21"], "top must be"),
        "block 0": ([t, q, "--block", "0"], "block must be"),
        "lease timeout 0": ([t, q, "--lease-timeout", "0"], "lease-timeout must be a number > 0"),
        "no dots": ([t, "-", "--dots"], "dots"),
        "no query": ([t, "-"], "QUERY_OUT must be given"),
        "not an output": ([str(tmp_path), q], "not a Zarr group"),
    }
    return t, cases


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, rng, capsys):
    t, cases = _bad_inputs(tmp_path, rng)
    for name, (args, words) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}.zarr"
        argv = ["score", *args[:2], str(out), *args[2:], "--scheduler", "synchronous"]
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, (name, err)
        assert not out.exists(), name
    assert main(["score", t, t, f"{t}/scores", "--scheduler", "synchronous"]) == 2
    assert "inside the input" in capsys.readouterr().err


def test_python_api_is_exported(pair, tmp_path):
    (train, query), *_ = pair
    result = dconv.score_job(train, query, tmp_path / "s.zarr", top=1, scheduler="synchronous")
    assert result.lists.positive_index.shape == (M_QUERY, 1)
    summary = dconv.summarize(str(tmp_path / "s.zarr"))
    assert summary["kind"] == "score" and summary["complete"]
    json.dumps(summary)


def _tiles_top(scores: np.ndarray, block: int, width: int, top: int):
    """The lists of ``scores`` (m, n_q) cut into blocks of ``block`` rows, each given to a
    :class:`RunningTop` in panels of ``width`` (aligned to multiples of ``width``, as the tasks do), merged."""
    from dconv.kernel.topk import RunningTop, merge_top

    m, n_q = scores.shape
    parts = []
    for start in range(0, m, block):
        stop = min(start + block, m)
        running = RunningTop(n_q, top, scores.dtype)
        for lo in range(start, stop):
            if lo == start or lo % width == 0:
                hi = min(stop, (lo // width + 1) * width)
                running.add(np.ascontiguousarray(scores[lo:hi].T), lo)
        parts.append(running.lists())
    return merge_top(parts, top)


@pytest.fixture(params=["compiled", "numpy"])
def top_path(request, monkeypatch):
    """Each top-list test runs on the compiled loop (where it is built) and on the NumPy path."""
    from dconv.kernel import topk

    if request.param == "numpy":
        monkeypatch.setattr(topk, "_flatconv", None)
    elif topk._flatconv is None:
        pytest.skip("the compiled loops are not built here")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_kernel_ties_signed_zeros_nan(rng, dtype, top_path):
    scores = rng.standard_normal((300, 9)).astype(dtype)
    scores[[5, 9, 120]] = scores[40]                       # ties across blocks
    scores[:, 0] = 0.0
    scores[::2, 0] = -0.0                                  # -0.0 ranks as 0.0: ties by index
    scores[10, 0], scores[30, 0] = 1.0, -1.0
    scores[3, 4] = np.nan
    scores[:, 8] = np.nan                                  # a query with no finite score: empty lists
    expected = dense_top(scores, 6)
    for block, width in ((1, 4), (7, 4), (64, 16), (300, 256)):
        lists = _tiles_top(scores, block, width, 6)
        for name in ("positive_index", "negative_index"):
            np.testing.assert_array_equal(getattr(lists, name), getattr(expected, name), err_msg=f"{block} {name}")
        for name in ("positive_score", "negative_score"):  # the same values (0.0 and -0.0 compare equal)
            np.testing.assert_array_equal(getattr(lists, name), getattr(expected, name))
    assert (expected.positive_index[8] == -1).all() and np.isnan(expected.positive_score[8]).all()
    assert expected.positive_index[0].tolist() == [10, 0, 1, 2, 3, 4]  # then the zeros, by index, whatever sign


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_top_on_many_ties_and_infinities_equals_dense(rng, dtype, top_path):
    """Scores from a handful of values (ties at every bound), with infinities and NaN, a list longer than a
    panel, panels of every width: the running lists equal the dense oracle's."""
    for trial in range(6):
        m, n_q, top = int(rng.integers(1, 120)), int(rng.integers(1, 6)), int(rng.integers(1, 12))
        scores = rng.choice(np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf, np.nan]), size=(m, n_q)).astype(dtype)
        expected = dense_top(scores, top)
        for block, width in ((m, 1), (5, 3), (17, 8), (m, 64)):
            lists = _tiles_top(scores, block, width, top)
            for name, value in lists.arrays().items():
                np.testing.assert_array_equal(value, getattr(expected, name), err_msg=f"{trial} {block} {width} {name}")


def test_running_top_refuses_panels_out_of_order():
    from dconv.kernel.topk import RunningTop

    running = RunningTop(2, 3)
    running.add(np.zeros((2, 4)), first=8)
    with pytest.raises(ValueError, match="first must be >= 12"):
        running.add(np.zeros((2, 4)), first=4)


def test_resume_after_sigkill_as_inspect_prints(tmp_path, rng):
    """``dconv score`` killed with SIGKILL mid-run: inspect says what is done and prints the resume command,
    which (once the dead job's lease is stale) computes only the missing blocks: the uninterrupted result."""
    import os
    import signal
    import subprocess

    from conftest import dconv_command, wait_until
    from _fault_helpers import describe, kill_group, run_cli
    from dconv.store.lease import read_lease

    proj = projections(rng, 16, 16)
    train = one_layer(tmp_path / "train.zarr", rng.standard_normal((1 << 15, 16, 16), dtype=np.float32), proj,
                      batch_chunk=4096)
    query = one_layer(tmp_path / "query.zarr", rng.standard_normal((1024, 16, 16), dtype=np.float32), proj,
                      batch_chunk=1024)
    out, whole = tmp_path / "s.zarr", tmp_path / "whole.zarr"
    args = ["score", train, query, out, "--block", "512", "--top", "4", "--scheduler", "synchronous", "--quiet",
            "--lease-timeout", "2"]
    records = out / "_progress" / "tree"
    with open(tmp_path / "killed.err", "w") as stderr:
        job = subprocess.Popen(dconv_command() + [str(a) for a in args], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert wait_until(lambda: any(records.glob("*")) or job.poll() is not None, timeout=120, interval=0.01)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
    finally:
        kill_group(job)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "killed.err").read_text()

    shown = run_cli(["inspect", out, "--json"])
    assert shown.returncode == 3, describe(shown)
    summary = json.loads(shown.stdout)
    done = summary["blocks"]["done"]
    assert 0 < done < 64 and summary["blocks"]["total"] == 64, summary["blocks"]
    command = summary["resume_command"]
    assert command == shlex.join(["dconv", "score", train, query, str(out), "--resume", "--scheduler", "synchronous"])
    assert wait_until(lambda: read_lease(out) is None or read_lease(out).age() > 2.5, timeout=10)
    resumed = run_cli(shlex.split(command)[1:] + ["--quiet"])
    assert resumed.returncode == 0, describe(resumed)
    computed = int(resumed.stdout.split(" of 64 blocks computed")[0].rsplit(" ", 1)[1])
    assert computed <= 64 - done, resumed.stdout
    score_job(train, query, whole, top=4, block=512, scheduler="synchronous")
    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(whole), mode="r")
    for name in ("positive_index", "positive_score", "negative_index", "negative_score"):
        np.testing.assert_array_equal(got[f"top/{name}"][...], want[f"top/{name}"][...])
    assert run_cli(["inspect", out]).returncode == 0

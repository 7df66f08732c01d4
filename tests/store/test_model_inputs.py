"""dconv.store.model: model input groups, one input group per layer (NumPy and Zarr only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputDtypeError, InputError
from dconv.store import (
    LayerSpec,
    ModelInputs,
    ModelLayer,
    ModelWriter,
    is_model_group,
    make_inputs,
    open_inputs,
    open_model_inputs,
)
from dconv.store.ownership import MODEL_MARKER, remove_own
from dconv.store.writer import InputWriter, default_chunk

PRECIOUS = b"my notes, not dconv's\n"


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself), by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Net:
    """Three layers of a small network and seeded batches for them.

    ``conv1`` (stride 2, padding 1) on (m, 6, 6, 2) -> (m, 3, 3, 3); ``block.0-fc`` a linear
    layer on (m, 4) -> (m, 5); ``attn.proj`` a linear layer on tokens, (m, 3, 4) -> (m, 3, 2).
    """

    def __init__(self, rng: np.random.Generator, dtype: str = "float64") -> None:
        self.rng, self.dtype = rng, dtype
        self.specs = {
            "conv1": LayerSpec.conv2d(self.normal(3, 3, 2, 3), self.normal(3), stride=2, padding=1),
            "block.0-fc": LayerSpec.linear(self.normal(4, 5), self.normal(5)),
            "attn.proj": LayerSpec.linear(self.normal(4, 2)),
        }

    def normal(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(self.dtype)

    def batch(self, m: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            "conv1": (self.normal(m, 6, 6, 2), self.normal(m, 3, 3, 3)),
            "block.0-fc": (self.normal(m, 4), self.normal(m, 5)),
            "attn.proj": (self.normal(m, 3, 4), self.normal(m, 3, 2)),
        }


@pytest.fixture
def net(rng) -> Net:
    return Net(rng)


def write(path, net: Net, sizes=(3,), indices=None, **options) -> list[dict]:
    """A model group of ``net``'s batches of ``sizes``; returns the batches."""
    batches = [net.batch(m) for m in sizes]
    with ModelWriter(path, net.specs, **options) as writer:
        for k, batch in enumerate(batches):
            writer.append(batch, index=None if indices is None else indices[k])
    return batches


def stacked(batches: list[dict], name: str, which: int) -> np.ndarray:
    return np.concatenate([batch[name][which] for batch in batches])


# --------------------------------------------------------------------------- round trip


def test_round_trip_conv_and_linear_layers_uneven_batches(net, tmp_path):
    path = tmp_path / "model.zarr"
    batches = write(path, net, sizes=(5, 3, 11, 1), chunk=4)
    attribute = zarr.open_group(path, mode="r").attrs[MODEL_MARKER]
    assert attribute == {
        "writer": "ModelWriter",
        "version": dconv.__version__,
        "layers": [
            {"name": "conv1", "kind": "conv2d", "path": "layers/conv1"},
            {"name": "block.0-fc", "kind": "linear", "path": "layers/block.0-fc"},
            {"name": "attn.proj", "kind": "linear", "path": "layers/attn.proj"},
        ],
        "sample_index": "appended",
    }
    model = open_model_inputs(path)
    assert model == ModelInputs(
        str(path), str(path),
        (ModelLayer("conv1", "conv2d", "layers/conv1"), ModelLayer("block.0-fc", "linear", "layers/block.0-fc"),
         ModelLayer("attn.proj", "linear", "layers/attn.proj")),
        20, "appended",
    )
    np.testing.assert_array_equal(model.read_sample_index(), np.arange(20))
    # each layer is a complete input group, as InputWriter writes it; linear inputs as 1x1 convolutions
    want_rows = {
        "conv1": lambda x: x,
        "block.0-fc": lambda x: x.reshape(len(x), 1, 1, -1),
        "attn.proj": lambda x: x.reshape(len(x), 1, 3, -1),
    }
    for name, spec in net.specs.items():
        group = open_inputs(model.layer_url(name))
        assert zarr.open_group(model.layer_url(name), mode="r").attrs["dconv_input"]["writer"] == "InputWriter"
        for which, array in enumerate((group.A_prev, group.dZ)):
            np.testing.assert_array_equal(array[...], want_rows[name](stacked(batches, name, which)))
            assert array.chunks[0] == 4
        np.testing.assert_array_equal(group.W[...], spec.W)
        assert (group.b is None) == (spec.b is None)
        expected_hparameters = {"stride": 2, "pad": 1, "dilation": 1} if name == "conv1" else {
            "stride": 1, "pad": 0, "dilation": 1}
        assert group.hparameters == expected_hparameters
    assert net.specs["block.0-fc"].W.shape == (1, 1, 4, 5)
    assert net.specs["conv1"].b.shape == (1, 1, 1, 3)


def test_linear_inputs_with_more_leading_dimensions_flatten(rng, tmp_path):
    """(m, a, b, in) is (m, 1, a * b, in): a linear layer over a 2-D grid of tokens."""
    spec = LayerSpec.linear(rng.standard_normal((4, 2)))
    A_prev, dZ = rng.standard_normal((3, 2, 5, 4)), rng.standard_normal((3, 2, 5, 2))
    with ModelWriter(tmp_path / "m.zarr", {"head": spec}) as writer:
        writer.append({"head": (A_prev, dZ)})
    group = open_model_inputs(tmp_path / "m.zarr").open_layer("head")
    np.testing.assert_array_equal(group.A_prev[...], A_prev.reshape(3, 1, 10, 4))
    np.testing.assert_array_equal(group.dZ[...], dZ.reshape(3, 1, 10, 2))


def test_the_job_side_reads_each_layer_as_a_plain_input_group(net, tmp_path):
    """A layer's group gives, through the kernel, the sums of its rows' gradients (a linear layer's too)."""
    path = tmp_path / "m.zarr"
    batches = write(path, net, sizes=(2, 3))
    model = open_model_inputs(path)
    group = model.open_layer("attn.proj")
    grads = dconv.conv2d_backward(group.dZ[...], group.A_prev[...], group.W[...])
    A_prev, dZ = stacked(batches, "attn.proj", 0), stacked(batches, "attn.proj", 1)
    np.testing.assert_allclose(grads.dW[0, 0], np.einsum("mti,mto->io", A_prev, dZ), rtol=1e-12)


def test_sample_index_given(net, tmp_path):
    path = tmp_path / "m.zarr"
    indices = [np.array([7, 3, 9]), np.array([0], dtype=np.uint8), np.array([100, 2, 5, 4, 8], dtype=np.int32)]
    write(path, net, sizes=(3, 1, 5), indices=indices, chunk=2)
    model = open_model_inputs(path)
    assert (model.m, model.sample_index) == (9, "given")
    stored = zarr.open_group(path, mode="r")["sample_index"]
    assert (stored.dtype, stored.chunks) == (np.dtype(np.int64), (2,))
    np.testing.assert_array_equal(model.read_sample_index(), np.concatenate(indices))


def test_default_chunk_is_the_smallest_layers(rng, tmp_path):
    """One chunk along m for every layer: a layer of large samples sets it for all."""
    big = LayerSpec.conv2d(rng.standard_normal((1, 1, 4, 1)))
    small = LayerSpec.linear(rng.standard_normal((4, 1)))
    A_big = rng.standard_normal((2, 100, 100, 4))
    with ModelWriter(tmp_path / "m.zarr", {"big": big, "small": small}) as writer:
        dZ_big = rng.standard_normal((2, 100, 100, 1))
        writer.append({"big": (A_big, dZ_big), "small": (np.ones((2, 4)), np.ones((2, 1)))})
        assert writer.chunk == default_chunk(A_big[0].nbytes + A_big[0].nbytes // 4) == 128


def test_error_in_with_block_keeps_earlier_batches(net, tmp_path):
    path = tmp_path / "m.zarr"
    first = net.batch(3)
    with pytest.raises(KeyError, match="the caller's"):
        with ModelWriter(path, net.specs, chunk=2, writer="capture") as writer:
            writer.append(first, index=np.arange(3))
            raise KeyError("the caller's")
    model = open_model_inputs(path)
    assert (model.m, model.sample_index) == (3, "given")
    np.testing.assert_array_equal(model.open_layer("conv1").A_prev[...], first["conv1"][0])
    np.testing.assert_array_equal(model.read_sample_index(), np.arange(3))
    assert zarr.open_group(path, mode="r").attrs[MODEL_MARKER]["writer"] == "capture"


# --------------------------------------------------------------------------- refused


def _rename(batch, old, new):
    batch = dict(batch)
    batch[new] = batch.pop(old)
    return batch


def _resized(batch, name, m):
    A_prev, dZ = batch[name]
    return {**batch, name: (A_prev[:m], dZ[:m])}


BAD_BATCHES = {
    "missing": (lambda b: {k: v for k, v in b.items() if k != "attn.proj"}, "got missing 'attn.proj'"),
    "unknown": (lambda b: {**b, "conv9": b["conv1"]}, "got unknown 'conv9'"),
    "missing_and_unknown": (lambda b: _rename(b, "conv1", "conv2"), "got missing 'conv1'; unknown 'conv2'"),
    "different_m": (lambda b: _resized(b, "block.0-fc", 2), "every layer's batch must have the same m; got conv1: 3, "
                    "block.0-fc: 2, attn.proj: 3"),
    "not_a_pair": (lambda b: {**b, "conv1": b["conv1"][0]}, r"batch\['conv1'\] must be a pair \(A_prev, dZ\)"),
    "not_a_mapping": (lambda b: list(b.values()), "batch must map every layer name to"),
    "conv_shape": (lambda b: {**b, "conv1": (b["conv1"][0][:, :3], b["conv1"][1])}, "^layer 'conv1': dZ has shape"),
    "linear_features": (lambda b: {**b, "block.0-fc": (np.ones((3, 6)), np.ones((3, 5)))}, "^layer 'block.0-fc': "),
    "linear_leading": (lambda b: {**b, "attn.proj": (np.ones((3, 3, 4)), np.ones((3, 2, 2)))},
                       r"^layer 'attn.proj': dZ of a linear layer must have A_prev's leading dimensions \(3, 3\)"),
    "linear_1d": (lambda b: {**b, "block.0-fc": (np.ones(4), np.ones(5))},
                  r"^layer 'block.0-fc': A_prev of a linear layer must have shape \(m, ..., features\)"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_first_batch_is_refused_in_one_line_and_writes_nothing(case, net, tmp_path):
    change, message = BAD_BATCHES[case]
    path = tmp_path / "m.zarr"
    writer = ModelWriter(path, net.specs)
    with pytest.raises(InputError, match=message) as error:
        writer.append(change(net.batch(3)))
    assert "\n" not in str(error.value)
    assert not path.exists()
    writer.append(net.batch(3))  # the writer is still usable
    assert writer.close() == str(path) and open_model_inputs(path).m == 3


def test_dtype_errors_name_the_layer(net, tmp_path):
    writer = ModelWriter(tmp_path / "m.zarr", net.specs)
    batch = net.batch(2)
    with pytest.raises(InputDtypeError, match="^layer 'block.0-fc': A_prev must have dtype float32 or float64"):
        writer.append({**batch, "block.0-fc": (batch["block.0-fc"][0].astype(np.float16), batch["block.0-fc"][1])})
    writer.append(batch)
    with pytest.raises(InputDtypeError, match="^layer 'conv1': dZ must have dtype float64, as in the first batch"):
        writer.append({**batch, "conv1": (batch["conv1"][0], batch["conv1"][1].astype(np.float32))})
    with pytest.raises(InputError, match=r"^layer 'attn.proj': A_prev samples must have shape \(1, 3, 4\)"):
        writer.append({**batch, "attn.proj": (np.ones((2, 4, 4)), np.ones((2, 4, 2)))})
    writer.close()
    assert open_model_inputs(tmp_path / "m.zarr").m == 2  # the refused batches wrote nothing, to no layer


@pytest.mark.parametrize(
    "first, later, message",
    [
        (np.arange(3), None, "^index must be given with every batch, as it was with the first; got None instead"),
        (None, np.arange(3), "^index must be None, as it was for the first batch"),
    ],
    ids=["given_then_not", "not_then_given"],
)
def test_index_given_with_some_batches_and_not_others_is_refused(first, later, message, net, tmp_path):
    with ModelWriter(tmp_path / "m.zarr", net.specs) as writer:
        writer.append(net.batch(3), index=first)
        with pytest.raises(InputError, match=message):
            writer.append(net.batch(3), index=later)
    assert open_model_inputs(tmp_path / "m.zarr").m == 3


@pytest.mark.parametrize(
    "index, message",
    [
        (np.arange(4), r"^index must have shape \(3,\), one entry per row of the batch; got \(4,\) instead"),
        (np.arange(3).reshape(3, 1), r"^index must have shape \(3,\)"),
        (np.array([0.0, 1.0, 2.0]), "^index must hold integers .* got dtype float64 instead"),
        (np.array([True, False, True]), "^index must hold integers .* got dtype bool instead"),
        (np.array([0, 1, 2**63], dtype=np.uint64), "^index must fit in int64"),
    ],
    ids=["length", "2d", "float", "bool", "uint64"],
)
def test_bad_index_is_refused(index, message, net, tmp_path):
    writer = ModelWriter(tmp_path / "m.zarr", net.specs)
    with pytest.raises(InputError, match=message):
        writer.append(net.batch(3), index=index)
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "^layers must name at least one layer; got none"),
        ([""], "^layer names must be non-empty, .*; got '' instead"),
        ([".hidden"], "got '.hidden' instead"),
        (["a/b"], "got 'a/b' instead"),
        (["conv 1"], "got 'conv 1' instead"),
        (["zarr.json"], "got 'zarr.json' instead"),
        (["Conv1", "conv1"], r"^layer names must be unique \(ignoring case\); got 'Conv1' and 'conv1'"),
    ],
)
def test_bad_layer_names_are_refused(names, message, rng, tmp_path):
    spec = LayerSpec.linear(rng.standard_normal((2, 2)))
    with pytest.raises(InputError, match=message):
        ModelWriter(tmp_path / "m.zarr", {name: spec for name in names})
    assert not (tmp_path / "m.zarr").exists()


def test_pytorch_module_names_are_valid_layer_names(rng, tmp_path):
    spec = LayerSpec.linear(rng.standard_normal((2, 2)))
    names = ["layer1.0.conv1", "features.12", "encoder.layers.3.self_attn.out_proj", "head-2", "fc"]
    ModelWriter(tmp_path / "m.zarr", dict.fromkeys(names, spec))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda W: LayerSpec("conv3d", W), InputError, "^kind must be one of 'conv2d', 'linear'; got 'conv3d' instead"),
        (lambda W: LayerSpec.linear(W), InputError,
         r"^W of a linear layer must be 2-D \(in, out\); got shape \(3, 3, 2, 4\)"),
        (lambda W: LayerSpec("linear", W), InputError, r"^W of a linear layer must have shape \(1, 1, in, out\)"),
        (lambda W: LayerSpec("linear", W[:1, :1], stride=2), InputError, "^a linear layer has stride 1, padding 0"),
        (lambda W: LayerSpec.conv2d(W[0]), InputError, "^W must be 4-D"),
        (lambda W: LayerSpec.conv2d(W, np.ones(3)), InputError, r"^b must have shape \(4,\) or \(1, 1, 1, 4\)"),
        (lambda W: LayerSpec.conv2d(W.astype(np.float16)), InputDtypeError, "^W must have dtype float32 or float64"),
        (lambda W: LayerSpec.conv2d(W, stride=0), InputError, "stride"),
    ],
    ids=["kind", "linear_2d", "linear_kernel", "linear_stride", "conv_rank", "bias", "dtype", "stride"],
)
def test_bad_layer_specs_are_refused(make, error, message, rng):
    with pytest.raises(error, match=message):
        make(rng.standard_normal((3, 3, 2, 4)))


def test_bad_writer_arguments(net, tmp_path):
    with pytest.raises(InputError, match=r"^layers\['conv1'\] must be a LayerSpec; got ndarray instead"):
        ModelWriter(tmp_path / "m.zarr", {"conv1": np.ones((1, 1, 2, 2))})
    with pytest.raises(InputError, match="^layers must map layer names to LayerSpec; got list instead"):
        ModelWriter(tmp_path / "m.zarr", [net.specs["conv1"]])
    with pytest.raises(InputError, match="^chunk must be a whole number >= 1; got 0 instead"):
        ModelWriter(tmp_path / "m.zarr", net.specs, chunk=0)
    with pytest.raises(InputError, match="^got no batch|got no batch"):
        ModelWriter(tmp_path / "m.zarr", net.specs).close()
    assert not (tmp_path / "m.zarr").exists()
    writer = ModelWriter(tmp_path / "m.zarr", net.specs)
    writer.append(net.batch(1))
    writer.close()
    with pytest.raises(InputError, match="is closed; open a new ModelWriter"):
        writer.append(net.batch(1))


# --------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_its_own_model_group_at_the_first_good_append(net, rng, tmp_path):
    path = tmp_path / "m.zarr"
    write(path, net, sizes=(4,), indices=[np.arange(4)])
    old = snapshot(path)
    with pytest.raises(InputError, match="already exists; pass overwrite=True to replace it"):
        ModelWriter(path, net.specs)
    spec = {"head": LayerSpec.linear(rng.standard_normal((4, 2)))}
    writer = ModelWriter(path, spec, overwrite=True)
    with pytest.raises(InputError, match="^layer 'head'"):
        writer.append({"head": (np.ones((2, 5)), np.ones((2, 2)))})
    assert snapshot(path) == old  # nothing removed before a batch passes its checks
    writer.append({"head": (np.ones((2, 4)), np.ones((2, 2)))})
    writer.close()
    model = open_model_inputs(path)
    assert (model.names, model.m, model.sample_index) == (("head",), 2, "appended")
    assert sorted(p.name for p in (path / "layers").iterdir()) == ["head", "zarr.json"]
    assert not (path / "sample_index").exists()


def foreign_dir(tmp_path: Path, net: Net) -> Path:
    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "notes.txt").write_bytes(PRECIOUS)
    return tmp_path / "mydir"


def plain_input_group(tmp_path: Path, net: Net) -> Path:
    return Path(make_inputs(str(tmp_path / "in.zarr"), m=2, height=4, width=4, in_channels=2, out_channels=2))


def model_with_a_foreign_file_in_layers(tmp_path: Path, net: Net) -> Path:
    write(tmp_path / "m.zarr", net)
    (tmp_path / "m.zarr" / "layers" / "notes.txt").write_bytes(PRECIOUS)
    return tmp_path / "m.zarr"


def model_with_a_foreign_file_in_a_layer(tmp_path: Path, net: Net) -> Path:
    write(tmp_path / "m.zarr", net)
    (tmp_path / "m.zarr" / "layers" / "conv1" / "notes.txt").write_bytes(PRECIOUS)
    return tmp_path / "m.zarr"


def model_with_a_foreign_file_at_the_top(tmp_path: Path, net: Net) -> Path:
    write(tmp_path / "m.zarr", net)
    (tmp_path / "m.zarr" / "notes.txt").write_bytes(PRECIOUS)
    return tmp_path / "m.zarr"


def zarr_group_of_someone_else(tmp_path: Path, net: Net) -> Path:
    zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3).create_group("layers")
    return tmp_path / "theirs.zarr"


@pytest.mark.parametrize(
    "target, found",
    [
        (foreign_dir, "is not a dconv model input group (it holds 'notes.txt')"),
        (plain_input_group, "is a dconv input group, not a dconv model input group"),
        (model_with_a_foreign_file_in_layers,
         "is not a dconv model input group (its layers/ holds 'notes.txt', which it does not name as layers)"),
        (model_with_a_foreign_file_in_a_layer,
         "is not a dconv model input group (its layer 'conv1' is not a dconv input group (it holds 'notes.txt'))"),
        (model_with_a_foreign_file_at_the_top, "is not a dconv model input group (it holds 'notes.txt')"),
        (zarr_group_of_someone_else,
         "is a Zarr group dconv did not write (it has no 'dconv_model' attribute), not a dconv model input group"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_overwrite_refuses_what_is_not_its_own_model_group(target, found, net, tmp_path):
    path = target(tmp_path, net)
    before = snapshot(path)
    with pytest.raises(InputError) as error:
        ModelWriter(path, net.specs, overwrite=True)
    message = str(error.value)
    assert message == (
        f"{str(path)!r} exists and {found}; refusing to overwrite it. Choose another path or remove it yourself."
    )
    assert snapshot(path) == before


def test_a_model_group_is_not_replaced_by_an_input_group(net, rng, tmp_path):
    path = tmp_path / "m.zarr"
    write(path, net)
    before = snapshot(path)
    with pytest.raises(InputError, match="exists and is a dconv model input group, not a dconv input group"):
        InputWriter(path, rng.standard_normal((1, 1, 2, 2)), overwrite=True)
    with pytest.raises(InputError, match="exists and is a dconv model input group, not a dconv input group"):
        make_inputs(str(path), m=2, height=4, width=4, in_channels=2, out_channels=2, overwrite=True)
    with pytest.raises(InputError, match="exists and is a dconv model input group, not a dconv output"):
        dconv.backward_job(plain_input_group(tmp_path, net), path, overwrite=True, scheduler="threads")
    assert snapshot(path) == before


def test_remove_own_keeps_a_file_put_in_meanwhile(net, tmp_path):
    """Between the check and the removal, a user's files may land in the group: they survive."""
    path = tmp_path / "m.zarr"
    write(path, net, indices=[np.arange(3)])
    (path / "layers" / "conv1" / "notes.txt").write_bytes(PRECIOUS)
    (path / "layers" / "notes.txt").write_bytes(PRECIOUS)
    remove_own(str(path), None, "model")
    assert snapshot(path) == {"layers/conv1/notes.txt": PRECIOUS, "layers/notes.txt": PRECIOUS}


def test_overwrite_on_a_url(net, rng):
    """The same rule through fsspec (memory://): the old layers go, a foreign object is refused."""
    url = f"memory://model-{rng.integers(1 << 30)}.zarr"
    write(url, net, sizes=(2,))
    assert is_model_group(url) and open_model_inputs(url).m == 2
    write(url, net, sizes=(5,), overwrite=True)
    assert open_model_inputs(url).m == 5
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url[len('memory://'):]}/layers/notes.txt", PRECIOUS)
    with pytest.raises(InputError, match="its layers/ holds 'notes.txt'"):
        ModelWriter(url, net.specs, overwrite=True)


# --------------------------------------------------------------------------- reading


def test_select_keeps_model_order(net, tmp_path):
    write(tmp_path / "m.zarr", net)
    model = open_model_inputs(tmp_path / "m.zarr")
    chosen = model.select(["attn.proj", "conv1"])
    assert chosen.names == ("conv1", "attn.proj")
    assert (chosen.m, chosen.location, chosen.sample_index) == (model.m, model.location, model.sample_index)
    assert model.select("attn.proj").layers == (ModelLayer("attn.proj", "linear", "layers/attn.proj"),)
    assert chosen.layer_url("attn.proj") == str(tmp_path / "m.zarr" / "layers" / "attn.proj")
    with pytest.raises(InputError, match="^select: 'conv2' is not a layer of '.*'; its layers are 'conv1', "
                                         "'block.0-fc', 'attn.proj'.$"):
        model.select(["conv1", "conv2"])
    with pytest.raises(InputError, match="^select needs at least one layer name"):
        model.select([])
    with pytest.raises(InputError, match="has no layer 'block.0-fc'; its layers are 'conv1', 'attn.proj'"):
        chosen.layer_url("block.0-fc")


def test_is_model_group(net, tmp_path):
    write(tmp_path / "m.zarr", net)
    (tmp_path / "file").write_bytes(PRECIOUS)
    assert is_model_group(tmp_path / "m.zarr")
    assert not is_model_group(tmp_path / "m.zarr" / "layers" / "conv1")  # a plain input group
    assert not is_model_group(tmp_path / "m.zarr" / "layers" / "conv1" / "A_prev")  # an array
    assert not is_model_group(tmp_path / "missing.zarr")
    assert not is_model_group(tmp_path / "file")
    assert not is_model_group(tmp_path)


def test_open_model_inputs_refuses(net, tmp_path):
    with pytest.raises(InputError, match="does not exist or is not a Zarr v3 group"):
        open_model_inputs(tmp_path / "missing.zarr")
    path = tmp_path / "m.zarr"
    write(path, net, sizes=(3,), indices=[np.arange(3)])
    with pytest.raises(InputError, match="is a dconv input group .one layer., not a model input group; open it with "
                                         "dconv.store.open_inputs"):
        open_model_inputs(path / "layers" / "conv1")
    # one layer with more rows than the others
    A_prev = zarr.open_array(path / "layers" / "block.0-fc" / "A_prev", mode="a")
    dZ = zarr.open_array(path / "layers" / "block.0-fc" / "dZ", mode="a")
    A_prev.append(A_prev[:1]), dZ.append(dZ[:1])
    with pytest.raises(InputError, match="must all have the same m; got conv1: 3, block.0-fc: 4, attn.proj: 3.$"):
        open_model_inputs(path)
    A_prev.resize((3, *A_prev.shape[1:]))
    with pytest.raises(InputError, match="got conv1: 3, block.0-fc: A_prev 3, dZ 4, attn.proj: 3.$"):
        open_model_inputs(path)
    dZ.resize((3, *dZ.shape[1:]))
    assert open_model_inputs(path).m == 3
    zarr.open_array(path / "sample_index", mode="a").resize((2,))
    with pytest.raises(InputError, match=r"^sample_index of '.*' must be int64 of shape \(3,\); got int64 \(2,\)"):
        open_model_inputs(path)
    remove_own(str(path / "layers" / "attn.proj"), None, "input")
    with pytest.raises(InputError, match="^layer 'attn.proj' of '.*m.zarr': input store '.*attn.proj' does not exist"):
        open_model_inputs(path)


def test_an_unreadable_marker_is_refused(net, tmp_path):
    path = tmp_path / "m.zarr"
    write(path, net)
    group = zarr.open_group(path, mode="a")
    marker = dict(group.attrs[MODEL_MARKER])
    group.attrs[MODEL_MARKER] = {**marker, "layers": [{**marker["layers"][0], "path": "elsewhere/conv1"}]}
    with pytest.raises(InputError, match="attribute dconv cannot read: layer 'conv1' must have .* path 'layers/conv1'"):
        open_model_inputs(path)
    with pytest.raises(InputError, match="exists and is a dconv model input group whose 'dconv_model' attribute"):
        ModelWriter(path, net.specs, overwrite=True)
    group.attrs[MODEL_MARKER] = {**marker, "sample_index": "random"}
    with pytest.raises(InputError, match="'sample_index' must be 'appended' or 'given'; got 'random'"):
        open_model_inputs(path)


def test_exported_from_dconv():
    for name in ("ModelWriter", "LayerSpec", "open_model_inputs", "is_model_group", "capture"):
        assert name in dconv.__all__ and getattr(dconv, name) is not None
    assert dconv.ModelWriter is ModelWriter and dconv.LayerSpec is LayerSpec

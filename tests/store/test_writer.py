"""dconv.store.writer: input groups appended a batch at a time (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import dconv
from dconv import InputDtypeError, InputError
from dconv.store import DIMENSIONS, compressor, make_inputs, open_inputs, store_exists
from dconv.store.writer import CHUNK_BYTES, DEFAULT_CHUNK, InputWriter, default_chunk, torch_conv_params

from _pipeline import CONVS, assert_matches, kernel_gradients, read_output


def layer_arrays(rng, conv, m, dtype, c_prev=3, c_out=4):
    """Seeded A_prev (m, H, W, C_prev), dZ of the matching output shape, W and b for ``conv``."""
    params = dconv.ConvParams.parse(**conv.params)
    w_shape = (*conv.kernel, c_prev, c_out)
    a_shape = (m, conv.height, conv.width, c_prev)
    z_shape = (m, *params.resolve(a_shape[1:3], conv.kernel).out_hw, c_out)
    return (
        rng.standard_normal(a_shape).astype(dtype),
        rng.standard_normal(z_shape).astype(dtype),
        rng.standard_normal(w_shape).astype(dtype),
        rng.standard_normal(c_out).astype(dtype),
    )


def append_in_batches(writer, A_prev, dZ, sizes):
    """Append ``A_prev`` and ``dZ`` in consecutive batches of ``sizes``, each an NCHW array's NHWC view."""
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        nchw = [np.ascontiguousarray(x[rows].transpose(0, 3, 1, 2)) for x in (A_prev, dZ)]
        writer.append(*(x.transpose(0, 2, 3, 1) for x in nchw))  # strided views, as torch's permute gives
        for x in nchw:
            x[...] = np.nan  # the writer copied the batch: changing the source afterwards changes nothing
        start += size
    assert start == len(A_prev)


@pytest.mark.parametrize(
    "conv_id, dtype", [("same_stride2", "float32"), ("asymmetric_pad", "float64"), ("dilation2", "float64")]
)
def test_uneven_batches_round_trip(conv_id, dtype, rng, tmp_path):
    """Batches of 5, 3, 11, 1, 9 rows land in chunks of 8; the job equals the kernel on the whole arrays."""
    conv = CONVS[conv_id]
    A_prev, dZ, W, b = layer_arrays(rng, conv, 29, dtype)
    path = tmp_path / "in.zarr"
    with InputWriter(path, W, b, chunk=8, **conv.params) as writer:
        append_in_batches(writer, A_prev, dZ, (5, 3, 11, 1, 9))
        assert writer.m == 29
    group = zarr.open_group(str(path), mode="r")
    assert dict(group.attrs)["hparameters"] == dconv.ConvParams.parse(**conv.params).to_hparameters()
    stored = {"A_prev": (A_prev, 8), "dZ": (dZ, 8), "W": (W, W.shape[0]), "b": (b.reshape(1, 1, 1, -1), 1)}
    for name, (want, chunks) in stored.items():
        array = group[name]
        assert (array.dtype, array.chunks[0]) == (np.dtype(dtype), chunks), name
        assert tuple(array.metadata.dimension_names) == DIMENSIONS[name]
        assert array.compressors == (compressor(dtype),)
        np.testing.assert_array_equal(array[...], want, err_msg=name)
    assert group["A_prev"].nchunks_initialized == 4  # 8 + 8 + 8 + 5: every chunk written once
    out = tmp_path / "out.zarr"
    dconv.backward_job(path, out, batch_chunk=16, scheduler="threads")
    expected = kernel_gradients({"A_prev": A_prev, "dZ": dZ, "W": W}, **conv.params)
    assert_matches(read_output(out), expected, dtype)


def test_layout_matches_make_inputs(tmp_path):
    """A group written in batches has the metadata of the one make_inputs writes."""
    made = make_inputs(
        str(tmp_path / "made.zarr"), m=12, height=6, width=5, kernel=(3, 2), stride=2, padding=1, chunk=5
    )
    source = open_inputs(made)
    path = tmp_path / "written.zarr"
    with InputWriter(path, source.W[...], source.b[...], stride=2, padding=1, chunk=5) as writer:
        writer.append(source.A_prev[:7], source.dZ[:7])
        writer.append(source.A_prev[7:], source.dZ[7:])
    written = open_inputs(str(path))
    assert written.hparameters == source.hparameters
    for name in ("A_prev", "dZ", "W", "b"):
        ours, theirs = getattr(written, name), getattr(source, name)
        assert ours.metadata.to_dict() == theirs.metadata.to_dict(), name
        np.testing.assert_array_equal(ours[...], theirs[...])


@pytest.mark.parametrize("sizes, chunks", [((3, 4), 7), ((8, 8), 8), ((16, 1), 8)])
def test_chunk_along_m(sizes, chunks, rng, tmp_path):
    """Fewer rows than a chunk in all: the chunk is the array; otherwise the given chunk, with a partial last one."""
    A_prev, dZ, W, _ = layer_arrays(rng, CONVS["pad1"], sum(sizes), "float64")
    with InputWriter(tmp_path / "in.zarr", W, padding=1, chunk=8) as writer:
        append_in_batches(writer, A_prev, dZ, sizes)
    group = open_inputs(str(tmp_path / "in.zarr"))
    assert group.b is None
    assert group.A_prev.shape[0] == sum(sizes) and group.A_prev.chunks[0] == group.dZ.chunks[0] == chunks
    np.testing.assert_array_equal(group.dZ[...], dZ)


def test_default_chunk():
    assert DEFAULT_CHUNK == 256 and default_chunk(1) == 256
    assert default_chunk(CHUNK_BYTES // 256) == 256
    assert default_chunk(CHUNK_BYTES // 256 + 1) == 128
    assert default_chunk(2**20) == 64  # e.g. 64x64x32 float64 samples: 64 MiB chunks
    assert default_chunk(CHUNK_BYTES * 3) == 1


def test_default_chunk_from_first_batch(rng, tmp_path):
    A_prev, dZ, W, _ = layer_arrays(rng, CONVS["pad1"], 3, "float32")
    writer = InputWriter(tmp_path / "in.zarr", W, padding=1)
    assert writer.chunk is None
    writer.append(A_prev, dZ)
    assert writer.chunk == default_chunk(A_prev[0].nbytes + dZ[0].nbytes) == 256
    assert writer.close() == str(tmp_path / "in.zarr")
    assert writer.close() == str(tmp_path / "in.zarr")  # closing twice does nothing
    assert open_inputs(str(tmp_path / "in.zarr")).A_prev.chunks[0] == 3


@pytest.fixture
def writer(rng, tmp_path):
    """An open float64 writer for CONVS["pad1"] (8x8x3 -> 8x8x4), chunk 4, with one batch of 5 appended."""
    A_prev, dZ, W, b = layer_arrays(rng, CONVS["pad1"], 5, "float64")
    writer = InputWriter(tmp_path / "in.zarr", W, b, padding=1, chunk=4)
    writer.append(A_prev, dZ)
    return writer


def batch(m=2, a_hw=(8, 8), z_hw=(8, 8), c_prev=3, c_out=4, a_dtype="float64", z_dtype="float64"):
    return np.zeros((m, *a_hw, c_prev), a_dtype), np.zeros((m, *z_hw, c_out), z_dtype)


@pytest.mark.parametrize(
    "arrays, error, message",
    [
        (
            batch(a_hw=(9, 8), z_hw=(9, 8)),
            InputError,
            r"^A_prev samples must have shape \(8, 8, 3\), as in the first batch; got \(9, 8, 3\)",
        ),
        (batch(a_dtype="float32"), InputDtypeError, "^A_prev must have dtype float64, as in the first batch"),
        (batch(z_dtype="float32"), InputDtypeError, r"^dZ must have dtype float64, as in the first batch; got float32"),
        (batch(z_dtype="int64"), InputDtypeError, r"^dZ must have dtype float32 or float64; got int64"),
        (batch(z_hw=(7, 8)), InputError, r"^dZ has shape \(2, 7, 8, 4\); .* give \(2, 8, 8, 4\)"),
        (batch(c_prev=2), InputError, r"^W has 3 input channels"),
        ((batch(m=3)[0], batch(m=2)[1]), InputError, r"^dZ has batch size 2 .* but A_prev has 3"),
    ],
    ids=["sample_shape", "A_prev_dtype", "dZ_dtype", "int", "dZ_shape", "channels", "batch_sizes"],
)
def test_bad_batch_is_refused_and_leaves_the_writer_usable(writer, arrays, error, message):
    with pytest.raises(error, match=message):
        writer.append(*arrays)
    writer.append(*batch(m=2))
    writer.close()
    group = open_inputs(writer.url)
    assert writer.m == group.A_prev.shape[0] == group.dZ.shape[0] == 7


def test_append_after_close_and_close_without_batches(writer, rng, tmp_path):
    writer.close()
    with pytest.raises(InputError, match="^append: the writer of .* is closed"):
        writer.append(*batch())
    empty = InputWriter(tmp_path / "empty.zarr", rng.standard_normal((3, 3, 3, 4)))
    with pytest.raises(InputError, match="got no batch: append at least one"):
        empty.close()


def test_error_in_with_block_keeps_earlier_batches(rng, tmp_path):
    """The rows appended before an exception are written; the exception is the caller's, unchanged."""
    A_prev, dZ, W, _ = layer_arrays(rng, CONVS["pad1"], 6, "float64")
    with pytest.raises(KeyError, match="the caller's"):
        with InputWriter(tmp_path / "in.zarr", W, padding=1, chunk=4) as writer:
            writer.append(A_prev, dZ)
            raise KeyError("the caller's")
    group = open_inputs(str(tmp_path / "in.zarr"))
    np.testing.assert_array_equal(group.A_prev[...], A_prev)
    with pytest.raises(InputError, match="is closed"):
        writer.append(A_prev, dZ)


def test_refuses_to_overwrite(rng, tmp_path):
    path = tmp_path / "in.zarr"
    W = rng.standard_normal((3, 3, 3, 4))
    with InputWriter(path, W, padding=1) as writer:
        writer.append(*batch())
    with pytest.raises(InputError, match="already exists; pass overwrite"):
        InputWriter(path, W * 2)
    np.testing.assert_array_equal(open_inputs(str(path)).W[...], W)
    with InputWriter(path, W * 2, padding=1, overwrite=True) as writer:
        writer.append(*batch(m=1))
    replaced = open_inputs(str(path))
    assert replaced.A_prev.shape[0] == 1 and replaced.b is None
    np.testing.assert_array_equal(replaced.W[...], W * 2)


@pytest.mark.parametrize(
    "W, b, kwargs, error, message",
    [
        (np.zeros((3, 3, 4)), None, {}, InputError, r"^W must be 4-D \(fh, fw, C_prev, C\)"),
        (np.zeros((3, 3, 2, 4), np.float16), None, {}, InputDtypeError, "^W must have dtype float32 or float64"),
        (np.zeros((3, 3, 2, 4)), np.zeros(3), {}, InputError, r"^b must have shape \(4,\) or \(1, 1, 1, 4\) .* \(3,\)"),
        (np.zeros((3, 3, 2, 4)), np.zeros(4, int), {}, InputDtypeError, "^b must have dtype float32 or float64"),
        (np.zeros((3, 3, 2, 4)), None, {"chunk": 0}, InputError, "^chunk must be a whole number >= 1; got 0"),
        (np.zeros((3, 3, 2, 4)), None, {"stride": 0}, InputError, "^stride must be >= 1"),
    ],
)
def test_bad_writer_arguments(W, b, kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        InputWriter(tmp_path / "in.zarr", W, b, **kwargs)
    assert not store_exists(str(tmp_path / "in.zarr"))


@pytest.mark.parametrize(
    "stride, padding, dilation, expected",
    [
        ((1, 1), (1, 1), (1, 1), {"stride": (1, 1), "padding": ((1, 1), (1, 1)), "dilation": (1, 1)}),
        ((2, 1), (0, 2), (1, 2), {"stride": (2, 1), "padding": ((0, 0), (2, 2)), "dilation": (1, 2)}),
        (2, 1, 1, {"stride": (2, 2), "padding": ((1, 1), (1, 1)), "dilation": (1, 1)}),
        ((1, 1), "same", (2, 2), {"stride": (1, 1), "padding": "same", "dilation": (2, 2)}),
        ((3, 3), "valid", (1, 1), {"stride": (3, 3), "padding": ((0, 0), (0, 0)), "dilation": (1, 1)}),
    ],
)
def test_torch_conv_params(stride, padding, dilation, expected):
    assert torch_conv_params(stride, padding, dilation) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": 2}, "^groups must be 1 .* got 2 instead"),
        ({"padding_mode": "reflect"}, "^padding_mode must be 'zeros' .* got 'reflect' instead"),
        ({"stride": (2, 2), "padding": "same"}, "^padding 'same' needs stride 1 in PyTorch; got stride"),
    ],
)
def test_torch_conv_params_refuses(kwargs, message):
    values = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), **kwargs}
    with pytest.raises(InputError, match=message):
        torch_conv_params(values.pop("stride"), values.pop("padding"), values.pop("dilation"), **values)

"""dconv.spec: pipeline specs are TOML data, checked key by key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dconv import InputError
from dconv.cluster import ClusterOptions
from dconv.options import InputRecipe, JobOptions
from dconv.spec import PipelineSpec, load_spec, parse_spec

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"

FULL = """
[input]
path = "data/in.zarr"

[input.make]
m = 40
kernel = [3, 2]
padding = [1, 2, 0, 1]
dtype = "float64"
chunk = 7

[output]
path = "out/result.zarr"
overwrite = true

[conv]
stride = [2, 1]
padding = "same"
dilation = 2

[job]
batch_chunk = 5
split_every = 3
check_finite = true

[cluster]
scheduler = "tcp://127.0.0.1:8786"

[storage]
anon = false
client_kwargs = { region_name = "eu-west-1" }
"""

MINIMAL = {"input": {"path": "in.zarr"}, "output": {"path": "out.zarr"}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_full_spec(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    assert isinstance(spec, PipelineSpec)
    assert spec.inputs == "data/in.zarr"
    assert spec.make == InputRecipe(m=40, kernel=(3, 2), padding=((1, 2), (0, 1)), dtype="float64", chunk=7)
    assert spec.out == "out/result.zarr"
    assert spec.options == JobOptions(
        stride=(2, 1), padding="same", dilation=2, batch_chunk=5, split_every=3, check_finite=True, overwrite=True
    )
    assert spec.cluster == ClusterOptions(scheduler="tcp://127.0.0.1:8786")
    assert spec.storage == {"anon": False, "client_kwargs": {"region_name": "eu-west-1"}}


def test_a_scheduler_file_is_kept_as_written(tmp_path):
    """`[cluster] scheduler_file`: a relative path stays relative, to the directory dconv runs in, as `[input] path`."""
    spec = load_spec(write(tmp_path, """
        [input]
        path = "in.zarr"
        [output]
        path = "out.zarr"
        [cluster]
        scheduler_file = "run/scheduler.json"
    """))
    assert spec.cluster == ClusterOptions(scheduler_file="run/scheduler.json")
    assert not spec.cluster.embedded


def test_minimal_spec_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.make is None
    assert spec.options == JobOptions()  # the defaults, declared once in JobOptions
    assert (spec.options.stride, spec.options.padding, spec.options.dilation) == (None, None, None)  # hparameters
    assert spec.cluster == ClusterOptions()
    assert spec.storage == {}


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_pipeline_specs_parse(path):
    spec = load_spec(path)
    assert spec.inputs and spec.out


@pytest.mark.parametrize(
    "document, message",
    [
        ({**MINIMAL, "job": {"batch_chunks": 4}}, "unknown key 'batch_chunks' in [job]; known keys: layers, batch_chunk, "
                                                   "max_memory, split_every, check_finite, simd, dA_prev, stats, dot, sketch, "
                                                   "sketch_kind, sketch_seed, sketch_like, sketch_dtype. Did you mean 'batch_chunk'?"),
        ({**MINIMAL, "job": {"split_evry": 4}}, "Did you mean 'split_every'?"),
        ({**MINIMAL, "output": {"path": "o", "overwrit": True}}, "Did you mean 'overwrite'?"),
        ({**MINIMAL, "conv": {"strides": 2}}, "Did you mean 'stride'?"),
        ({**MINIMAL, "cluster": {"worker": 2}}, "Did you mean 'workers'?"),
        ({"input": {"path": "i", "make": {"m": 4, "in_channel": 3}}, "output": {"path": "o"}},
         "unknown key 'in_channel' in [input.make]"),
        ({"input": {"path": "i", "make": {"m": 4, "in_channel": 3}}, "output": {"path": "o"}},
         "Did you mean 'in_channels'?"),
        ({**MINIMAL, "jobs": {}}, "unknown table [jobs] in spec; known tables: input, output, conv, job, cluster, "
                                  "storage. Did you mean 'job'?"),
        ({**MINIMAL, "clustr": {}}, "Did you mean 'cluster'?"),
    ],
)
def test_unknown_keys_suggest_the_close_match(document, message):
    with pytest.raises(InputError) as info:
        parse_spec(document)
    assert message in str(info.value)


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    with pytest.raises(InputError) as info:
        parse_spec({**MINIMAL, "job": {"zzz": 1}})
    assert "known keys: layers, batch_chunk, max_memory, split_every, check_finite, simd" in str(info.value)
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "document, message",
    [
        ({**MINIMAL, "job": {"batch_chunk": "64"}}, "job.batch_chunk must be an integer; got '64' instead."),
        ({**MINIMAL, "job": {"batch_chunk": 6.5}}, "job.batch_chunk must be an integer"),
        ({**MINIMAL, "job": {"batch_chunk": True}}, "job.batch_chunk must be an integer; got True"),
        ({**MINIMAL, "job": {"check_finite": 1}}, "job.check_finite must be true or false; got 1"),
        ({**MINIMAL, "output": {"path": "o", "overwrite": "yes"}}, "output.overwrite must be true or false"),
        ({**MINIMAL, "output": {"path": 3}}, "output.path must be a string"),
        ({**MINIMAL, "conv": {"padding": 1.5}}, "conv.padding must be an integer or a string or a list"),
        ({**MINIMAL, "conv": {"stride": "2"}}, "conv.stride must be an integer or a list"),
        ({**MINIMAL, "cluster": {"workers": "2"}}, "cluster.workers must be an integer"),
        ({**MINIMAL, "job": 5}, "[job] must be a table; got 5 instead."),
        ({**MINIMAL, "storage": "anon"}, "[storage] must be a table of fsspec options"),
        ({"input": {"path": "i", "make": 3}, "output": {"path": "o"}}, "[input.make] must be a table; got 3 instead."),
        ({"input": {"path": "i", "make": {"m": "4"}}, "output": {"path": "o"}}, "input.make.m must be an integer"),
    ],
)
def test_wrong_types(document, message):
    with pytest.raises(InputError) as info:
        parse_spec(document)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"output": {"path": "o"}}, "spec is missing the table(s) [input]."),
        ({}, "spec is missing the table(s) [input], [output]."),
        ({"input": {}, "output": {"path": "o"}}, "[input] is missing 'path'."),
        ({"input": {"path": "i"}, "output": {"overwrite": True}}, "[output] is missing 'path'."),
        ({"input": {"path": "i", "make": {"height": 4}}, "output": {"path": "o"}}, "[input.make] is missing 'm'."),
    ],
)
def test_missing_required_keys(document, message):
    with pytest.raises(InputError) as info:
        parse_spec(document)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "document, message",
    [
        ({**MINIMAL, "job": {"split_every": 1}}, "split_every must be an int >= 2; got 1 instead."),
        ({**MINIMAL, "job": {"max_memory": "lots"}}, "max_memory must be a size such as 512MiB"),
        ({**MINIMAL, "conv": {"padding": "full"}}, "padding must be an int, a pair"),
        ({**MINIMAL, "cluster": {"workers": 2, "scheduler": "tcp://h:1"}}, "give either workers"),
        ({**MINIMAL, "cluster": {"scheduler": "tcp://h:1", "scheduler_file": "s.json"}},
         "only one; got scheduler and scheduler_file"),
        ({**MINIMAL, "cluster": {"scheduler_file": ""}}, "scheduler_file must be a non-empty string; got ''"),
        ({"input": {"path": "i"}, "output": {"path": "o", "overwrite": True, "resume": True}}, "not both"),
        ({"input": {"path": "i", "make": {"m": 0}}, "output": {"path": "o"}}, "m must be an int >= 1; got 0"),
    ],
)
def test_values_are_validated_by_the_options_objects(document, message):
    """The spec checks types; each value is then checked by the same options object the CLI and API build."""
    with pytest.raises(InputError) as info:
        parse_spec(document)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read spec file .*nope.toml"):
        load_spec(tmp_path / "nope.toml")


def test_directory_is_not_a_spec(tmp_path):
    with pytest.raises(InputError, match="cannot read spec file"):
        load_spec(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_bytes(b'[input]\npath = "\xff\xfe"\n')
    with pytest.raises(InputError, match="cannot read spec file"):
        load_spec(path)


@pytest.mark.parametrize(
    "text",
    [
        "[input\npath = 'x'\n",  # unclosed table header
        "[input]\npath = x.zarr\n",  # bare string
        "[input]\npath = 'a'\npath = 'b'\n",  # duplicate key
        "[job]\nbatch_chunk = 4\n[job]\nsplit_every = 2\n",  # duplicate table
    ],
)
def test_invalid_toml(tmp_path, text):
    with pytest.raises(InputError, match=r"spec file .*spec.toml' is not valid TOML"):
        load_spec(write(tmp_path, text))


def test_a_spec_is_data_not_code(tmp_path):
    """Nothing in a spec is evaluated: a string that looks like code stays a string."""
    spec = load_spec(write(tmp_path, """
        [input]
        path = "__import__('os').system('false')"
        [output]
        path = "out.zarr"
    """))
    assert spec.inputs == "__import__('os').system('false')"


def test_a_missing_relative_input_path_names_the_spec_and_the_directory(tmp_path, monkeypatch):
    """Relative paths resolve against the directory dconv runs in; run from elsewhere, the error says so."""
    (tmp_path / "project").mkdir()
    spec = write(tmp_path / "project", """
        [input]
        path = "data/sample.zarr"
        [output]
        path = "out.zarr"
    """)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_spec(spec)  # loading checks the spec itself, not the stores it names
    with pytest.raises(InputError) as info:
        loaded.check_input()
    message = str(info.value)
    assert "[input] path 'data/sample.zarr' of spec" in message and str(spec) in message
    assert f"resolved against the directory dconv runs in, {tmp_path / 'elsewhere'}" in message
    assert f"the spec is in {tmp_path / 'project'}" in message
    (tmp_path / "elsewhere" / "data" / "sample.zarr").mkdir(parents=True)
    load_spec(spec).check_input()  # found from the right directory: no error

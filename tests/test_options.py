"""dconv.options: each field declared once, validated once, and what an output records of it, round-tripped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import dconv
from dconv import InputError
from dconv.options import JobOptions


@pytest.mark.parametrize("value, expected", [(2, 2), (np.int32(5), 5), (64, 64)])
def test_split_every_is_normalised_once_in_the_options(value, expected):
    result = JobOptions(split_every=value).split_every
    assert result == expected and type(result) is int
    assert JobOptions().split_every == 8


@pytest.mark.parametrize("value", [1, 0, -3, 2.0, True, "8", None])
def test_split_every_rejects(value):
    with pytest.raises(InputError, match="split_every must be an int >= 2"):
        JobOptions(split_every=value)


def test_the_cluster_a_job_ran_on_is_recorded_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    place = dconv.ClusterOptions(scheduler_file="sf.json").recorded_place()
    assert place == {"scheduler_file": str(tmp_path / "sf.json")}
    assert dconv.ClusterOptions(workers=2).recorded_place() == {"workers": 2}
    assert dconv.ClusterOptions.from_dict(place).flags() == ["--scheduler-file", str(tmp_path / "sf.json")]


def test_options_round_trip_through_what_an_output_records():
    options = dconv.JobOptions(
        stride=(2, 1), padding=((1, 0), (2, 2)), dilation=2, batch_chunk=7, split_every=3, stats=True,
        dA_prev=False, check_finite=True, keep_partials=True, simd="avx2",
    )
    recorded = options.to_dict()
    assert recorded["params"] == {"stride": [2, 1], "padding": [[1, 0], [2, 2]], "dilation": [2, 2]}
    assert recorded["per_sample_stats"] is True and recorded["simd"] == {"requested": "avx2"}
    assert dconv.JobOptions.from_dict(recorded) == dataclass_without(options, "max_memory", "overwrite", "resume")
    assert dconv.JobOptions().to_dict() == {"split_every": 8}  # on/off options at their defaults are left out


def dataclass_without(options, *names):
    return dataclasses.replace(options, **{name: dconv.JobOptions().__getattribute__(name) for name in names})

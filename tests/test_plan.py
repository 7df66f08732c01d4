"""dconv.plan before a job runs: plan_recipe (what make-inputs would write, planned without writing),
how each input is read, and the plain progress lines that replace tqdm's bar when the stream is not a
terminal."""

from __future__ import annotations

import re
from pathlib import Path

import dask
import pytest
from dask.utils import format_bytes

from dconv import InputError
from dconv.options import InputRecipe
from dconv.plan import plan_job, plan_recipe
from dconv.store import make_inputs


# --------------------------------------------------------------------------- plan_recipe


def test_plan_recipe_writes_nothing_and_plans_what_make_inputs_would_write(tmp_path):
    recipe = InputRecipe(m=40, height=8, width=8, in_channels=3, out_channels=4, chunk=16, dtype="float64")
    inputs, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    planned = plan_recipe(recipe, inputs, out, batch_chunk=8)
    assert list(tmp_path.iterdir()) == []
    text = planned.describe()
    assert text.startswith(f"input   {inputs} does not exist yet; the run would first make it: m=40, 8x8x3 -> 4")
    assert "chunks  5 of up to 8 samples (m = 40)" in text and "disk    input " in text
    with pytest.raises(InputError, match="does not exist yet"):
        planned.open_output()
    assert list(tmp_path.iterdir()) == []

    make_inputs(str(inputs), recipe)
    real = plan_job(inputs, out, batch_chunk=8)
    assert real.describe().splitlines()[1:] == text.splitlines()[1:]
    assert real.warnings(2, 1, cores=2) == planned.warnings(2, 1, cores=2) != []  # 8 cuts chunks of 16
    assert (real.task_memory(), real.disk_bytes()) == (planned.task_memory(), planned.disk_bytes())


def test_the_large_batch_spec_reads_whole_chunks_and_its_comment_gives_the_plan_s_figures(tmp_path):
    """pipelines/large-batch.toml, planned from its recipe: no warning, and the bound its comment quotes."""
    from dconv.spec import load_spec

    path = Path(__file__).parents[1] / "pipelines" / "large-batch.toml"
    spec, comment = load_spec(path), path.read_text()
    plan = plan_recipe(spec.make, tmp_path / "in.zarr", tmp_path / "out.zarr", spec.options)
    assert plan.warnings(2, 1, cores=2) == []
    assert f"each holding at most about {format_bytes(plan.task_memory())}" in comment.replace("\n# ", " ")
    recipe = InputRecipe.build(spec.make, chunk=1024)
    cut = plan_recipe(recipe, tmp_path / "in.zarr", tmp_path / "out.zarr", spec.options)
    (line,) = cut.warnings(2, 1, cores=2)
    assert "decode each input chunk 4 times" in line and line.endswith("or input chunks of 256 (or a divisor)")
    assert f"hold it whole: {format_bytes(cut.task_memory())} per task" in comment.replace("\n# ", " ")
    assert list(tmp_path.iterdir()) == []


def test_the_plan_knows_how_each_input_is_read(make_input, tmp_path):
    plan = plan_job(make_input(m=40, chunk=4, padding=1), tmp_path / "out.zarr", batch_chunk=4)
    assert plan.input_reads == {"A_prev": "blosc/mapped", "dZ": "blosc/mapped"}

"""dconv.simd: DCONV_SIMD words, resolving them against the levels a machine runs, and the
process's level (set_level, use_level, level_report). The levels are monkeypatched, so every
branch runs on any CPU; one test reads the real extension's levels."""

from __future__ import annotations

import pytest

import dconv
from dconv import InputError, SimdLevelError, simd

MACHINE = ["avx2", "baseline"]  # what these tests pretend the CPU runs


@pytest.fixture
def machine(monkeypatch):
    """This process runs avx2 and baseline, its level is not resolved yet, and DCONV_SIMD is unset."""
    monkeypatch.setattr(simd, "simd_levels", lambda: list(MACHINE))
    monkeypatch.setattr(simd, "_active", None)  # restored after the test
    monkeypatch.delenv(simd.ENV_VAR, raising=False)


@pytest.mark.parametrize(
    "word, level",
    [(None, "avx2"), ("", "avx2"), ("auto", "avx2"), (" AUTO ", "avx2"), ("avx2", "avx2"),
     ("Baseline", "baseline"), ("numpy", "numpy")],
)
def test_resolve_level(machine, word, level):
    assert simd.resolve_level(word) == level


@pytest.mark.parametrize("word", ["sse2", "avx-512", "native", "1"])
def test_an_unknown_word_is_refused_in_one_line(machine, word):
    with pytest.raises(SimdLevelError) as info:
        simd.resolve_level(word)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)
    assert "\n" not in message
    assert message == f"DCONV_SIMD must be one of auto, avx512, avx2, neon, baseline, numpy; got {word!r} instead."
    with pytest.raises(SimdLevelError, match="must be one of"):
        simd.parse_word(word)


@pytest.mark.parametrize("word", ["avx512", "neon"])
def test_a_level_this_cpu_lacks_is_refused_naming_what_it_runs(machine, word):
    assert simd.parse_word(word) == word  # a known word: a worker elsewhere may run it
    with pytest.raises(SimdLevelError) as info:
        simd.resolve_level(word)
    assert str(info.value) == f"DCONV_SIMD={word}: this CPU lacks it; this machine runs avx2, baseline, numpy."


def test_without_the_extension_auto_is_numpy(monkeypatch):
    monkeypatch.setattr(simd, "_flatconv", None)
    assert simd.simd_levels() == []
    assert simd.resolve_level("auto") == "numpy"
    with pytest.raises(SimdLevelError, match=r"^DCONV_SIMD=baseline: the compiled loops were not built; this machine runs numpy\.$"):
        simd.resolve_level("baseline")


def test_active_level_resolves_the_environment_once(machine, monkeypatch):
    monkeypatch.setenv(simd.ENV_VAR, "baseline")
    assert simd.active_level() == "baseline"
    monkeypatch.setenv(simd.ENV_VAR, "numpy")
    assert simd.active_level() == "baseline"  # resolved at first use, not at every call


def test_set_level(machine, monkeypatch):
    assert simd.set_level("numpy") == "numpy" and simd.active_level() == "numpy"
    with pytest.raises(SimdLevelError, match="this CPU lacks it"):
        simd.set_level("avx512")
    assert simd.active_level() == "numpy"  # a refused level changes nothing
    monkeypatch.setenv(simd.ENV_VAR, "baseline")
    assert simd.set_level(None) == "baseline"  # back to DCONV_SIMD


def test_use_level_makes_the_jobs_word_win_over_this_processes_environment(machine, monkeypatch):
    """A worker whose own DCONV_SIMD is bad still runs the level its job asks for."""
    monkeypatch.setenv(simd.ENV_VAR, "bogus")
    assert simd.use_level("baseline") == "baseline" and simd.active_level() == "baseline"
    assert simd.use_level("auto") == "avx2"
    with pytest.raises(SimdLevelError, match="avx512: this CPU lacks it"):
        simd.use_level("avx512")
    assert simd.active_level() == "avx2"


def test_level_report(machine):
    assert simd.level_report("auto") == {"runs": ["avx2", "baseline", "numpy"], "level": "avx2", "error": None}
    refused = simd.level_report("avx512")
    assert refused["level"] is None and refused["runs"] == ["avx2", "baseline", "numpy"]
    assert refused["error"] == "DCONV_SIMD=avx512: this CPU lacks it; this machine runs avx2, baseline, numpy."


def test_the_extension_lists_known_levels_best_first():
    if simd._flatconv is None:
        pytest.skip("the compiled loops were not built")
    levels = dconv.simd_levels()
    assert levels and set(levels) <= set(simd.LEVELS)
    assert levels == sorted(levels, key=simd.LEVELS.index)
    assert simd.resolve_level("auto") == levels[0]


# --------------------------------------------------------------------------- a source tree without the loops

IMPORT_FROM_THE_TREE = (
    # an editable install's finder would hand the tree the installed compiled module: leave it out, as in
    # a clone whose package is installed elsewhere (or not at all)
    "import sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]; "
    "import dconv, dconv.simd, dconv.kernel; print(dconv.__file__)"
)


def _source_tree(tmp_path, with_loops: bool):
    """A copy of the package's source files (and, ``with_loops``, of its compiled module) under ``tmp_path``."""
    import shutil
    from pathlib import Path

    package = Path(dconv.__file__).resolve().parent
    skip = () if with_loops else ("*.so", "*.pyd")
    shutil.copytree(package, tmp_path / "dconv", ignore=shutil.ignore_patterns("__pycache__", *skip))
    return tmp_path


@pytest.mark.parametrize("with_loops, simd_word, lines", [(False, None, 1), (False, "numpy", 0), (True, None, 0)])
def test_a_tree_without_the_loops_says_so_once(tmp_path, with_loops, simd_word, lines):
    """Importing dconv from a source tree without the compiled module prints one warning line on stderr,
    naming the tree and how to build it; with the module, or with DCONV_SIMD=numpy, nothing."""
    import os
    import subprocess
    import sys

    if not simd.simd_levels():
        pytest.skip("this install has no compiled loops to copy")
    tree = _source_tree(tmp_path, with_loops)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH", simd.ENV_VAR)}
    if simd_word is not None:
        env[simd.ENV_VAR] = simd_word
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_THE_TREE], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tree / "dconv" / "__init__.py")
    warned = [line for line in result.stderr.splitlines() if "compiled loops" in line]
    assert len(warned) == lines, result.stderr
    if lines:
        assert warned[0].startswith("dconv: warning: the kernel runs without its compiled loops")
        assert str(tree / "dconv") in warned[0] and ("pip install -e ." in warned[0] or "python -P" in warned[0])

"""The README's examples run as written: its shell commands and Python blocks, in order.

Every ```python, ```bash, ```sh and ```console block of README.md runs, except those in the
sections of ``SKIP_SECTIONS`` (the install commands, which ``.ci/run`` runs, and the ones that
need a cluster or an object store). Shell blocks run with ``bash -e`` and this environment's
``dconv`` first on PATH; a console block runs its ``$ `` lines. Each Python block is saved as a
file and run with this interpreter, as a user runs a script. Each block must exit 0 with no
traceback on stderr.

The sections of ``CHAINS`` use nothing the others write, so their blocks run (in order) in a
directory of their own, alongside the main chain (every other section, in order) in its own: a
block that needs a file another chain writes fails for want of it, every time. The chains write
no name in common, so the whole README still runs in order in one directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

# Headings (any level) whose blocks do not run here, with the reason.
SKIP_SECTIONS = {
    "Two commands": "creates a venv and installs dconv: .ci/run runs it",
    "On a cluster, with object storage": "needs a cluster, an object store and TLS material",
}
# Sections that must hold runnable blocks: a renamed heading cannot drop them silently.
EXPECTED_SECTIONS = {"The kernel", "The distributed job", "The output", "SIMD levels (`DCONV_SIMD`)"}
SHELLS = {"bash", "sh", "console"}
BLOCK_TIMEOUT = 300  # seconds, for one block on a loaded 2-core machine
# Sections whose blocks read only what earlier blocks of the same chain wrote; each chain runs
# concurrently with the others and with the main chain (every section not named here).
CHAINS = {
    "Gradient statistics (`--stats`) and jobs without dA_prev (`--no-dA-prev`)": "stats",
    "Per-sample inner products and sketches (`--dot`, `--sketch`)": "scores",
    "Scores: train samples against queries (`dconv score`)": "scores",
    "Whole models: every layer in one job": "model",
}
CONCURRENCY = 2  # chains at a time: each job of a chain starts a local cluster of one worker per core

FENCE = re.compile(r"^```(\S*)\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    section: str
    language: str
    line: int  # 1-based line of the opening fence
    code: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language} block in {self.section!r})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, in order, with the heading it sits under."""
    blocks: list[Block] = []
    section, language, start, lines = "", None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if language is None:
            if fence:
                language, start, lines = fence.group(1), number, []
            elif heading := HEADING.match(line):
                section = heading.group(1)
        elif fence and not fence.group(1):
            blocks.append(Block(section, language, start, "\n".join(lines) + "\n"))
            language = None
        else:
            lines.append(line)
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in SHELLS | {"python"} and b.section not in SKIP_SECTIONS]


def shell_script(block: Block) -> str:
    """The commands of a shell block: a console block's ``$ `` lines, else the whole block."""
    if block.language != "console":
        return block.code
    return "".join(line[2:] + "\n" for line in block.code.splitlines() if line.startswith("$ "))


def test_readme_selects_its_examples():
    blocks = readme_blocks(README.read_text())
    selected = runnable(blocks)
    assert EXPECTED_SECTIONS <= {b.section for b in selected}, [str(b) for b in selected]
    skipped = {b.section for b in blocks if b.section in SKIP_SECTIONS}
    assert skipped == set(SKIP_SECTIONS), f"no block under {set(SKIP_SECTIONS) - skipped}: update SKIP_SECTIONS"


def chains(blocks: list[Block]) -> dict[str, list[Block]]:
    """The runnable blocks by chain (``CHAINS``; "main" for every other section), each in README order."""
    grouped: dict[str, list[Block]] = {}
    for block in blocks:
        grouped.setdefault(CHAINS.get(block.section, "main"), []).append(block)
    return grouped


def test_readme_chains_name_its_sections():
    sections = {b.section for b in runnable(readme_blocks(README.read_text()))}
    assert set(CHAINS) <= sections, f"no runnable block under {set(CHAINS) - sections}: update CHAINS"


def run_chain(blocks: list[Block], cwd: Path, env: dict[str, str]) -> list[str]:
    """Run ``blocks`` in order in ``cwd``; the reports of those that failed (the chain stops at the first)."""
    cwd.mkdir()
    for block in blocks:
        if block.language == "python":
            script = cwd / f"readme_example_{block.line}.py"
            script.write_text(block.code)
            command = [sys.executable, script.name]
        else:
            command = ["bash", "-e", "-c", shell_script(block)]
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        report = f"{block}: exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        if result.returncode != 0 or "Traceback" in result.stderr:
            return [report]
        # the examples show jobs as they should be run
        if "dconv: warning:" in result.stderr:
            return [f"a warning on stderr: {report}"]
    return []


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_examples_run_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "dconv").exists(), f"expected the dconv command next to {sys.executable}; got none"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    grouped = chains(runnable(readme_blocks(README.read_text())))
    order = sorted(grouped, key=lambda name: name not in ("main", "scores"))  # the two longest first
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        failures = dict(zip(order, pool.map(lambda name: run_chain(grouped[name], tmp_path / name, env), order)))
    assert not any(failures.values()), "\n\n".join(report for reports in failures.values() for report in reports)
    # what each chain wrote: no name in common, so the README runs in order in one directory too
    written = {name: {p.name for p in (tmp_path / name).iterdir() if not p.name.startswith("readme_example_")}
               for name in grouped}
    for first in written:
        for second in written:
            if first < second:
                assert not written[first] & written[second], (first, second, written[first] & written[second])

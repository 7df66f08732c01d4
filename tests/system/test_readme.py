"""The README's examples run as written: its shell commands and Python blocks, in order, in one fresh directory.

Every ```python, ```bash, ```sh and ```console block of README.md runs, except those in the
sections of ``SKIP_SECTIONS`` (the install commands, which ``.ci/run`` runs, and the ones that
need a cluster or an object store). Shell blocks run with ``bash -e`` and this environment's
``dconv`` first on PATH; a console block runs its ``$ `` lines. Each Python block is saved as a
file and run with this interpreter, as a user runs a script. Each block must exit 0 with no
traceback on stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_examples_run_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "dconv").exists(), f"expected the dconv command next to {sys.executable}; got none"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for index, block in enumerate(runnable(readme_blocks(README.read_text()))):
        if block.language == "python":
            script = tmp_path / f"readme_example_{index}.py"
            script.write_text(block.code)
            command = [sys.executable, script.name]
        else:
            command = ["bash", "-e", "-c", shell_script(block)]
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
        )
        report = f"{block}: exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        assert result.returncode == 0, report
        assert "Traceback" not in result.stderr, report
        assert "dconv: warning:" not in result.stderr, report  # the examples show jobs as they should be run

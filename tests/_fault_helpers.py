"""Helpers shared by the fault-tolerance and bad-input tests (test_faults.py, test_catalogue.py).

Everything here drives dconv from the outside: the CLI in subprocesses (always
with a timeout), the output group read back with plain Zarr, and the files of a
store hashed so that a test can prove that nothing was touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from conftest import dconv_command

# Default timeout of one CLI subprocess (seconds): generous for a loaded 2-core machine.
CLI_TIMEOUT = 90


def run_cli(args: Sequence[Any], *, cwd: Any = None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """``dconv ARGS`` in a subprocess; text output captured; killed after ``timeout`` seconds."""
    return subprocess.run(
        dconv_command() + [str(a) for a in args],
        cwd=None if cwd is None else str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(result: subprocess.CompletedProcess) -> str:
    """Exit code and both streams, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def snapshot(path: Any) -> dict[str, str] | None:
    """``{relative path: sha256}`` of every file under ``path`` (directories as "<dir>"); None if absent."""
    root = Path(path)
    if not root.exists():
        return None
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    files: dict[str, str] = {}
    for item in sorted(root.rglob("*")):
        rel = str(item.relative_to(root))
        files[rel] = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "<dir>"
    return files


def status_of(out: Any) -> str | None:
    """The ``status`` in an output's ``dconv`` attribute; None if there is no readable dconv output."""
    try:
        attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    except Exception:
        return None
    provenance = attrs.get("dconv")
    return provenance.get("status") if isinstance(provenance, dict) else None


def provenance_of(out: Any) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs["dconv"])


def done_flags(out: Any) -> np.ndarray | None:
    """Which chunks are done (from the output's records), or None while the output does not exist yet."""
    from dconv.store import OutputStore

    try:
        return OutputStore(str(out)).done_chunks()
    except Exception:
        return None


def done_count(out: Any) -> int:
    flags = done_flags(out)
    return 0 if flags is None else int(flags.sum())


def read_arrays(out: Any, names: Sequence[str] = ("dA_prev", "dW", "db")) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(out), mode="r")
    return {name: np.asarray(group[name][...]) for name in names}


def assert_bitwise_equal(out: Any, reference: Any) -> None:
    """dA_prev, dW and db of two outputs have the same dtype, shape and bytes."""
    got, want = read_arrays(out), read_arrays(reference)
    for name in want:
        assert got[name].dtype == want[name].dtype, (name, got[name].dtype, want[name].dtype)
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        if got[name].tobytes() != want[name].tobytes():
            differ = int(np.count_nonzero(got[name].view(np.uint8) != want[name].view(np.uint8)))
            raise AssertionError(f"{name} differs from the reference run ({differ} bytes differ)")


CHUNKS_COMPUTED = re.compile(r"\b(\d+) of (\d+) chunks computed\b")


def chunks_computed(stdout: str) -> tuple[int, int]:
    """``(K, N)`` from the CLI's "K of N chunks computed" line."""
    match = CHUNKS_COMPUTED.search(stdout)
    assert match, f"no 'K of N chunks computed' in stdout: {stdout!r}"
    return int(match.group(1)), int(match.group(2))


def inspect_json(out: Any) -> tuple[int, dict]:
    result = run_cli(["inspect", out, "--json"])
    assert "Traceback" not in result.stderr, describe(result)
    return result.returncode, json.loads(result.stdout)


# --------------------------------------------------------------------------- processes


def live_group_members(pgid: int) -> list[int]:
    """PIDs of processes in process group ``pgid`` that are not zombies (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the whole session a ``start_new_session=True`` process leads (no-op if gone)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """Terminate processes this test started (SIGTERM, then SIGKILL after 10 s)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_for_done(out: Any, target: int, process: subprocess.Popen, timeout: float) -> int:
    """Poll ``out``'s done flags until at least ``target`` are set; return the count seen.

    Fails if ``process`` exits first or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = done_count(out)
        if count >= target:
            return count
        if process.poll() is not None:
            raise AssertionError(
                f"the job exited (code {process.returncode}) with {count} chunks done, before {target} were"
            )
        time.sleep(0.02)
    raise AssertionError(f"only {done_count(out)} chunks done after {timeout} s; wanted {target}")

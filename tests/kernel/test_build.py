"""The compiled loops (dconv/_flatconv.c) build without a warning: for aarch64 with Debian's cross
compiler, whose object must hold the NEON level (fmla on vector registers), and for this host.
Both compile the checkout's source with the flags of pyproject.toml plus -Wall -Wextra -Werror.

The compilers and the runs in the checkout are independent and take one core each: the module
starts them all at once (``started``) and each test collects its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "dconv" / "_flatconv.c"

# pyproject.toml's extra-compile-args, -fPIC as for an extension module, and warnings as errors.
# -Wno-unused-parameter: CPython's method signature leaves `self` (and METH_NOARGS's argument) unused.
FLAGS = ["-O3", "-funroll-loops", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
         "-fPIC"]

CROSS_CC = "aarch64-linux-gnu-gcc"
CROSS_OBJDUMP = "aarch64-linux-gnu-objdump"
TIMEOUT = 180  # seconds per compiler run; a build takes a few seconds (aarch64) to ~20 s (x86-64)


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


def python_includes(aarch64_shim: Path | None = None) -> list[str]:
    """-I options for this interpreter's Python.h. With aarch64_shim, also for an aarch64 build.

    The aarch64 build reads this host's pyconfig.h: on LP64 Linux (x86-64 as aarch64) the type
    sizes it records are the same, and _flatconv.c uses nothing else of it. Debian's own
    /usr/include/pythonX.Y/pyconfig.h is a wrapper that includes <TRIPLET/pythonX.Y/pyconfig.h>
    for the target, which for aarch64 only the arm64 libpythonX.Y-dev installs; the shim gives it
    one that includes the host's.
    """
    paths = sysconfig.get_paths()
    include = paths["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        pytest.skip(f"no Python.h in {include}: this Python's headers (e.g. python3-dev) are not installed")
    args = [f"-I{include}"]
    if paths["platinclude"] != include:
        args.append(f"-I{paths['platinclude']}")
    if aarch64_shim is not None:
        sizes = {name: sysconfig.get_config_var(name) for name in ("SIZEOF_VOID_P", "SIZEOF_LONG", "SIZEOF_SIZE_T")}
        if set(sizes.values()) != {8}:
            pytest.skip(f"this Python's pyconfig.h is not LP64 ({sizes}), so an aarch64 build cannot use it")
        multiarch = sysconfig.get_config_var("MULTIARCH")
        version_dir = os.path.basename(include)  # pythonX.Y
        host_config = Path(os.path.dirname(include), multiarch or "-", version_dir, "pyconfig.h")
        if multiarch and host_config.is_file():
            shim = aarch64_shim / "aarch64-linux-gnu" / version_dir / "pyconfig.h"
            shim.parent.mkdir(parents=True, exist_ok=True)
            shim.write_text(f'#include "{host_config}"\n')
            args.append(f"-I{aarch64_shim}")
    return args


class Started:
    """A command running in the background since the module started; :meth:`result` waits for it."""

    def __init__(self, command: list[str], timeout: float = TIMEOUT, **kwargs: Any) -> None:
        self.command, self.timeout = command, timeout
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    def result(self) -> subprocess.CompletedProcess:
        try:
            stdout, stderr = self.process.communicate(timeout=self.timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(self.command, self.process.returncode, stdout, stderr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def start_aarch64_build(tmp: Path) -> Started:
    cc, objdump = shutil.which(CROSS_CC), shutil.which(CROSS_OBJDUMP)
    if cc is None or objdump is None:
        pytest.skip(f"{CROSS_CC} / {CROSS_OBJDUMP} not on PATH (Debian: apt-get install gcc-aarch64-linux-gnu)")
    probe = tmp / "probe.c"
    probe.write_text("#include <stdlib.h>\nint probe(void) { return EXIT_SUCCESS; }\n")
    if run([cc, "-c", str(probe), "-o", str(tmp / "probe.o")]).returncode != 0:
        pytest.skip(f"{CROSS_CC} has no aarch64 C library headers (Debian: apt-get install libc6-dev-arm64-cross)")
    obj = tmp / "_flatconv_aarch64.o"
    return Started([cc, *FLAGS, *python_includes(tmp / "include"), "-c", str(SOURCE), "-o", str(obj)])


def start_host_build(tmp: Path) -> Started:
    """At -O1 (the warnings are the same; -O3 took 22 s for the three x86-64 levels)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH")
    flags = ["-O1" if flag == "-O3" else flag for flag in FLAGS]
    return Started([cc, *flags, *python_includes(), "-c", str(SOURCE), "-o", str(tmp / "_flatconv.o")])


def collect(started: dict[str, Started | BaseException], test: str) -> subprocess.CompletedProcess:
    """The finished run of ``test``; skips the test if its run could not start here."""
    run = started[test]
    if isinstance(run, pytest.skip.Exception):
        pytest.skip(run.msg)
    if isinstance(run, BaseException):
        raise run
    return run.result()


@pytest.fixture
def finished(request, started) -> subprocess.CompletedProcess:
    """This test's run (started with the module's others: :func:`started`), once it has finished."""
    return collect(started, request.node.originalname)


def compiled(result: subprocess.CompletedProcess) -> None:
    """A compiler run succeeded (a warning fails it, under -Werror); else fail with its output."""
    assert result.returncode == 0, (
        f"{' '.join(result.args)}\nexit {result.returncode}\n{result.stderr}{result.stdout}"
    )


def test_the_aarch64_build_has_no_warning_and_holds_the_neon_level(finished):
    compiled(finished)
    disassembly = run([shutil.which(CROSS_OBJDUMP), "-d", finished.args[-1]])  # the object it wrote
    assert disassembly.returncode == 0, disassembly.stderr
    # vfmaq_f32 / vfmaq_f64: fmla on 4 float32 or 2 float64 lanes of a v register
    f32 = len(re.findall(r"\sfmla\s+v\d+\.4s,", disassembly.stdout))
    f64 = len(re.findall(r"\sfmla\s+v\d+\.2d,", disassembly.stdout))
    assert f32 > 0 and f64 > 0, f"NEON multiply-adds in the aarch64 object: {f32} fmla .4s, {f64} fmla .2d"


def test_the_host_build_has_no_warning(finished):
    compiled(finished)


# --------------------------------------------------------------------------- the checkout and the install

ROOT = SOURCE.parent.parent


def _checkout_shadows_an_install() -> bool:
    """A non-editable install lives elsewhere, and the checkout holds no compiled module."""
    from importlib import metadata

    installed = [Path(dist.locate_file("dconv/__init__.py")).resolve() for dist in metadata.distributions(name="dconv")]
    built_here = any((ROOT / "dconv").glob("_flatconv*.so")) or any((ROOT / "dconv").glob("_flatconv*.pyd"))
    return any(path.is_file() and path.parent != ROOT / "dconv" for path in installed) and not built_here


def _from_the_checkout(*args: str) -> Started:
    """``python ARGS`` run in the checkout as a user runs it there (the checkout first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return Started([os.sys.executable, *args], timeout=300, cwd=ROOT, env=env)


def test_version_in_the_checkout_says_what_happened(finished):
    """`python -m dconv --version` in a clone (no compiled module in the tree) says the checkout shadows
    the installed package and what to do, never that the loops were not built."""
    result = finished
    assert result.returncode == 0, result.stderr
    if _checkout_shadows_an_install():
        assert "imported dconv from this source checkout" in result.stdout and "python -P" in result.stdout
        assert "not built at install" not in result.stdout
    else:  # an editable install: the checkout is the package
        assert "source checkout" not in result.stdout


def test_python_m_pytest_in_the_checkout_tests_the_installed_package(finished):
    """`python -m pytest` from the clone's root passes the tests that need the compiled module."""
    result = finished
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout or "1 skipped" in result.stdout, result.stdout[-2000:]


# --------------------------------------------------------------------------- every run of the module, at once

STARTS: dict[str, Callable[[Path], Started]] = {
    "test_the_aarch64_build_has_no_warning_and_holds_the_neon_level": start_aarch64_build,
    "test_the_host_build_has_no_warning": start_host_build,
    "test_version_in_the_checkout_says_what_happened": lambda tmp: _from_the_checkout("-m", "dconv", "--version"),
    "test_python_m_pytest_in_the_checkout_tests_the_installed_package": lambda tmp: _from_the_checkout(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernel/test_kernel.py", "-k", "compiled_helper_is_built"
    ),
}


@pytest.fixture(scope="module")
def started(request, tmp_path_factory) -> Iterator[dict[str, Started | BaseException]]:
    """The run of each selected test of this module, started at once: test name -> its run, or why it
    could not start (a skip, raised again by :func:`collect`)."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    runs: dict[str, Started | BaseException] = {}
    try:
        for test in selected & set(STARTS):
            try:
                runs[test] = STARTS[test](tmp_path_factory.mktemp("build"))
            except (Exception, pytest.skip.Exception) as e:
                runs[test] = e
        yield runs
    finally:
        for run in runs.values():
            if isinstance(run, Started):
                run.stop()

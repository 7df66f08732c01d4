"""``dconv backward --scheduler tls://...`` against a real TLS-only Dask cluster.

A self-signed CA and scheduler, worker and client certificates are generated
with ``cryptography``; a ``dask scheduler --protocol tls`` and two
``dask worker --no-nanny`` processes run on 127.0.0.1 with encryption required.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import dconv
from conftest import dask_command, dconv_command, free_port

pytestmark = pytest.mark.cluster

x509 = pytest.importorskip("cryptography.x509")
distributed = pytest.importorskip("distributed")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

START_TIMEOUT = 30.0  # scheduler up and both workers connected
RUN_TIMEOUT = 60.0  # one dconv invocation, a hard ceiling far above the expected few seconds
CONNECT_TIMEOUT = 10.0  # dconv's ClusterOptions.connect_timeout
TLS_ENV_PREFIX = "DASK_DISTRIBUTED__COMM__TLS__"


# --------------------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_tls_material(directory: Path) -> dict[str, str]:
    """A self-signed CA and scheduler/worker/client certificates signed by it, valid for a day.

    Returns paths: ``ca`` and, for each role, ``<role>_cert`` and ``<role>_key``
    (unencrypted PEM keys). Every leaf certificate carries subjectAltName
    IP 127.0.0.1 and DNS localhost, and both server and client auth usages,
    because Dask uses mutual TLS on every connection.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dconv test CA"))
        .issuer_name(_name("dconv test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": str(directory / "ca.pem")}
    _write_cert(ca_cert, directory / "ca.pem")

    for role in ("scheduler", "worker", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"dconv test {role}"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{role}.pem", directory / f"{role}.key"
        _write_cert(cert, cert_path)
        _write_key(key, key_path)
        paths[f"{role}_cert"], paths[f"{role}_key"] = str(cert_path), str(key_path)
    return paths


# --------------------------------------------------------------------------- processes


def _clean_env() -> dict[str, str]:
    """This process's environment without any TLS configuration a developer may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith(TLS_ENV_PREFIX)}


def _stop(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """Terminate every process, then kill whichever has not exited within ``timeout``."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> bool:
    """Poll until something accepts TCP connections on 127.0.0.1:``port``; False if ``process`` exits first.

    Starting the workers and the client only once the scheduler listens keeps
    them off distributed's exponential connect backoff, whose jittered sleeps
    can otherwise add several seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(directory.glob("*.log")))


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """TLS material, and a TLS-only scheduler with two single-threaded workers; yields a dict.

    Keys: ``address`` (tls://127.0.0.1:PORT), ``ca``, ``client_cert``,
    ``client_key`` and the other paths of :func:`make_tls_material`.
    """
    certs = tmp_path_factory.mktemp("tls-certs")
    logs = tmp_path_factory.mktemp("tls-logs")
    material = make_tls_material(certs)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {**_clean_env(), "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    processes: list[subprocess.Popen] = []

    def spawn(name: str, args: list[str], role: str) -> None:
        tls_args = ["--tls-ca-file", material["ca"], "--tls-cert", material[f"{role}_cert"],
                    "--tls-key", material[f"{role}_key"]]
        with open(logs / f"{name}.log", "w") as log:
            processes.append(
                subprocess.Popen(dask_command() + args + tls_args, stdout=log, stderr=subprocess.STDOUT, env=env)
            )

    deadline = time.monotonic() + START_TIMEOUT
    try:
        spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls",
             "--dashboard-address", "127.0.0.1:0"],
            "scheduler",
        )
        if not _wait_for_port(port, processes[0], START_TIMEOUT):
            pytest.fail(f"TLS scheduler did not listen on port {port} (exit {processes[0].poll()})\n{_logs(logs)}")
        for i in range(2):
            spawn(
                f"worker-{i}",
                ["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                 "--dashboard-address", "127.0.0.1:0", "--name", f"tls-w{i}",
                 "--local-directory", str(logs / f"worker-{i}-scratch")],
                "worker",
            )
        security = distributed.Security(
            tls_ca_file=material["ca"],
            tls_client_cert=material["client_cert"],
            tls_client_key=material["client_key"],
            require_encryption=True,
        )
        try:
            with distributed.Client(address, security=security, timeout=max(1.0, deadline - time.monotonic())) as c:
                c.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
        except (OSError, TimeoutError) as e:
            dead = {p.args[1]: p.returncode for p in processes if p.poll() is not None}
            pytest.fail(f"TLS cluster did not start within {START_TIMEOUT:g} s ({e}); exited: {dead}\n{_logs(logs)}")
        yield {"address": address, **material}
    finally:
        # Workers first: a worker whose scheduler closes while it handles its own SIGTERM
        # can hang in Worker.close (seen with distributed 2026.8), costing the kill timeout.
        _stop(processes[1:])
        _stop(processes[:1])


def run_dconv(*args: str, timeout: float = RUN_TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``dconv ARGS`` with a clean TLS environment; returns the result and its wall time."""
    start = time.monotonic()
    result = subprocess.run(
        dconv_command() + list(args), capture_output=True, text=True, timeout=timeout, env=_clean_env()
    )
    return result, time.monotonic() - start


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# --------------------------------------------------------------------------- tests


def test_backward_over_tls_matches_kernel(tls, make_input, tmp_path):
    inputs = make_input(m=23, chunk=5, padding=1, stride=1, dtype="float64", seed=7)
    out = str(tmp_path / "out.zarr")

    result, _ = run_dconv(
        "backward", inputs, out, "--scheduler", tls["address"], "--tls-ca-file", tls["ca"],
        "--tls-cert", tls["client_cert"], "--tls-key", tls["client_key"], "--batch-chunk", "5", "--quiet",
    )

    assert result.returncode == 0, _describe(result)
    group = zarr.open_group(inputs, mode="r")
    A_prev, dZ, W = (np.asarray(group[name][...]) for name in ("A_prev", "dZ", "W"))
    expected = dconv.conv2d_backward(dZ, A_prev, W, stride=1, padding=1)
    output = dconv.open_result(out)
    for name, want in zip(("dA_prev", "dW", "db"), expected):
        got = np.asarray(output[name][...])
        assert got.dtype == np.float64, name
        assert got.shape == want.shape, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max()), err_msg=name)


def test_tls_scheduler_without_tls_options_fails_cleanly(tls, make_input, tmp_path):
    inputs = make_input(m=6, chunk=3)
    out = str(tmp_path / "out.zarr")

    result, seconds = run_dconv(
        "backward", inputs, out, "--scheduler", tls["address"], "--quiet", timeout=CONNECT_TIMEOUT + 20
    )

    assert result.returncode != 0, _describe(result)
    assert seconds < CONNECT_TIMEOUT + 15, (seconds, _describe(result))
    assert "Traceback" not in result.stderr, _describe(result)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("dconv: error:")]
    assert len(error_lines) == 1, _describe(result)
    assert tls["address"] in error_lines[0] or "TLS" in error_lines[0], _describe(result)
    assert not Path(out, "dW").exists(), "no output should be computed without a connection"


def test_missing_tls_cert_is_a_usage_error(tls, make_input, tmp_path):
    inputs = make_input(m=6, chunk=3)
    missing = str(tmp_path / "no-such-client.pem")

    result, _ = run_dconv(
        "backward", inputs, str(tmp_path / "out.zarr"), "--scheduler", tls["address"],
        "--tls-ca-file", tls["ca"], "--tls-cert", missing, "--tls-key", tls["client_key"], "--quiet",
    )

    assert result.returncode == 2, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("dconv: error:")]
    assert len(error_lines) == 1, _describe(result)
    assert "tls-cert" in error_lines[0] and missing in error_lines[0], _describe(result)


@pytest.fixture(scope="module")
def foreign_tls(tmp_path_factory):
    """TLS material from a second, unrelated CA that the cluster does not trust."""
    return make_tls_material(tmp_path_factory.mktemp("tls-foreign-certs"))


@pytest.mark.parametrize("mismatch", ["client_cert_from_foreign_ca", "client_trusts_foreign_ca"])
def test_untrusted_tls_material_is_rejected_cleanly(tls, foreign_tls, make_input, tmp_path, mismatch):
    inputs = make_input(m=6, chunk=3)
    out = str(tmp_path / "out.zarr")
    if mismatch == "client_cert_from_foreign_ca":  # the scheduler rejects the client
        ca, cert, key = tls["ca"], foreign_tls["client_cert"], foreign_tls["client_key"]
    else:  # the client rejects the scheduler
        ca, cert, key = foreign_tls["ca"], tls["client_cert"], tls["client_key"]

    result, seconds = run_dconv(
        "backward", inputs, out, "--scheduler", tls["address"],
        "--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key, "--quiet", timeout=CONNECT_TIMEOUT + 20,
    )

    assert result.returncode != 0, _describe(result)
    assert seconds < CONNECT_TIMEOUT + 15, (seconds, _describe(result))
    assert "Traceback" not in result.stderr, _describe(result)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("dconv: error:")]
    assert len(error_lines) == 1 and tls["address"] in error_lines[0], _describe(result)
    assert not Path(out, "dW").exists(), "no output should be computed without a connection"

"""Cross-check with OpenSSL itself: Mosquitto and EMQX verify with it, not with our code."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import certs
from certs import PkiPaths

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")


def _verify(pki: PkiPaths, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # `openssl verify` checks the first certificate of the file; -untrusted hands it the rest (the chain
    # a TLS client sends). Only ca.pem is trusted.
    assert OPENSSL is not None
    command = [OPENSSL, "verify", "-CAfile", str(pki.ca_cert), "-untrusted", str(cert), "-crl_check"]
    command += ["-CRLfile", str(pki.crl), *extra]
    return subprocess.run([*command, str(cert)], capture_output=True, text=True, check=False)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return certs.init_pki(tmp_path / "pki")


def test_device_verifies_until_revoked(pki: PkiPaths) -> None:
    device = certs.issue_device(pki, "x")
    before = _verify(pki, device.cert, "-purpose", "sslclient")
    assert before.returncode == 0, before.stdout + before.stderr
    certs.revoke(pki, "x")
    after = _verify(pki, device.cert)
    assert after.returncode != 0
    assert "certificate revoked" in after.stdout + after.stderr


def test_revoking_one_device_leaves_the_others_valid(pki: PkiPaths) -> None:
    certs.issue_device(pki, "x")
    other = certs.issue_device(pki, "y")
    certs.revoke(pki, "x")
    result = _verify(pki, other.cert)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("attr", "purpose"),
    [("server_cert", "sslserver"), ("controller_cert", "sslclient"), ("operator_cert", "sslclient")],
)
def test_init_certificates_verify_for_their_purpose(pki: PkiPaths, attr: str, purpose: str) -> None:
    result = _verify(pki, getattr(pki, attr), "-purpose", purpose)
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_certificate_matches_localhost(pki: PkiPaths) -> None:
    for check in (("-verify_hostname", "localhost"), ("-verify_ip", "127.0.0.1"), ("-verify_ip", "::1")):
        result = _verify(pki, pki.server_cert, *check)
        assert result.returncode == 0, (check, result.stdout + result.stderr)
    wrong = _verify(pki, pki.server_cert, "-verify_hostname", "example.com")
    assert wrong.returncode != 0


def test_expired_device_is_refused(pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    device = certs.issue_device(
        pki, "old", not_valid_before=now - timedelta(days=10), not_valid_after=now - timedelta(days=1)
    )
    result = _verify(pki, device.cert)
    assert result.returncode != 0
    assert "certificate has expired" in result.stdout + result.stderr

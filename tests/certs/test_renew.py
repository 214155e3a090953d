"""renew and the crash-safe swap of key.pem / cert.pem (certs.identity_files)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import certs
import certs.identity_files as identity_files
from certs import ClientPaths, Issuer, PkiError, PkiPaths, Role
from tests.certs import load_cert, make_legacy_pki


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return certs.init_pki(tmp_path / "pki")


def _public(paths: ClientPaths) -> bytes:
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _matches(paths: ClientPaths) -> bool:
    cert_key = load_cert(paths.cert).public_key()
    der = cert_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der == _public(paths)


def _lifetime(path: Path) -> timedelta:
    cert = load_cert(path)
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def _leftovers(paths: ClientPaths) -> list[str]:
    return sorted(path.name for path in paths.cert.parent.iterdir() if path.name.endswith((".new", ".prev", ".tmp")))


def test_renew_device_replaces_key_and_certificate(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1", days=5)
    old_cert, old_key = load_cert(paths.cert), _public(paths)
    renewal = certs.renew(pki, "gw-1")
    new_cert = load_cert(paths.cert)
    assert _public(paths) != old_key
    assert new_cert.serial_number == renewal.serial != old_cert.serial_number
    assert _matches(paths)
    assert (renewal.role, renewal.issuer, renewal.recovered) == (Role.DEVICE, Issuer.ISSUING, None)
    assert renewal.not_after == new_cert.not_valid_after_utc
    assert timedelta(days=certs.DEVICE_DAYS) <= _lifetime(paths.cert) <= timedelta(days=certs.DEVICE_DAYS, minutes=6)
    assert len(x509.load_pem_x509_certificates(paths.cert.read_bytes())) == 2  # with the chain
    assert _leftovers(paths) == []
    assert os.stat(paths.key).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("name", "attr", "days"),
    [
        ("fleet-controller", "default_controller", certs.CONTROLLER_DAYS),
        ("operator", "default_operator", certs.OPERATOR_DAYS),
        ("fleet-server", "server", certs.DEFAULT_DAYS),
    ],
)
def test_renew_the_identities_init_made(pki: PkiPaths, name: str, attr: str, days: int) -> None:
    paths: ClientPaths = getattr(pki, attr)
    before = load_cert(paths.cert)
    renewal = certs.renew(pki, name)
    after = load_cert(paths.cert)
    assert renewal.issuer is Issuer.ROOT
    after.verify_directly_issued_by(load_cert(pki.ca_cert))
    assert after.subject == before.subject
    assert _matches(paths)
    assert _lifetime(paths.cert) <= timedelta(days=days, minutes=6)
    if name == "fleet-server":  # the broker's names survive
        sans = x509.SubjectAlternativeName
        assert after.extensions.get_extension_for_class(sans) == before.extensions.get_extension_for_class(sans)


def test_renew_days(pki: PkiPaths) -> None:
    certs.issue_operator(pki, "alice")
    certs.renew(pki, "alice", days=7)
    assert timedelta(days=7) <= _lifetime(pki.operator("alice").cert) <= timedelta(days=7, minutes=6)


def test_renew_moves_a_root_issued_device_to_the_issuing_ca(tmp_path: Path) -> None:
    pki = make_legacy_pki(tmp_path / "pki")
    paths = certs.issue_device(pki, "gw-old")
    load_cert(paths.cert).verify_directly_issued_by(load_cert(pki.ca_cert))
    certs.upgrade_pki(pki)
    assert certs.renew(pki, "gw-old").issuer is Issuer.ISSUING
    load_cert(paths.cert).verify_directly_issued_by(load_cert(pki.issuing_cert))


def test_renew_unknown_identity(pki: PkiPaths) -> None:
    with pytest.raises(PkiError, match="no identity named 'nobody'"):
        certs.renew(pki, "nobody")


def test_renew_does_not_revoke_the_old_certificate(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1")
    old = load_cert(paths.cert)
    certs.renew(pki, "gw-1")
    assert not certs.is_revoked(pki, old)


# ----------------------------------------------------------------------------- crashes mid-swap


class Crash(Exception):
    pass


def _crash_at_rename(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """Make the ``number``-th swap rename of identity_files (1: key, 2: cert) fail like a power cut."""
    calls = {"n": 0}
    real = identity_files._rename

    def rename(source: Path, target: Path) -> None:
        calls["n"] += 1
        if calls["n"] == number:
            raise Crash
        real(source, target)

    monkeypatch.setattr(identity_files, "_rename", rename)


@pytest.mark.parametrize("at", [1, 2])
def test_a_crash_between_the_renames_is_rolled_forward(pki: PkiPaths, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    paths = certs.issue_device(pki, "gw-1")
    old_key = _public(paths)
    _crash_at_rename(monkeypatch, at)
    with pytest.raises(Crash):
        certs.renew(pki, "gw-1")
    monkeypatch.undo()
    if at == 2:  # key.pem new, cert.pem old: not a usable pair as it stands...
        assert not _matches(paths)
    # ... but the previous pair is complete on disk
    previous = ClientPaths(paths.cert.with_name("cert.pem.prev"), paths.key.with_name("key.pem.prev"))
    assert _matches(previous)
    assert _public(previous) == old_key
    assert "finished an interrupted renewal" in str(certs.recover_identity_files(paths))
    assert _matches(paths)
    assert _public(paths) != old_key
    assert _leftovers(paths) == []
    assert certs.recover_identity_files(paths) is None  # idempotent


def test_renew_repairs_an_interrupted_renewal_first(pki: PkiPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = certs.issue_device(pki, "gw-1")
    _crash_at_rename(monkeypatch, 2)
    with pytest.raises(Crash):
        certs.renew(pki, "gw-1")
    monkeypatch.undo()
    renewal = certs.renew(pki, "gw-1")
    assert renewal.recovered is not None
    assert _matches(paths)
    assert _leftovers(paths) == []


def test_a_half_written_new_pair_is_discarded(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1")
    before = paths.cert.read_bytes(), paths.key.read_bytes()
    other = certs.issue_device(pki, "gw-2")
    paths.key.with_name("key.pem.new").write_bytes(other.key.read_bytes())  # its cert never made it
    assert certs.recover_identity_files(paths) is None
    assert (paths.cert.read_bytes(), paths.key.read_bytes()) == before
    assert _leftovers(paths) == []


def test_a_mismatched_pair_falls_back_to_the_previous_one(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1")
    before = paths.cert.read_bytes(), paths.key.read_bytes()
    paths.cert.with_name("cert.pem.prev").write_bytes(before[0])
    paths.key.with_name("key.pem.prev").write_bytes(before[1])
    paths.key.write_bytes(certs.issue_device(pki, "gw-2").key.read_bytes())
    assert "restored the previous key and certificate" in str(certs.recover_identity_files(paths))
    assert (paths.cert.read_bytes(), paths.key.read_bytes()) == before
    assert os.stat(paths.key).st_mode & 0o777 == 0o600


def test_nothing_to_recover_from_is_an_error(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1")
    paths.key.write_bytes(certs.issue_device(pki, "gw-2").key.read_bytes())
    paths.key.with_name("key.pem.prev").write_bytes(b"junk")
    with pytest.raises(PkiError, match=r"gw-1: key\.pem does not match cert\.pem, and no complete pair"):
        certs.recover_identity_files(paths)


def test_replace_refuses_a_pair_that_does_not_match(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-1")
    other = certs.issue_device(pki, "gw-2")
    before = paths.cert.read_bytes()
    with pytest.raises(PkiError, match="does not match the new key"):
        certs.replace_identity_files(paths, cert_pem=other.cert.read_bytes(), key_pem=paths.key.read_bytes())
    assert paths.cert.read_bytes() == before
    assert _leftovers(paths) == []


def test_replace_creates_a_new_identity(tmp_path: Path, pki: PkiPaths) -> None:
    source = certs.issue_device(pki, "gw-1")
    target = ClientPaths(tmp_path / "agent" / "cert.pem", tmp_path / "agent" / "key.pem")
    certs.replace_identity_files(target, cert_pem=source.cert.read_bytes(), key_pem=source.key.read_bytes())
    assert _matches(target)
    assert _leftovers(target) == []

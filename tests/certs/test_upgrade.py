"""A PKI made before the issuing CA: it keeps working, and upgrade_pki adds the issuing CA."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

import certs
from certs import Issuer, PkiError, PkiPaths
from tests.certs import load_cert, load_crls, make_legacy_pki


@pytest.fixture
def legacy(tmp_path: Path) -> PkiPaths:
    pki = make_legacy_pki(tmp_path / "pki")
    certs.issue_device(pki, "gw-old")
    return pki


def _files(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _path_length(cert: x509.Certificate) -> int | None:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


def test_a_pki_without_issuing_ca_issues_devices_from_the_root(legacy: PkiPaths) -> None:
    cert_pem = legacy.device("gw-old").cert.read_bytes()
    (leaf,) = x509.load_pem_x509_certificates(cert_pem)  # no chain to add
    leaf.verify_directly_issued_by(load_cert(legacy.ca_cert))
    (info,) = [info for info in certs.list_identities(legacy) if info.name == "gw-old"]
    assert info.issuer is Issuer.ROOT
    serial = certs.revoke(legacy, "gw-old")
    assert certs.load_revoked_serials(legacy) == {serial}
    (crl,) = load_crls(legacy.crl)
    assert [entry.serial_number for entry in crl] == [serial]


def test_upgrade_adds_the_issuing_ca_and_touches_no_identity(legacy: PkiPaths) -> None:
    before = _files(legacy.root)
    old_root = load_cert(legacy.ca_cert)
    upgrade = certs.upgrade_pki(legacy)
    assert (upgrade.issuing_added, upgrade.root_recertified, upgrade.crl_completed) == (True, True, True)
    assert set(upgrade.written) == {legacy.ca_cert, legacy.issuing_key, legacy.issuing_cert, legacy.crl}
    after = _files(legacy.root)
    for path, data in before.items():
        if path not in (legacy.ca_cert, legacy.crl):
            assert after[path] == data, path  # keys, server, controller, operator, devices, release key
    new_root = load_cert(legacy.ca_cert)
    assert new_root.public_key() == old_root.public_key()
    assert new_root.subject == old_root.subject
    assert (new_root.not_valid_before_utc, new_root.not_valid_after_utc) == (
        old_root.not_valid_before_utc,
        old_root.not_valid_after_utc,
    )
    assert (_path_length(old_root), _path_length(new_root)) == (0, 1)
    ski = x509.SubjectKeyIdentifier
    assert new_root.extensions.get_extension_for_class(ski) == old_root.extensions.get_extension_for_class(ski)
    for path in (legacy.server_cert, legacy.controller_cert, legacy.device("gw-old").cert):
        load_cert(path).verify_directly_issued_by(new_root)  # still valid under the new root
    issuing = load_cert(legacy.issuing_cert)
    issuing.verify_directly_issued_by(new_root)
    assert _path_length(issuing) == 0
    root_crl, issuing_crl = load_crls(legacy.crl)
    assert legacy.crl.read_bytes().startswith(before[legacy.crl])  # the root's CRL kept as it was
    assert root_crl.issuer == new_root.subject
    assert issuing_crl.issuer == issuing.subject
    assert issuing_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_after_the_upgrade_devices_come_from_the_issuing_ca(legacy: PkiPaths) -> None:
    certs.upgrade_pki(legacy)
    certs.issue_device(legacy, "gw-new")
    issuers = {info.name: info.issuer for info in certs.list_identities(legacy)}
    assert issuers["gw-old"] is Issuer.ROOT
    assert issuers["gw-new"] is Issuer.ISSUING
    old_serial, new_serial = certs.revoke(legacy, "gw-old"), certs.revoke(legacy, "gw-new")
    root_crl, issuing_crl = load_crls(legacy.crl)
    assert [entry.serial_number for entry in root_crl] == [old_serial]
    assert [entry.serial_number for entry in issuing_crl] == [new_serial]


def test_a_root_that_allows_a_ca_below_is_not_recertified(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    root = pki.ca_cert.read_bytes()
    pki.issuing_cert.unlink()
    pki.issuing_key.unlink()
    pki.crl.write_bytes(pki.crl.read_bytes().split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n")
    upgrade = certs.upgrade_pki(pki)
    assert (upgrade.issuing_added, upgrade.root_recertified) == (True, False)
    assert pki.ca_cert.read_bytes() == root


def test_upgrading_a_complete_pki_is_an_error_and_changes_nothing(legacy: PkiPaths) -> None:
    certs.upgrade_pki(legacy)
    before = _files(legacy.root)
    with pytest.raises(PkiError, match=r"ca\.pem: already exists, with its issuing CA \(--force"):
        certs.upgrade_pki(legacy)
    assert _files(legacy.root) == before


def test_upgrade_completes_a_crl_without_the_issuing_ca(tmp_path: Path) -> None:
    # E.g. an older `fleet certs revoke` rewrote crl.pem with the root's CRL only.
    pki = certs.init_pki(tmp_path / "pki")
    root_block = pki.crl.read_bytes().split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n"
    pki.crl.write_bytes(root_block)
    with pytest.raises(PkiError, match=r"has no CRL of the issuing CA .*refuses every certificate that CA issued"):
        certs.load_revoked_serials(pki)
    upgrade = certs.upgrade_pki(pki)
    assert (upgrade.issuing_added, upgrade.root_recertified, upgrade.crl_completed) == (False, False, True)
    assert upgrade.written == (pki.crl,)
    assert certs.load_revoked_serials(pki) == frozenset()
    number = certs.load_revocations(pki).numbers[Issuer.ISSUING]
    assert number > 1_000_000  # rebuilt without its predecessor: above any count a broker saw


def test_revoke_rebuilds_a_crl_missing_for_the_other_ca(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    certs.issue_device(pki, "gw-1")
    pki.crl.unlink()
    serial = certs.revoke(pki, "gw-1")
    assert certs.load_revoked_serials(pki) == {serial}
    assert set(certs.load_revocations(pki).numbers) == {Issuer.ROOT, Issuer.ISSUING}


def test_upgrade_needs_the_root_key(legacy: PkiPaths) -> None:
    legacy.ca_key.unlink()
    with pytest.raises(PkiError, match=r"ca\.key: not found"):
        certs.upgrade_pki(legacy)
    assert not legacy.issuing_cert.exists()

from __future__ import annotations

import re
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import certs
from certs import PkiError, PkiPaths
from certs.crl import ensure_not_older
from tests.certs import load_cert, load_crls


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    pki = certs.init_pki(tmp_path / "pki")
    certs.issue_device(pki, "gw-0001")
    return pki


def _verifies(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return crl.is_signature_valid(key)


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_initial_crls_are_empty_signed_and_long_lived(pki: PkiPaths) -> None:
    root_crl, issuing_crl = load_crls(pki.crl)  # the root's first
    for crl, ca in ((root_crl, load_cert(pki.ca_cert)), (issuing_crl, load_cert(pki.issuing_cert))):
        assert list(crl) == []
        assert _verifies(crl, ca)
        assert crl.issuer == ca.subject
        assert _crl_number(crl) == 1
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - crl.last_update_utc == timedelta(days=3650)
    assert certs.load_revoked_serials(pki) == frozenset()


def test_revoking_a_device_resigns_only_the_issuing_crl(pki: PkiPaths) -> None:
    root_before, _ = pki.crl.read_text().split("-----END X509 CRL-----\n", 1)
    pki.ca_key.unlink()  # the root key may stay offline: devices need the issuing key only
    serial = certs.revoke(pki, "gw-0001")
    assert serial == load_cert(pki.device("gw-0001").cert).serial_number
    root_crl, issuing_crl = load_crls(pki.crl)
    assert [entry.serial_number for entry in issuing_crl] == [serial]
    assert _verifies(issuing_crl, load_cert(pki.issuing_cert))
    assert _crl_number(issuing_crl) == 2
    assert pki.crl.read_text().startswith(root_before)  # the root's CRL, byte for byte
    assert list(root_crl) == []
    assert _crl_number(root_crl) == 1
    assert certs.load_revoked_serials(pki) == {serial}


def test_revoking_a_controller_resigns_only_the_root_crl(pki: PkiPaths) -> None:
    certs.issue_controller(pki, "ctl-2")
    serial = certs.revoke(pki, "ctl-2")
    root_crl, issuing_crl = load_crls(pki.crl)
    assert [entry.serial_number for entry in root_crl] == [serial]
    assert _crl_number(root_crl) == 2
    assert (list(issuing_crl), _crl_number(issuing_crl)) == ([], 1)


def test_crl_numbers_only_grow(pki: PkiPaths) -> None:
    numbers = []
    for name in ("a", "b", "c"):
        certs.issue_device(pki, name)
        certs.revoke(pki, name)
        numbers.append(certs.load_revocations(pki).numbers[certs.Issuer.ISSUING])
    assert numbers == [2, 3, 4]


def test_revoking_twice_changes_nothing(pki: PkiPaths) -> None:
    serial = certs.revoke(pki, "gw-0001")
    before = pki.crl.read_bytes()
    assert certs.revoke(pki, "gw-0001") == serial
    assert pki.crl.read_bytes() == before


def test_revocations_accumulate_and_keep_their_dates(pki: PkiPaths) -> None:
    first = certs.revoke(pki, "gw-0001")
    first_date = load_crls(pki.crl)[1].get_revoked_certificate_by_serial_number(first)
    assert first_date is not None
    certs.issue_device(pki, "gw-0002")
    second = certs.revoke(pki, "gw-0002")
    crl = load_crls(pki.crl)[1]
    assert {entry.serial_number for entry in crl} == {first, second}
    kept = crl.get_revoked_certificate_by_serial_number(first)
    assert kept is not None
    assert kept.revocation_date_utc == first_date.revocation_date_utc


def test_revoke_unknown_name(pki: PkiPaths) -> None:
    with pytest.raises(PkiError, match=rf"^no identity named 'nobody' in {re.escape(str(pki.root))}$"):
        certs.revoke(pki, "nobody")


def test_revoke_refuses_names_that_are_no_node_id(pki: PkiPaths) -> None:
    with pytest.raises(PkiError, match="is not a node id"):
        certs.revoke(pki, "../ca")


def test_reissued_identity_is_no_longer_listed_as_revoked(pki: PkiPaths) -> None:
    old_serial = certs.revoke(pki, "gw-0001")
    (info,) = [info for info in certs.list_identities(pki) if info.name == "gw-0001"]
    assert info.revoked
    certs.issue_device(pki, "gw-0001", force=True)
    (info,) = [info for info in certs.list_identities(pki) if info.name == "gw-0001"]
    assert not info.revoked
    assert info.serial != old_serial
    assert certs.load_revoked_serials(pki) == {old_serial}  # the old certificate stays refused


def test_forged_crl_is_refused(pki: PkiPaths, tmp_path: Path) -> None:
    other = certs.init_pki(tmp_path / "other")
    pki.crl.write_bytes(other.crl.read_bytes())
    with pytest.raises(PkiError, match=rf"^{re.escape(str(pki.crl))}: not signed by the CA"):
        certs.load_revoked_serials(pki)
    with pytest.raises(PkiError, match=rf"^{re.escape(str(pki.crl))}: not signed by the CA"):
        certs.revoke(pki, "gw-0001")


def test_unreadable_crl_is_named(pki: PkiPaths) -> None:
    pki.crl.write_text("not a crl")
    with pytest.raises(PkiError, match=rf"^{re.escape(str(pki.crl))}: not a PEM CRL"):
        certs.load_revoked_serials(pki)


def test_missing_crl_is_rebuilt_by_revoke(pki: PkiPaths) -> None:
    pki.crl.unlink()
    with pytest.raises(PkiError, match=rf"^{re.escape(str(pki.crl))}: not found"):
        certs.load_revoked_serials(pki)
    serial = certs.revoke(pki, "gw-0001")
    assert certs.load_revoked_serials(pki) == {serial}


def test_certificate_of_a_replaced_ca_cannot_be_revoked(pki: PkiPaths) -> None:
    certs.init_pki(pki.root, force=True)
    with pytest.raises(PkiError, match=r"devices/gw-0001/cert.pem: not issued by this CA"):
        certs.revoke(pki, "gw-0001")


def test_ensure_not_older_refuses_a_lower_number(pki: PkiPaths) -> None:
    issuing_crl = load_crls(pki.crl)[1]
    assert ensure_not_older(0, issuing_crl) == 1
    assert ensure_not_older(1, issuing_crl) == 1  # the same CRL read again
    with pytest.raises(PkiError, match=r"^CRL of O=fleet,CN=fleet device CA has number 1, lower than 2 already seen"):
        ensure_not_older(2, issuing_crl)


def test_load_revocations_refuses_a_crl_put_back(pki: PkiPaths) -> None:
    old = pki.crl.read_bytes()
    seen = certs.load_revocations(pki)
    certs.revoke(pki, "gw-0001")
    newer = certs.load_revocations(pki, not_older_than=seen)
    assert newer.numbers == {certs.Issuer.ROOT: 1, certs.Issuer.ISSUING: 2}
    pki.crl.write_bytes(old)  # a restored backup: gw-0001 would be let in again
    with pytest.raises(
        PkiError, match=rf"^{re.escape(str(pki.crl))}: CRL of O=fleet,CN=fleet device CA.* lower than 2"
    ):
        certs.load_revocations(pki, not_older_than=newer)
    assert certs.load_revocations(pki).serials == frozenset()  # without a memory, it cannot tell


def test_a_second_crl_of_one_ca_is_refused(pki: PkiPaths) -> None:
    pki.crl.write_bytes(pki.crl.read_bytes() * 2)
    with pytest.raises(PkiError, match="two CRLs of O=fleet,CN=fleet CA"):
        certs.load_revoked_serials(pki)


def test_concurrent_revocations_are_all_kept(pki: PkiPaths) -> None:
    names = [f"gw-c{i}" for i in range(8)]
    for name in names:
        certs.issue_device(pki, name)
    errors: list[BaseException] = []

    def revoke(name: str) -> None:
        try:
            certs.revoke(pki, name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=revoke, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    expected = {load_cert(pki.device(name).cert).serial_number for name in names}
    assert certs.load_revoked_serials(pki) == expected
    assert certs.load_revocations(pki).numbers[certs.Issuer.ISSUING] == 1 + len(names)

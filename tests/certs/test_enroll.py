"""issue_from_csr / verify_possession_proof / is_revoked: the functions an enrollment service calls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import certs
from certs import PkiError, PkiPaths, Refusal, RequestRefused, Role
from tests.certs import load_cert

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return certs.init_pki(tmp_path / "pki")


def _csr(key: PrivateKey, *names: x509.NameAttribute[str], ca_extension: bool = False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(names)))
    if ca_extension:  # what a greedy requester might ask for: must be ignored
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _proof(old_key_path: Path, csr_pem: bytes) -> bytes:
    """What the agent sends: ECDSA/SHA-256 by the old key over the CSR's DER bytes."""
    old_key = serialization.load_pem_private_key(old_key_path.read_bytes(), password=None)
    assert isinstance(old_key, ec.EllipticCurvePrivateKey)
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return old_key.sign(der, ec.ECDSA(hashes.SHA256()))


def _assert_refused(exc: pytest.ExceptionInfo[RequestRefused], reason: Refusal) -> None:
    assert exc.value.reason is reason
    assert isinstance(exc.value, PkiError)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------- issue_from_csr


def test_issue_from_csr_returns_leaf_then_issuing_ca(pki: PkiPaths) -> None:
    key = _p256()
    chain = certs.issue_from_csr(pki, _csr(key, _cn("gw-7")), node_id="gw-7", days=30)
    leaf, issuing = x509.load_pem_x509_certificates(chain)
    assert issuing == load_cert(pki.issuing_cert)
    leaf.verify_directly_issued_by(issuing)
    assert leaf.public_key() == key.public_key()
    assert certs.identity_from_cert(leaf) == certs.Identity("gw-7", Role.DEVICE, leaf.serial_number)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=6)
    assert not (pki.root / "devices").exists()  # nothing written


def test_issue_from_csr_defaults_to_the_device_lifetime(pki: PkiPaths) -> None:
    leaf = x509.load_pem_x509_certificate(certs.issue_from_csr(pki, _csr(_p256(), _cn("gw-7")), node_id="gw-7"))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=certs.DEVICE_DAYS) <= lifetime <= timedelta(days=certs.DEVICE_DAYS, minutes=6)


def test_csr_without_cn_gets_the_node_id(pki: PkiPaths) -> None:
    leaf = x509.load_pem_x509_certificate(certs.issue_from_csr(pki, _csr(_p256()), node_id="gw-7"))
    assert certs.identity_from_cert(leaf).name == "gw-7"


def test_what_the_csr_asks_for_beyond_its_key_is_ignored(pki: PkiPaths) -> None:
    csr = _csr(
        _p256(),
        _cn("gw-7"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "controller"),
        ca_extension=True,
    )
    leaf = x509.load_pem_x509_certificate(certs.issue_from_csr(pki, csr, node_id="gw-7"))
    assert leaf.subject.rfc4514_string() == "O=fleet,OU=device,CN=gw-7"
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_pki_without_issuing_ca_issues_from_the_root(pki: PkiPaths) -> None:
    pki.issuing_cert.unlink()
    pki.issuing_key.unlink()
    chain = certs.issue_from_csr(pki, _csr(_p256(), _cn("gw-7")), node_id="gw-7")
    (leaf,) = x509.load_pem_x509_certificates(chain)
    leaf.verify_directly_issued_by(load_cert(pki.ca_cert))


def test_forged_csr_signature_is_refused(pki: PkiPaths) -> None:
    # Someone edits the name in a CSR another device signed: same length, signature no longer matches.
    der = x509.load_pem_x509_csr(_csr(_p256(), _cn("gw-0001"))).public_bytes(serialization.Encoding.DER)
    forged = der.replace(b"gw-0001", b"gw-0002")
    pem = x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(RequestRefused, match=r"^CSR signature does not verify") as info:
        certs.issue_from_csr(pki, pem, node_id="gw-0002")
    _assert_refused(info, Refusal.CSR_SIGNATURE)


def test_wrong_cn_is_refused(pki: PkiPaths) -> None:
    with pytest.raises(RequestRefused, match=r"^CSR subject CN 'gw-8' is not the node id 'gw-7'$") as info:
        certs.issue_from_csr(pki, _csr(_p256(), _cn("gw-8")), node_id="gw-7")
    _assert_refused(info, Refusal.WRONG_NAME)


@pytest.mark.parametrize(
    ("key", "named"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
    ],
)
def test_other_key_types_are_refused(pki: PkiPaths, key: PrivateKey, named: str) -> None:
    with pytest.raises(RequestRefused, match=rf"^CSR key is {named}: only EC P-256") as info:
        certs.issue_from_csr(pki, _csr(key, _cn("gw-7")), node_id="gw-7")
    _assert_refused(info, Refusal.KEY_TYPE)


@pytest.mark.parametrize(
    ("node_id", "match"),
    [
        ("operator", "reserved"),
        ("alice", "already the name of operator identity"),
        ("gw 7", "is not a node id"),
    ],
)
def test_names_that_are_not_a_free_device_name_are_refused(pki: PkiPaths, node_id: str, match: str) -> None:
    certs.issue_operator(pki, "alice")
    with pytest.raises(RequestRefused, match=match) as info:
        certs.issue_from_csr(pki, _csr(_p256()), node_id=node_id)
    _assert_refused(info, Refusal.WRONG_NAME)


def test_garbage_is_a_bad_request(pki: PkiPaths) -> None:
    with pytest.raises(RequestRefused, match=r"^not a PEM certificate signing request$") as info:
        certs.issue_from_csr(pki, b"hello", node_id="gw-7")
    _assert_refused(info, Refusal.BAD_REQUEST)


# -------------------------------------------------------------------------- verify_possession_proof


@pytest.fixture
def expired(pki: PkiPaths) -> Path:
    """gw-old: a device certificate that expired 20 days ago; returns its directory."""
    now = datetime.now(UTC)
    paths = certs.issue_device(
        pki, "gw-old", not_valid_before=now - timedelta(days=110), not_valid_after=now - timedelta(days=20)
    )
    return paths.cert.parent


def _recover(pki: PkiPaths, directory: Path, **kwargs: object) -> str:
    csr = _csr(_p256(), _cn(directory.name))
    proof = _proof(directory / "key.pem", csr)
    return certs.verify_possession_proof(pki, (directory / "cert.pem").read_bytes(), csr, proof, **kwargs)  # type: ignore[arg-type]


def test_expired_device_within_grace_proves_possession(pki: PkiPaths, expired: Path) -> None:
    csr = _csr(_p256(), _cn("gw-old"))
    proof = _proof(expired / "key.pem", csr)
    node_id = certs.verify_possession_proof(pki, (expired / "cert.pem").read_bytes(), csr, proof)
    assert node_id == "gw-old"
    chain = certs.issue_from_csr(pki, csr, node_id=node_id)  # and the service issues for it
    assert certs.identity_from_cert(x509.load_pem_x509_certificate(chain)).name == "gw-old"


def test_still_valid_device_proves_possession(pki: PkiPaths) -> None:
    assert _recover(pki, certs.issue_device(pki, "gw-ok").cert.parent) == "gw-ok"


def test_root_issued_device_of_an_older_pki_proves_possession(pki: PkiPaths) -> None:
    pki.issuing_cert.rename(pki.root / "aside.pem")
    directory = certs.issue_device(pki, "gw-legacy").cert.parent  # root-issued
    (pki.root / "aside.pem").rename(pki.issuing_cert)
    assert _recover(pki, directory) == "gw-legacy"


def test_expired_past_grace_is_refused(pki: PkiPaths, expired: Path) -> None:
    with pytest.raises(RequestRefused, match=r"^old certificate of gw-old expired .*, more than 10 days ago") as info:
        _recover(pki, expired, grace=timedelta(days=10))
    _assert_refused(info, Refusal.EXPIRED)
    far = datetime.now(UTC) + timedelta(days=400)
    with pytest.raises(RequestRefused, match="more than 365 days ago"):
        _recover(pki, expired, now=far)


def test_revoked_old_certificate_is_refused(pki: PkiPaths, expired: Path) -> None:
    certs.revoke(pki, "gw-old")
    with pytest.raises(RequestRefused, match=r"^old certificate of gw-old \(serial [0-9a-f]+\) is revoked$") as info:
        _recover(pki, expired)
    _assert_refused(info, Refusal.REVOKED)


def test_old_certificate_from_a_foreign_ca_is_refused(pki: PkiPaths, tmp_path: Path) -> None:
    foreign = certs.init_pki(tmp_path / "foreign")
    directory = certs.issue_device(foreign, "gw-x").cert.parent
    with pytest.raises(RequestRefused, match=r"^old certificate .*gw-x: not issued by this PKI") as info:
        _recover(pki, directory)
    _assert_refused(info, Refusal.FOREIGN_ISSUER)


def test_wrong_proof_signature_is_refused(pki: PkiPaths, expired: Path) -> None:
    csr = _csr(_p256(), _cn("gw-old"))
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    other = _p256().sign(der, ec.ECDSA(hashes.SHA256()))  # right bytes, wrong key
    wrong_bytes = _proof(expired / "key.pem", _csr(_p256(), _cn("gw-old")))  # right key, another CSR
    for proof in (other, wrong_bytes, b"\x30\x00"):
        with pytest.raises(
            RequestRefused, match=r"^possession proof for gw-old: not a signature by the old key"
        ) as info:
            certs.verify_possession_proof(pki, (expired / "cert.pem").read_bytes(), csr, proof)
        _assert_refused(info, Refusal.PROOF)


def test_proof_with_a_csr_for_another_name_is_refused(pki: PkiPaths, expired: Path) -> None:
    csr = _csr(_p256(), _cn("gw-other"))
    proof = _proof(expired / "key.pem", csr)
    with pytest.raises(RequestRefused, match="CSR subject CN 'gw-other' is not the node id 'gw-old'") as info:
        certs.verify_possession_proof(pki, (expired / "cert.pem").read_bytes(), csr, proof)
    _assert_refused(info, Refusal.WRONG_NAME)


def test_forged_csr_in_a_recovery_is_refused(pki: PkiPaths, expired: Path) -> None:
    der = x509.load_pem_x509_csr(_csr(_p256(), _cn("gw-old"))).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-1] ^= 0x01  # last byte of the signature
    csr = x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(RequestRefused, match="CSR signature does not verify") as info:
        certs.verify_possession_proof(pki, (expired / "cert.pem").read_bytes(), csr, _proof(expired / "key.pem", csr))
    _assert_refused(info, Refusal.CSR_SIGNATURE)


def test_controller_certificate_cannot_recover_a_device(pki: PkiPaths) -> None:
    directory = certs.issue_controller(pki, "ctl-2").cert.parent
    with pytest.raises(RequestRefused, match="a controller, not a device certificate") as info:
        _recover(pki, directory)
    _assert_refused(info, Refusal.WRONG_ROLE)


def test_garbage_old_certificate_is_a_bad_request(pki: PkiPaths) -> None:
    with pytest.raises(RequestRefused, match=r"^old certificate: not a PEM certificate$") as info:
        certs.verify_possession_proof(pki, b"junk", _csr(_p256()), b"")
    _assert_refused(info, Refusal.BAD_REQUEST)


# ---------------------------------------------------------------------------------------- is_revoked


def test_is_revoked_follows_the_issuers_crl(pki: PkiPaths) -> None:
    device = load_cert(certs.issue_device(pki, "gw-1").cert)
    controller = load_cert(certs.issue_controller(pki, "ctl-2").cert)
    assert not certs.is_revoked(pki, device)
    assert not certs.is_revoked(pki, controller)
    certs.revoke(pki, "gw-1")
    assert certs.is_revoked(pki, device)
    assert not certs.is_revoked(pki, controller)
    certs.revoke(pki, "ctl-2")
    assert certs.is_revoked(pki, controller)


def test_is_revoked_refuses_a_foreign_certificate(pki: PkiPaths, tmp_path: Path) -> None:
    foreign = certs.init_pki(tmp_path / "foreign")
    with pytest.raises(PkiError, match="not issued by this CA"):
        certs.is_revoked(pki, load_cert(certs.issue_device(foreign, "gw-1").cert))


def test_revoke_certificate_of_a_network_enrolled_device(pki: PkiPaths) -> None:
    chain = certs.issue_from_csr(pki, _csr(_p256(), _cn("gw-net")), node_id="gw-net")
    leaf = x509.load_pem_x509_certificate(chain)
    assert certs.revoke_certificate(pki, leaf) == leaf.serial_number
    assert certs.is_revoked(pki, leaf)

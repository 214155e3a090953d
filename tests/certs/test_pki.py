from __future__ import annotations

import ipaddress
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

import certs
from certs import ClientPaths, PkiError, PkiPaths, Role
from tests.certs import load_cert

Issue = Callable[..., ClientPaths]
E = TypeVar("E", bound=x509.ExtensionType)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return certs.init_pki(tmp_path / "pki")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def test_init_writes_every_file_with_private_keys_owner_only(pki: PkiPaths) -> None:
    private = [pki.ca_key, pki.issuing_key, pki.server_key, pki.controller_key, pki.operator_key, pki.release_key]
    private.append(pki.control_key)
    public = [
        pki.ca_cert,
        pki.issuing_cert,
        pki.server_cert,
        pki.controller_cert,
        pki.operator_cert,
        pki.release_pub,
        pki.control_pub,
        pki.crl,
    ]
    assert {path.name for path in pki.root.iterdir()} == {path.name for path in private + public}
    for path in private:
        assert _mode(path) == 0o600, path
    for path in public:
        # Readable by Mosquitto's unprivileged user, writable by nobody else.
        assert _mode(path) & 0o044 == 0o044, path
        assert not _mode(path) & 0o022, path


@pytest.mark.parametrize(("attr", "path_length"), [("ca_cert", 1), ("issuing_cert", 0)])
def test_cas_are_constrained_signing_only_cas(pki: PkiPaths, attr: str, path_length: int) -> None:
    ca = load_cert(getattr(pki, attr))
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=path_length)
    usage = _ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == "sha256"
    _ext(ca, x509.SubjectKeyIdentifier)  # present, or this raises


@pytest.mark.parametrize(
    ("attr", "name", "role", "usage"),
    [
        ("server_cert", "fleet-server", Role.SERVER, ExtendedKeyUsageOID.SERVER_AUTH),
        ("controller_cert", "fleet-controller", Role.CONTROLLER, ExtendedKeyUsageOID.CLIENT_AUTH),
        ("operator_cert", "operator", Role.OPERATOR, ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_init_leaf_certificates_carry_their_role(
    pki: PkiPaths, attr: str, name: str, role: Role, usage: x509.ObjectIdentifier
) -> None:
    path: Path = getattr(pki, attr)
    cert = load_cert(path)
    ca = load_cert(pki.ca_cert)
    # init's shared operator is an admin on the controller's API (the title attribute, certs.AccessRole).
    title = "2.5.4.12=admin," if role is Role.OPERATOR else ""  # 2.5.4.12: the X.520 title
    assert cert.subject.rfc4514_string() == f"{title}O=fleet,OU={role},CN={name}"
    assert certs.identity_from_cert(cert) == certs.Identity(name=name, role=role, serial=cert.serial_number)
    cert.verify_directly_issued_by(ca)
    assert _ext(cert, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
    key_usage = _ext(cert, x509.KeyUsage)
    assert key_usage.digital_signature
    assert not key_usage.key_cert_sign
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [usage]
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    ski = _ext(ca, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.digest


def test_server_sans_are_defaults_plus_extras(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path, extra_sans=["broker.example.com", "10.1.2.3", "fd00::7", "localhost"])
    san = _ext(load_cert(pki.server_cert), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("fd00::7"),
    ]


def test_bad_san_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"--san 'not a host'"):
        certs.init_pki(tmp_path / "pki", extra_sans=["not a host"])
    assert not (tmp_path / "pki").exists()


def test_release_key_pair_signs_and_verifies(pki: PkiPaths) -> None:
    private = serialization.load_pem_private_key(pki.release_key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(pki.release_pub.read_bytes())
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(private.sign(b"release manifest"), b"release manifest")
    assert pki.release_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_refuses_an_existing_pki_and_leaves_it_untouched(pki: PkiPaths) -> None:
    before = _files(pki.root)
    with pytest.raises(PkiError, match=r"ca\.pem: already exists"):
        certs.init_pki(pki.root)
    assert _files(pki.root) == before


def test_init_force_replaces_the_ca(pki: PkiPaths) -> None:
    old_ca = pki.ca_cert.read_bytes()
    certs.init_pki(pki.root, force=True)
    assert pki.ca_cert.read_bytes() != old_ca
    load_cert(pki.server_cert).verify_directly_issued_by(load_cert(pki.ca_cert))


def test_init_days_sets_validity(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path, days=30)
    for path in (pki.ca_cert, pki.server_cert):
        cert = load_cert(path)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=6)


@pytest.mark.parametrize(
    ("issue", "role", "layout"),
    [
        (certs.issue_device, Role.DEVICE, "devices"),
        (certs.issue_operator, Role.OPERATOR, "operators"),
        (certs.issue_controller, Role.CONTROLLER, "controllers"),
    ],
)
def test_issue_writes_identity_with_role(pki: PkiPaths, issue: Issue, role: Role, layout: str) -> None:
    paths = issue(pki, "gw-0001")
    assert paths.cert == pki.root / layout / "gw-0001" / "cert.pem"
    assert paths.key == pki.root / layout / "gw-0001" / "key.pem"
    assert _mode(paths.key) == 0o600
    cert = load_cert(paths.cert)
    assert certs.identity_from_cert(cert) == certs.Identity("gw-0001", role, cert.serial_number)
    cert.verify_directly_issued_by(load_cert(pki.issuing_cert if role is Role.DEVICE else pki.ca_cert))
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


def test_serials_are_random_and_distinct(pki: PkiPaths) -> None:
    serials = {load_cert(certs.issue_device(pki, f"gw-{i}").cert).serial_number for i in range(5)}
    assert len(serials) == 5
    assert all(serial.bit_length() > 64 for serial in serials)


def test_existing_identity_is_refused_unless_forced(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw-0001")
    first = paths.cert.read_bytes()
    with pytest.raises(PkiError, match=r"devices/gw-0001: device 'gw-0001' already exists \(--force"):
        certs.issue_device(pki, "gw-0001")
    assert paths.cert.read_bytes() == first
    certs.issue_device(pki, "gw-0001", force=True)
    assert load_cert(paths.cert).serial_number != x509.load_pem_x509_certificate(first).serial_number


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (certs.issue_device, certs.issue_operator),
        (certs.issue_operator, certs.issue_device),
        (certs.issue_controller, certs.issue_device),
        (certs.issue_device, certs.issue_controller),
    ],
)
def test_names_share_one_namespace_across_roles(pki: PkiPaths, first: Issue, second: Issue) -> None:
    first(pki, "alice")
    with pytest.raises(PkiError, match=r"'alice' is already the name of"):
        second(pki, "alice", force=True)  # force replaces one's own identity, never another role's


@pytest.mark.parametrize("name", ["fleet-controller", "operator", "fleet-server"])
def test_reserved_names_are_refused(pki: PkiPaths, name: str) -> None:
    with pytest.raises(PkiError, match="reserved"):
        certs.issue_device(pki, name)
    assert not (pki.root / "devices").exists()


@pytest.mark.parametrize("name", ["", "-gw", "gw 1", "../escape", "a" * 65, "gw/1"])
def test_invalid_names_are_refused_and_nothing_is_written(pki: PkiPaths, name: str) -> None:
    before = _files(pki.root)
    with pytest.raises(PkiError, match="is not a node id"):
        certs.issue_device(pki, name)
    assert _files(pki.root) == before


def test_expired_certificate_via_explicit_validity(pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    paths = certs.issue_device(
        pki, "old", not_valid_before=now - timedelta(days=10), not_valid_after=now - timedelta(days=1)
    )
    cert = load_cert(paths.cert)
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc <= now - timedelta(days=10) + timedelta(seconds=1)


def test_inverted_validity_is_refused(pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    with pytest.raises(PkiError, match="before it starts"):
        certs.issue_device(pki, "gw", not_valid_before=now, not_valid_after=now - timedelta(days=1))


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path, days=10)
    cert = load_cert(certs.issue_device(pki, "gw", days=1000).cert)
    assert cert.not_valid_after_utc == load_cert(pki.ca_cert).not_valid_after_utc


def test_missing_pki_says_to_run_init(tmp_path: Path) -> None:
    pki = PkiPaths(tmp_path / "nowhere")
    with pytest.raises(PkiError) as info:
        certs.issue_device(pki, "gw")
    assert str(info.value) == f"{pki.ca_cert}: not found (run `fleet certs init {pki.root}` first)"
    assert not pki.root.exists()


@pytest.mark.parametrize(
    ("key", "cert", "issue"),
    [
        ("ca_key", "ca_cert", certs.issue_operator),
        ("issuing_key", "issuing_cert", certs.issue_device),
    ],
)
def test_mismatched_ca_key_is_refused_naming_the_file(
    pki: PkiPaths, tmp_path: Path, key: str, cert: str, issue: Issue
) -> None:
    other = certs.init_pki(tmp_path / "other")
    key_path: Path = getattr(pki, key)
    key_path.write_bytes(getattr(other, key).read_bytes())
    with pytest.raises(PkiError) as info:
        issue(pki, "gw")
    assert str(info.value) == f"{key_path}: does not match the certificate in {getattr(pki, cert)}"
    assert not (pki.root / "devices").exists()
    assert not (pki.root / "operators").exists()


@pytest.mark.parametrize(("attr", "content"), [("ca_cert", b"garbage"), ("ca_key", b"garbage")])
def test_garbage_ca_files_are_named(pki: PkiPaths, attr: str, content: bytes) -> None:
    path: Path = getattr(pki, attr)
    path.write_bytes(content)
    with pytest.raises(PkiError, match=rf"^{re.escape(str(path))}: not"):
        certs.issue_operator(pki, "alice")


def test_missing_ca_key_is_named(pki: PkiPaths) -> None:
    pki.ca_key.unlink()
    with pytest.raises(PkiError, match=rf"^{re.escape(str(pki.ca_key))}: not found$"):
        certs.issue_controller(pki, "ctl-2")


def test_list_identities_in_role_order(pki: PkiPaths) -> None:
    certs.issue_device(pki, "gw-b")
    certs.issue_device(pki, "gw-a")
    certs.issue_operator(pki, "alice")
    certs.issue_controller(pki, "ctl-2")
    listed = [(info.name, info.role) for info in certs.list_identities(pki)]
    assert listed == [
        ("fleet-server", Role.SERVER),
        ("ctl-2", Role.CONTROLLER),
        ("fleet-controller", Role.CONTROLLER),
        ("alice", Role.OPERATOR),
        ("operator", Role.OPERATOR),
        ("gw-a", Role.DEVICE),
        ("gw-b", Role.DEVICE),
    ]


def test_list_identities_reports_a_foreign_certificate_by_file(pki: PkiPaths) -> None:
    paths = certs.issue_device(pki, "gw")
    paths.cert.write_bytes(pki.ca_cert.read_bytes())  # a certificate without a role
    with pytest.raises(PkiError, match=rf"^{re.escape(str(paths.cert))}: subject has no OU"):
        certs.list_identities(pki)

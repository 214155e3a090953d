"""Creating and running the fleet PKI: one CA, a server, controllers, operators and devices, one CRL.

Every operation computes all it will write first and then writes each file atomically, so an error
(a name collision, an unreadable CA key, a full disk) leaves the directory as it was.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.crl import build_crl, crl_number, parse_verified_crl, revoked_entries
from certs.errors import CertificateRejected, PkiError
from certs.files import PendingFile, write_files
from certs.identity import (
    CONTROLLER_NAME,
    OPERATOR_NAME,
    ORGANIZATION,
    RESERVED_NAMES,
    SERVER_NAME,
    Role,
    identity_from_cert,
    subject_for,
)
from certs.paths import CONTROLLERS_DIR, DEVICES_DIR, OPERATORS_DIR, ClientPaths, PkiPaths
from fleet.protocol.ids import InvalidNodeId, validate_node_id

DEFAULT_DAYS = 3650
# Devices in the field often run with a clock a little behind; a certificate valid from "now" exactly
# would be refused by them for the first minutes.
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_SERVER_SANS = ("localhost", "127.0.0.1", "::1")
CA_COMMON_NAME = "fleet CA"

_ROLE_ORDER = {Role.SERVER: 0, Role.CONTROLLER: 1, Role.OPERATOR: 2, Role.DEVICE: 3}
_ROLE_DIRS = {Role.DEVICE: DEVICES_DIR, Role.OPERATOR: OPERATORS_DIR, Role.CONTROLLER: CONTROLLERS_DIR}


@dataclass(frozen=True)
class IdentityInfo:
    """One line of ``fleet certs ls``."""

    name: str
    role: Role
    serial: int
    not_after: datetime
    revoked: bool
    cert: Path


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _Validity:
    not_before: datetime
    not_after: datetime


# ---------------------------------------------------------------------------------------------- public


def init_pki(
    root: Path | str,
    *,
    force: bool = False,
    extra_sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
) -> PkiPaths:
    """Create a CA and everything a fleet needs to start: server, controller, operator, release key, CRL.

    ``days`` is the validity of the CA and of every certificate created here. With ``force`` an existing
    PKI is replaced; identities issued by the old CA stay on disk but are no longer trusted.
    """
    pki = PkiPaths(Path(root))
    if pki.ca_cert.exists() and not force:
        raise PkiError(f"{pki.ca_cert}: already exists (--force replaces the whole PKI)")
    sans = _server_sans(extra_sans)
    now = _now()
    ca = _new_ca(_validity_for_days(now, days))
    leaf_validity = _validity_for_days(now, days)
    release_key = ed25519.Ed25519PrivateKey.generate()
    files = [
        PendingFile(pki.ca_cert, _cert_pem(ca.cert)),
        PendingFile(pki.ca_key, _key_pem(ca.key), private=True),
        *_leaf_files(ca, SERVER_NAME, Role.SERVER, pki.server, leaf_validity, sans=sans),
        *_leaf_files(ca, CONTROLLER_NAME, Role.CONTROLLER, pki.default_controller, leaf_validity),
        *_leaf_files(ca, OPERATOR_NAME, Role.OPERATOR, pki.default_operator, leaf_validity),
        PendingFile(pki.release_key, _key_pem(release_key), private=True),
        PendingFile(pki.release_pub, _public_key_pem(release_key.public_key())),
        PendingFile(pki.crl, build_crl(ca.cert, ca.key, {}, number=1, now=now)),
    ]
    write_files(files)
    return pki


def issue_device(
    pki: PkiPaths,
    node_id: str,
    *,
    force: bool = False,
    days: int = DEFAULT_DAYS,
    not_valid_before: datetime | None = None,
    not_valid_after: datetime | None = None,
) -> ClientPaths:
    """Issue the certificate of device ``node_id`` (its CN, so its MQTT client id and topic level).

    ``not_valid_before`` / ``not_valid_after`` override ``days`` exactly (tests use them to make an
    expired certificate); dates without a timezone are taken as UTC.
    """
    return _issue(pki, node_id, Role.DEVICE, force=force, days=days, start=not_valid_before, end=not_valid_after)


def issue_operator(pki: PkiPaths, name: str, *, force: bool = False, days: int = DEFAULT_DAYS) -> ClientPaths:
    """Issue a personal operator identity, so two operators' tools do not kick each other off the broker."""
    return _issue(pki, name, Role.OPERATOR, force=force, days=days)


def issue_controller(pki: PkiPaths, name: str, *, force: bool = False, days: int = DEFAULT_DAYS) -> ClientPaths:
    """Issue one more controller instance identity (each instance needs its own MQTT client id)."""
    return _issue(pki, name, Role.CONTROLLER, force=force, days=days)


def revoke(pki: PkiPaths, name: str) -> int:
    """Add the current certificate of identity ``name`` to the CRL and re-sign it; return its serial.

    Revoking an already revoked certificate changes nothing.
    """
    _validate_name(name, "identity")
    ca = _load_ca(pki)
    paths = _find_identity(pki, name)
    cert = _read_cert(paths.cert)
    _require_issued_by(cert, ca, paths.cert)
    if pki.crl.exists():
        current = _read_crl(pki, ca.cert)
        entries, number = revoked_entries(current), crl_number(current)
    else:  # lost or deleted: rebuilding from nothing is the only way forward
        entries, number = {}, 0
    if cert.serial_number in entries:
        return cert.serial_number
    now = _now()
    entries[cert.serial_number] = now
    write_files([PendingFile(pki.crl, build_crl(ca.cert, ca.key, entries, number=number + 1, now=now))])
    return cert.serial_number


def load_revoked_serials(pki: PkiPaths) -> frozenset[int]:
    """The serials in the CRL, after checking the CA signed it (``PkiError`` if forged or unreadable)."""
    ca_cert = _read_ca_cert(pki)
    return frozenset(revoked_entries(_read_crl(pki, ca_cert)))


def list_identities(pki: PkiPaths) -> list[IdentityInfo]:
    """Every identity on disk, server first, then controllers, operators and devices by name."""
    revoked = load_revoked_serials(pki)
    infos = [_identity_info(paths.cert, revoked) for _, _, paths in _existing_identities(pki)]
    return sorted(infos, key=lambda info: (_ROLE_ORDER[info.role], info.name))


# ------------------------------------------------------------------------------------------- issuing


def _issue(
    pki: PkiPaths,
    name: str,
    role: Role,
    *,
    force: bool,
    days: int,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ClientPaths:
    _validate_name(name, role)
    paths = _paths_for(pki, role, name)
    _check_name_free(pki, name, role, paths, force=force)
    ca = _load_ca(pki)
    validity = _leaf_validity(ca, days, start, end)
    write_files(_leaf_files(ca, name, role, paths, validity))
    return paths


def _validate_name(name: str, what: str) -> None:
    # Names are the CN, so the MQTT client id, a topic level and a directory name: node id rules.
    try:
        validate_node_id(name)
    except InvalidNodeId as exc:
        raise PkiError(f"{what} name {exc.reason}") from exc


def _paths_for(pki: PkiPaths, role: Role, name: str) -> ClientPaths:
    if role is Role.DEVICE:
        return pki.device(name)
    if role is Role.OPERATOR:
        return pki.operator(name)
    if role is Role.CONTROLLER:
        return pki.controller(name)
    raise PkiError(f"{role} identities are created by `fleet certs init` only")


def _check_name_free(pki: PkiPaths, name: str, role: Role, paths: ClientPaths, *, force: bool) -> None:
    # One namespace for all roles: the name is the MQTT client id, and a device called "alice" would
    # otherwise take over the session (and look like) operator alice.
    if name in RESERVED_NAMES:
        raise PkiError(f"{name!r} is reserved for an identity that `fleet certs init` creates")
    for other_role in _ROLE_DIRS:
        other = _paths_for(pki, other_role, name)
        if other_role is not role and _exists(other):
            raise PkiError(f"{name!r} is already the name of {other_role} identity {other.cert.parent}")
    if _exists(paths) and not force:
        raise PkiError(f"{paths.cert.parent}: {role} {name!r} already exists (--force replaces it)")


def _exists(paths: ClientPaths) -> bool:
    return paths.cert.exists() or paths.key.exists()


def _leaf_validity(ca: _Ca, days: int, start: datetime | None, end: datetime | None) -> _Validity:
    now = _now()
    default = _validity_for_days(now, days)
    # A certificate that outlives its CA would only promise what the chain cannot keep.
    default_end = min(default.not_after, ca.cert.not_valid_after_utc)
    validity = _Validity(
        not_before=_as_utc(start) if start is not None else default.not_before,
        not_after=_as_utc(end) if end is not None else default_end,
    )
    if validity.not_after <= validity.not_before:
        raise PkiError(f"validity ends ({validity.not_after}) before it starts ({validity.not_before})")
    return validity


def _validity_for_days(now: datetime, days: int) -> _Validity:
    if days < 1:
        raise PkiError(f"--days {days}: must be at least 1")
    return _Validity(not_before=now - CLOCK_SKEW, not_after=now + timedelta(days=days))


def _leaf_files(
    ca: _Ca,
    name: str,
    role: Role,
    paths: ClientPaths,
    validity: _Validity,
    *,
    sans: Sequence[x509.GeneralName] = (),
) -> list[PendingFile]:
    key = _new_key()
    cert = _build_leaf(ca, subject_for(name, role), key.public_key(), role, validity, sans=sans)
    return [PendingFile(paths.cert, _cert_pem(cert)), PendingFile(paths.key, _key_pem(key), private=True)]


def _new_ca(validity: _Validity) -> _Ca:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    cert = (
        _cert_builder(name, name, key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _Ca(cert=cert, key=key)


def _build_leaf(
    ca: _Ca,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    role: Role,
    validity: _Validity,
    *,
    sans: Sequence[x509.GeneralName],
) -> x509.Certificate:
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role is Role.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _cert_builder(subject, ca.cert.subject, public_key, validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _cert_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: _Validity
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA only signs certificates and CRLs; a leaf signs its TLS handshakes (and may do static ECDH).
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _server_sans(extra: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for value in (*DEFAULT_SERVER_SANS, *extra):
        san = _general_name(value)
        if san not in sans:
            sans.append(san)
    return sans


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or not value.isascii() or any(char.isspace() or char in "/:@" for char in value):
        raise PkiError(f"--san {value!r}: neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# ------------------------------------------------------------------------------------------- reading


def _load_ca(pki: PkiPaths) -> _Ca:
    cert = _read_ca_cert(pki)
    data = _read_bytes(pki.ca_key)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{pki.ca_key}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{pki.ca_key}: not an ECDSA private key")
    if _spki(key.public_key()) != _spki(_ec_public_key(cert)):
        raise PkiError(f"{pki.ca_key}: does not match the certificate in {pki.ca_cert}")
    return _Ca(cert=cert, key=key)


def _read_ca_cert(pki: PkiPaths) -> x509.Certificate:
    return _read_cert(pki.ca_cert, missing_hint=f" (run `fleet certs init {pki.root}` first)")


def _read_crl(pki: PkiPaths, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    return parse_verified_crl(_read_bytes(pki.crl), source=str(pki.crl), ca_cert=ca_cert)


def _read_cert(path: Path, *, missing_hint: str = "") -> x509.Certificate:
    data = _read_bytes(path, missing_hint=missing_hint)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate") from exc


def _read_bytes(path: Path, *, missing_hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: not found{missing_hint}") from exc
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _require_issued_by(cert: x509.Certificate, ca: _Ca, path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{path}: not issued by this CA ({ca.cert.subject.rfc4514_string()})") from exc


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"certificate {cert.subject.rfc4514_string()}: not an ECDSA key")
    return key


# ----------------------------------------------------------------------------------------- inventory


def _existing_identities(pki: PkiPaths) -> Iterator[tuple[str, Role, ClientPaths]]:
    """(name, role, paths) of every identity whose certificate is on disk, as the layout names them."""
    defaults = (
        (SERVER_NAME, Role.SERVER, pki.server),
        (CONTROLLER_NAME, Role.CONTROLLER, pki.default_controller),
        (OPERATOR_NAME, Role.OPERATOR, pki.default_operator),
    )
    for name, role, paths in defaults:
        if paths.cert.exists():
            yield name, role, paths
    for role, directory in _ROLE_DIRS.items():
        parent = pki.root / directory
        if not parent.is_dir():
            continue
        for child in sorted(parent.iterdir()):
            paths = _paths_for(pki, role, child.name)
            if child.is_dir() and paths.cert.exists():
                yield child.name, role, paths


def _find_identity(pki: PkiPaths, name: str) -> ClientPaths:
    for candidate, _, paths in _existing_identities(pki):
        if candidate == name:
            return paths
    raise PkiError(f"no identity named {name!r} in {pki.root}")


def _identity_info(path: Path, revoked: frozenset[int]) -> IdentityInfo:
    cert = _read_cert(path)
    try:
        identity = identity_from_cert(cert)
    except CertificateRejected as exc:
        raise PkiError(f"{path}: {exc}") from exc
    return IdentityInfo(
        name=identity.name,
        role=identity.role,
        serial=identity.serial,
        not_after=cert.not_valid_after_utc,
        revoked=identity.serial in revoked,
        cert=path,
    )


# ---------------------------------------------------------------------------------------- encodings


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_key_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime:
    # Whole seconds: X.509 times have no fractions, and comparisons with what was written must agree.
    return datetime.now(UTC).replace(microsecond=0)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

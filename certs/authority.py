"""The two CAs of a PKI directory and how certificates are built and read.

- the **root** (``ca.pem`` / ``ca.key``): the trust anchor every broker and client loads. Its key can
  stay offline: it signs the issuing CA, the server, controllers, operators and its own CRL only.
- the **issuing CA** (``issuing.pem`` / ``issuing.key``, path length 0): signs device certificates
  and its own CRL. Its key is what an enrollment service needs. A PKI made before it existed has
  none; devices are then issued by the root (see :func:`device_authority`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.errors import PkiError
from certs.identity import ISSUING_CA_SUBJECT, ROOT_CA_SUBJECT, Role
from certs.paths import PkiPaths

# Lifetimes in days. The root's is ``fleet certs init --days``; the server certificate gets the same.
DEFAULT_DAYS = 3650
ISSUING_DAYS = 1825
DEVICE_DAYS = 90
CONTROLLER_DAYS = 365
OPERATOR_DAYS = 365
# Devices in the field often run with a clock a little behind; a certificate valid from "now" exactly
# would be refused by them for the first minutes.
CLOCK_SKEW = timedelta(minutes=5)
# The root may have one CA below it (the issuing CA, itself limited to 0). Roots made before the
# issuing CA existed say 0, which OpenSSL enforces: see recertify_root.
ROOT_PATH_LENGTH = 1


class Issuer(StrEnum):
    ROOT = "root"
    ISSUING = "issuing"


@dataclass(frozen=True)
class Authority:
    kind: Issuer
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def chain_pem(self) -> bytes:
        """What follows a leaf this CA signed in its ``cert.pem``: the issuing CA; nothing for the root
        (every peer has it already)."""
        return cert_pem(self.cert) if self.kind is Issuer.ISSUING else b""


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime


# ------------------------------------------------------------------------------------------ reading


def read_root_cert(pki: PkiPaths) -> x509.Certificate:
    return read_cert(pki.ca_cert, missing_hint=f" (run `fleet certs init {pki.root}` first)")


def ca_certs(pki: PkiPaths) -> dict[Issuer, x509.Certificate]:
    """The CA certificates of the PKI, root first; the issuing CA only if there is one."""
    root = read_root_cert(pki)
    cas = {Issuer.ROOT: root}
    if pki.issuing_cert.exists():
        issuing = read_cert(pki.issuing_cert)
        if not _directly_issued_by(issuing, root):
            raise PkiError(f"{pki.issuing_cert}: not issued by the root CA in {pki.ca_cert}")
        cas[Issuer.ISSUING] = issuing
    return cas


def load_authority(pki: PkiPaths, kind: Issuer) -> Authority:
    """A CA with its private key (``PkiError`` naming the file if missing or not matching)."""
    cert = ca_certs(pki)[Issuer.ROOT] if kind is Issuer.ROOT else _issuing_cert(pki)
    files = pki.root_authority if kind is Issuer.ROOT else pki.issuing_authority
    key = _read_ec_key(files.key)
    if spki(key.public_key()) != spki(ec_public_key(cert)):
        raise PkiError(f"{files.key}: does not match the certificate in {files.cert}")
    return Authority(kind, cert, key)


def device_authority(pki: PkiPaths) -> Authority:
    """The CA that issues devices: the issuing CA, or the root in a PKI that has none (yet)."""
    return load_authority(pki, Issuer.ISSUING if pki.issuing_cert.exists() else Issuer.ROOT)


def issuer_of(
    pki: PkiPaths, cert: x509.Certificate, cas: Mapping[Issuer, x509.Certificate] | None = None
) -> Issuer | None:
    """Which CA of this PKI signed ``cert``, checked by signature; ``None`` for any other issuer.

    ``cas`` (from :func:`ca_certs`) saves re-reading the CA files when asking about many certificates.
    """
    for kind, ca in (cas if cas is not None else ca_certs(pki)).items():
        if cert.issuer == ca.subject and _directly_issued_by(cert, ca):
            return kind
    return None


def _issuing_cert(pki: PkiPaths) -> x509.Certificate:
    cas = ca_certs(pki)
    if Issuer.ISSUING not in cas:
        raise PkiError(f"{pki.issuing_cert}: not found (`fleet certs init {pki.root}` adds it)")
    return cas[Issuer.ISSUING]


def _directly_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def read_cert(path: Path, *, missing_hint: str = "") -> x509.Certificate:
    """The first certificate of a PEM file (a leaf's ``cert.pem`` holds its chain after it)."""
    data = read_bytes(path, missing_hint=missing_hint)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate") from exc


def read_bytes(path: Path, *, missing_hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: not found{missing_hint}") from exc
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _read_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_bytes(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an ECDSA private key")
    return key


def ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"certificate {cert.subject.rfc4514_string()}: not an ECDSA key")
    return key


# ----------------------------------------------------------------------------------------- building


def new_root(validity: Validity) -> Authority:
    key = new_key()
    cert = (
        _cert_builder(ROOT_CA_SUBJECT, ROOT_CA_SUBJECT, key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=ROOT_PATH_LENGTH), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(Issuer.ROOT, cert, key)


def new_issuing(root: Authority, days: int, *, now: datetime) -> Authority:
    """A device-issuing CA below ``root``: path length 0, certificate and CRL signing only."""
    key = new_key()
    validity = leaf_validity(root.cert, days, now=now)
    cert = (
        _cert_builder(ISSUING_CA_SUBJECT, root.cert.subject, key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(_authority_key_identifier(root.cert), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return Authority(Issuer.ISSUING, cert, key)


def root_allows_issuing_ca(root: x509.Certificate) -> bool:
    path_length = root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    return path_length is None or path_length >= 1


def recertify_root(root: Authority) -> Authority:
    """The same root (key, subject, validity, key identifier) with path length 1 instead of 0.

    Everything the old root certificate signed verifies against the new one (same name, same key);
    only a verifier holding the new one accepts chains through the issuing CA.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(root.cert.subject)
        .issuer_name(root.cert.issuer)
        .public_key(root.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(root.cert.not_valid_before_utc)
        .not_valid_after(root.cert.not_valid_after_utc)
    )
    for extension in root.cert.extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints):
            value = x509.BasicConstraints(ca=True, path_length=ROOT_PATH_LENGTH)
        builder = builder.add_extension(value, critical=extension.critical)
    return Authority(Issuer.ROOT, builder.sign(root.key, hashes.SHA256()), root.key)


def build_leaf(
    issuer: Authority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    role: Role,
    validity: Validity,
    *,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role is Role.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _cert_builder(subject, issuer.cert.subject, public_key, validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_authority_key_identifier(issuer.cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def leaf_validity(
    issuer: x509.Certificate,
    days: int,
    *,
    now: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Validity:
    """``days`` from ``now`` (minus the clock skew), never past the issuer's end; ``start``/``end``
    override exactly (tests make expired certificates with them)."""
    default = validity_for_days(now, days)
    # A certificate that outlives its CA would only promise what the chain cannot keep.
    default_end = min(default.not_after, issuer.not_valid_after_utc)
    validity = Validity(
        not_before=as_utc(start) if start is not None else default.not_before,
        not_after=as_utc(end) if end is not None else default_end,
    )
    if validity.not_after <= validity.not_before:
        raise PkiError(f"validity ends ({validity.not_after}) before it starts ({validity.not_before})")
    return validity


def validity_for_days(now: datetime, days: int) -> Validity:
    if days < 1:
        raise PkiError(f"--days {days}: must be at least 1")
    return Validity(not_before=now - CLOCK_SKEW, not_after=now + timedelta(days=days))


def _cert_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: Validity
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
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ec_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# ---------------------------------------------------------------------------------------- encodings


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def now_utc() -> datetime:
    # Whole seconds: X.509 times have no fractions, and comparisons with what was written must agree.
    return datetime.now(UTC).replace(microsecond=0)


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

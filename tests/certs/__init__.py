"""Helpers shared by the certs tests (pytest fixtures live in each test module)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import certs
from certs import PkiPaths
from certs.crl import build_crl


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """The first CRL of the file (the root's in crl.pem)."""
    return x509.load_pem_x509_crl(path.read_bytes())


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file, in order."""
    end = b"-----END X509 CRL-----"
    blocks = [block + end for block in path.read_bytes().split(end) if block.strip()]
    return [x509.load_pem_x509_crl(block) for block in blocks]


def der_of(path: Path) -> bytes:
    return load_cert(path).public_bytes(serialization.Encoding.DER)


def self_signed_der(attributes: list[tuple[x509.ObjectIdentifier, str]]) -> bytes:
    """A throwaway certificate with exactly the given subject, to feed identity_from_der odd subjects."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


CN = NameOID.COMMON_NAME
OU = NameOID.ORGANIZATIONAL_UNIT_NAME
O = NameOID.ORGANIZATION_NAME  # noqa: E741


def make_legacy_pki(root: Path) -> PkiPaths:
    """A PKI as ``fleet certs init`` made it before the issuing CA: root with path length 0, no
    issuing.pem/.key, crl.pem with the root's CRL only (number 1)."""
    pki = certs.init_pki(root)
    pki.issuing_cert.unlink()
    pki.issuing_key.unlink()
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    current = load_cert(pki.ca_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(current.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(current.not_valid_before_utc)
        .not_valid_after(current.not_valid_after_utc)
    )
    for extension in current.extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints):
            value = x509.BasicConstraints(ca=True, path_length=0)
        builder = builder.add_extension(value, critical=extension.critical)
    legacy = builder.sign(key, hashes.SHA256())
    pki.ca_cert.write_bytes(legacy.public_bytes(serialization.Encoding.PEM))
    pki.crl.write_bytes(build_crl(legacy, key, {}, number=1, now=datetime.now(UTC).replace(microsecond=0)))
    return pki

"""Helpers shared by the certs tests (pytest fixtures live in each test module)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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

"""The certificate revocation list: the one record of which certificates the brokers must refuse."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.errors import PkiError

# OpenSSL (and so Mosquitto) refuses *every* client once the CRL's next_update has passed, not just the
# revoked ones; a short-lived CRL would need a re-signing job or the fleet goes dark. So it is signed
# for ten years, and every revocation re-signs it anyway.
CRL_VALIDITY = timedelta(days=3650)


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Mapping[int, datetime],
    *,
    number: int,
    now: datetime,
) -> bytes:
    """A PEM CRL listing ``revoked`` (serial -> revocation time), signed by the CA."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def parse_verified_crl(data: bytes, *, source: str, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Parse a PEM CRL and check it was signed by ``ca_cert``; ``source`` names the file in errors."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"{source}: not a PEM CRL: {exc}") from exc
    ca_public_key = ca_cert.public_key()
    if not isinstance(ca_public_key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{source}: the CA key is not ECDSA, cannot verify the CRL")
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_public_key):
        raise PkiError(f"{source}: not signed by the CA (forged, or left over from another PKI)")
    return crl


def revoked_entries(crl: x509.CertificateRevocationList) -> dict[int, datetime]:
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0

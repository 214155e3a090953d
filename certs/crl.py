"""Certificate revocation lists: the one record of which certificates the brokers must refuse.

``crl.pem`` holds one CRL per CA of the PKI, concatenated: the root's first (it lists revoked
certificates the root issued: controllers, operators, the server, devices of a PKI without an
issuing CA, and the issuing CA itself), then the issuing CA's (devices). OpenSSL loads every CRL of
the file and picks the one whose issuer issued the certificate it checks. Each CRL carries its own
CRL number, which only ever grows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
    crl = _load_crl(data, source)
    if crl.issuer != ca_cert.subject:
        raise PkiError(f"{source}: not signed by the CA (forged, or left over from another PKI)")
    _check_signature(crl, ca_cert, source)
    return crl


def _load_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"{source}: not a PEM CRL: {exc}") from exc


def _check_signature(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate, source: str) -> None:
    ca_public_key = ca_cert.public_key()
    if not isinstance(ca_public_key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{source}: the CA key is not ECDSA, cannot verify the CRL")
    if not crl.is_signature_valid(ca_public_key):
        raise PkiError(f"{source}: not signed by the CA (forged, or left over from another PKI)")


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def parse_verified_crls(
    data: bytes, *, source: str, cas: Sequence[x509.Certificate]
) -> dict[x509.Name, x509.CertificateRevocationList]:
    """Every CRL of a PEM file (issuer subject -> CRL), each checked to be signed by one of ``cas``.

    A CRL from any other issuer, or a second CRL of the same CA, is an error; a CA without a CRL in
    the file is the caller's business (``source`` names the file in errors).
    """
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise PkiError(f"{source}: not a PEM CRL: no X509 CRL block")
    crls: dict[x509.Name, x509.CertificateRevocationList] = {}
    by_subject = {ca.subject: ca for ca in cas}
    for block in blocks:
        crl = _load_crl(block, source)
        ca = by_subject.get(crl.issuer)
        if ca is None:
            raise PkiError(f"{source}: not signed by the CA (forged, or left over from another PKI)")
        _check_signature(crl, ca, source)
        if crl.issuer in crls:
            raise PkiError(f"{source}: two CRLs of {crl.issuer.rfc4514_string()}")
        crls[crl.issuer] = crl
    return crls


def ensure_not_older(previous_number: int, crl: x509.CertificateRevocationList) -> int:
    """Return ``crl``'s CRL number; ``PkiError`` if it is lower than ``previous_number`` (already seen).

    A lower number means an older CRL, which may lack revocations made since: someone restored an
    old backup or replayed an old file. Equal is fine (the same CRL read again).
    """
    number = crl_number(crl)
    if number < previous_number:
        raise PkiError(
            f"CRL of {crl.issuer.rfc4514_string()} has number {number}, lower than {previous_number} "
            "already seen: refusing an older CRL"
        )
    return number


def revoked_entries(crl: x509.CertificateRevocationList) -> dict[int, datetime]:
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0

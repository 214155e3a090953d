"""Revoking certificates and asking whether one is revoked, over the CRLs in ``crl.pem``.

Revoking a device needs only the issuing CA's key: its CRL is re-signed, the root's is copied
unchanged. So the root key can stay offline while an enrollment service revokes devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.authority import Issuer, ca_certs, issuer_of, load_authority, now_utc, read_bytes
from certs.crl import build_crl, crl_number, ensure_not_older, parse_verified_crls, revoked_entries
from certs.errors import PkiError
from certs.files import PendingFile, write_files
from certs.paths import PkiPaths


@dataclass(frozen=True)
class Revocations:
    """What ``crl.pem`` says: every revoked serial, and the CRL number of each CA's CRL."""

    serials: frozenset[int] = frozenset()
    numbers: Mapping[Issuer, int] = field(default_factory=dict)


def load_revocations(pki: PkiPaths, *, not_older_than: Revocations | None = None) -> Revocations:
    """Read and check ``crl.pem``: one CRL per CA of the PKI, each signed by its CA.

    With ``not_older_than`` (what the caller loaded before), a CRL whose number went down is refused
    (``PkiError``): an older file was put back and may lack revocations made since.
    """
    crls = _read_crls(pki)
    for kind, ca in ca_certs(pki).items():
        if kind not in crls:
            raise PkiError(
                f"{pki.crl}: has no CRL of the {kind} CA ({ca.subject.rfc4514_string()}), so OpenSSL refuses "
                f"every certificate that CA issued; `fleet certs revoke` or `fleet certs init {pki.root}` rewrites it"
            )
    seen = not_older_than.numbers if not_older_than is not None else {}
    numbers: dict[Issuer, int] = {}
    serials: set[int] = set()
    for kind, crl in crls.items():
        try:
            numbers[kind] = ensure_not_older(seen.get(kind, 0), crl)
        except PkiError as exc:
            raise PkiError(f"{pki.crl}: {exc}") from exc
        serials.update(revoked_entries(crl))
    return Revocations(frozenset(serials), numbers)


def load_revoked_serials(pki: PkiPaths) -> frozenset[int]:
    """The serials in the CRLs, after checking each CA signed its own (``PkiError`` if forged or unreadable)."""
    return load_revocations(pki).serials


def is_revoked(pki: PkiPaths, cert: x509.Certificate) -> bool:
    """Whether the CRL of the CA that issued ``cert`` lists it; ``PkiError`` if no CA of this PKI did."""
    kind = issuer_of(pki, cert)
    if kind is None:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()}: not issued by this CA")
    crl = _read_crls(pki).get(kind)
    if crl is None:
        raise PkiError(f"{pki.crl}: has no CRL of the {kind} CA")
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def revoke_certificate(pki: PkiPaths, cert: x509.Certificate, *, source: str | None = None) -> int:
    """Add ``cert`` to its CA's CRL and re-sign that CRL (number + 1); return the serial.

    Needs the key of that CA only. Revoking a revoked certificate changes nothing. ``source`` names
    the certificate in errors (its file).
    """
    kind = issuer_of(pki, cert)
    if kind is None:
        root = ca_certs(pki)[Issuer.ROOT]
        what = source or f"certificate {cert.subject.rfc4514_string()}"
        raise PkiError(f"{what}: not issued by this CA ({root.subject.rfc4514_string()})")
    with crl_lock(pki):
        authority = load_authority(pki, kind)
        current = _read_crls(pki) if pki.crl.exists() else {}  # lost or deleted: rebuild from nothing
        previous = current.get(kind)
        entries = revoked_entries(previous) if previous is not None else {}
        if cert.serial_number in entries:
            return cert.serial_number
        now = now_utc()
        entries[cert.serial_number] = now
        number = crl_number(previous) + 1 if previous is not None else fresh_crl_number(now)
        blocks: list[bytes] = []
        for other in ca_certs(pki):
            if other is kind:
                blocks.append(build_crl(authority.cert, authority.key, entries, number=number, now=now))
            elif other in current:
                blocks.append(current[other].public_bytes(serialization.Encoding.PEM))
            else:  # that CA's CRL is missing too: an empty one, or OpenSSL refuses all it issued
                missing = load_authority(pki, other)
                blocks.append(build_crl(missing.cert, missing.key, {}, number=fresh_crl_number(now), now=now))
        write_files([PendingFile(pki.crl, b"".join(blocks))])
    return cert.serial_number


def fresh_crl_number(now: datetime) -> int:
    """The number of a CRL rebuilt without its predecessor: the Unix time, which is above any count
    a broker can have seen (they start at 1 and grow by one per revocation)."""
    return int(now.timestamp())


def _read_crls(pki: PkiPaths) -> dict[Issuer, x509.CertificateRevocationList]:
    cas = ca_certs(pki)
    by_subject = parse_verified_crls(read_bytes(pki.crl), source=str(pki.crl), cas=list(cas.values()))
    return {kind: by_subject[ca.subject] for kind, ca in cas.items() if ca.subject in by_subject}


@contextlib.contextmanager
def crl_lock(pki: PkiPaths) -> Iterator[None]:
    """Exclusive lock for a read-modify-write of crl.pem: two revocations at once must not lose one."""
    try:
        fd = os.open(pki.crl_lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PkiError(f"{pki.crl_lock}: cannot open the lock: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

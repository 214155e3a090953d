"""Issuing device certificates for requests that arrive over the network (pure functions over bytes).

An enrollment service (the controller) uses two of them:

- **issue or renew** ``chain = issue_from_csr(pki, csr_pem, node_id=..., days=...)``: once it has
  decided who the requester is (a bootstrap token, the TLS client certificate of a device renewing
  before expiry, or :func:`verify_possession_proof`), it gets the chain to send back.
- **recover after expiry** ``node_id = verify_possession_proof(pki, old_cert_pem, csr_pem, proof)``:
  a device whose certificate expired (it could not renew in time, so TLS no longer lets it in)
  proves it still holds the old key; then ``issue_from_csr(pki, csr_pem, node_id=node_id)``.

Keys: the agent generates **EC P-256** (``ec.generate_private_key(ec.SECP256R1())``), as every other
key of this PKI: TLS 1.2 signs with it everywhere (Ed25519 needs TLS 1.3 on both ends), and secure
elements and TPMs hold it. Anything else is refused.

The possession proof is ``old_key.sign(csr_der, ec.ECDSA(hashes.SHA256()))``: ECDSA with SHA-256,
DER-encoded signature (what ``cryptography`` returns), over the DER encoding of the CSR (the bytes
inside its PEM armour, ``csr.public_bytes(Encoding.DER)``). Binding the proof to the CSR means it
cannot be replayed for another key; DER starts with 0x30, so it cannot collide with the content
the same key signs in a TLS handshake.

Every refusal raises :class:`~certs.errors.RequestRefused` (a ``PkiError``) with a one-line reason
and a :class:`~certs.errors.Refusal` code; a ``PkiError`` of another type is a problem of the PKI
itself (unreadable CA, broken CRL), not of the request.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.authority import (
    CLOCK_SKEW,
    DEVICE_DAYS,
    as_utc,
    build_leaf,
    cert_pem,
    device_authority,
    issuer_of,
    leaf_validity,
    now_utc,
)
from certs.errors import CertificateRejected, PkiError, Refusal, RequestRefused
from certs.identity import Role, identity_from_cert, subject_for
from certs.paths import PkiPaths
from certs.pki import ensure_name_available
from certs.revocation import is_revoked
from fleet.protocol.ids import InvalidNodeId, validate_node_id

# How long after expiry a device may still prove possession of its old key to get a new certificate.
RECOVERY_GRACE = timedelta(days=365)


def issue_from_csr(
    pki: PkiPaths, csr_pem: bytes, *, node_id: str, days: int = DEVICE_DAYS, now: datetime | None = None
) -> bytes:
    """A device certificate for the key in ``csr_pem``, as PEM: the certificate, then the issuing CA.

    Checks the CSR's self-signature, its key (EC P-256 only) and its subject CN (must be ``node_id``;
    a CSR without CN gets it). Everything else the CSR asks for (other subject attributes,
    extensions) is ignored: the subject is ``CN=<node_id>, OU=device, O=fleet``, the usage TLS client
    authentication. ``node_id`` must be a node id that no operator or controller identity (nor a
    reserved name) uses. Writes nothing: the caller keeps the chain if it wants to revoke it later
    (:func:`certs.revocation.revoke_certificate`).
    """
    try:
        validate_node_id(node_id)
    except InvalidNodeId as exc:
        raise RequestRefused(Refusal.WRONG_NAME, f"device name {exc.reason}") from exc
    _, public_key = _checked_csr(csr_pem, node_id)
    try:
        ensure_name_available(pki, node_id, Role.DEVICE)
    except PkiError as exc:
        raise RequestRefused(Refusal.WRONG_NAME, str(exc)) from exc
    issuer = device_authority(pki)
    validity = leaf_validity(issuer.cert, days, now=as_utc(now) if now is not None else now_utc())
    cert = build_leaf(issuer, subject_for(node_id, Role.DEVICE), public_key, Role.DEVICE, validity)
    return cert_pem(cert) + issuer.chain_pem


def verify_possession_proof(
    pki: PkiPaths,
    old_cert_pem: bytes,
    csr_pem: bytes,
    proof_sig: bytes,
    *,
    now: datetime | None = None,
    grace: timedelta = RECOVERY_GRACE,
) -> str:
    """The node id of a device that proves it holds the key of its old certificate; refuse otherwise.

    ``old_cert_pem``: the old device certificate (its chain may follow). It must be issued by this
    PKI (root or issuing CA), be a device certificate, not be revoked, and be valid at ``now`` or
    have expired less than ``grace`` ago. ``proof_sig``: ECDSA/SHA-256 signature by the old key over
    the CSR's DER bytes (module docstring). The CSR itself must pass :func:`issue_from_csr`'s checks
    for the same node id.
    """
    moment = as_utc(now) if now is not None else now_utc()
    try:
        old = x509.load_pem_x509_certificate(old_cert_pem)
    except ValueError as exc:
        raise RequestRefused(Refusal.BAD_REQUEST, "old certificate: not a PEM certificate") from exc
    subject = old.subject.rfc4514_string()
    if issuer_of(pki, old) is None:
        raise RequestRefused(
            Refusal.FOREIGN_ISSUER,
            f"old certificate {subject}: not issued by this PKI (issuer {old.issuer.rfc4514_string()})",
        )
    try:
        identity = identity_from_cert(old)
    except CertificateRejected as exc:
        raise RequestRefused(Refusal.WRONG_ROLE, f"old certificate {subject}: {exc}") from exc
    if identity.role is not Role.DEVICE:
        raise RequestRefused(
            Refusal.WRONG_ROLE, f"old certificate {subject}: a {identity.role}, not a device certificate"
        )
    if is_revoked(pki, old):
        raise RequestRefused(
            Refusal.REVOKED, f"old certificate of {identity.name} (serial {old.serial_number:x}) is revoked"
        )
    if moment + CLOCK_SKEW < old.not_valid_before_utc:
        raise RequestRefused(
            Refusal.EXPIRED, f"old certificate of {identity.name}: not valid before {old.not_valid_before_utc}"
        )
    if moment > old.not_valid_after_utc + grace:
        raise RequestRefused(
            Refusal.EXPIRED,
            f"old certificate of {identity.name} expired {old.not_valid_after_utc:%Y-%m-%d}, "
            f"more than {grace.days} days ago: enroll it anew",
        )
    csr, _ = _checked_csr(csr_pem, identity.name)
    old_key = old.public_key()
    if not isinstance(old_key, ec.EllipticCurvePublicKey):
        raise RequestRefused(
            Refusal.PROOF, f"old certificate of {identity.name}: not an EC key, cannot check the proof"
        )
    try:
        old_key.verify(proof_sig, csr.public_bytes(serialization.Encoding.DER), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise RequestRefused(
            Refusal.PROOF, f"possession proof for {identity.name}: not a signature by the old key over the CSR"
        ) from exc
    return identity.name


def _checked_csr(csr_pem: bytes, node_id: str) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise RequestRefused(Refusal.BAD_REQUEST, "not a PEM certificate signing request") from exc
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        kind = public_key.curve.name if isinstance(public_key, ec.EllipticCurvePublicKey) else type(public_key).__name__
        raise RequestRefused(
            Refusal.KEY_TYPE, f"CSR key is {_key_name(kind)}: only EC P-256 (secp256r1) keys are issued"
        )
    if not csr.is_signature_valid:
        raise RequestRefused(Refusal.CSR_SIGNATURE, "CSR signature does not verify with the key it carries")
    digest = csr.signature_hash_algorithm
    if not isinstance(digest, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
        used = digest.name if digest is not None else "none"
        raise RequestRefused(Refusal.CSR_SIGNATURE, f"CSR signed with {used}: only SHA-256/384/512 are accepted")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) > 1:
        raise RequestRefused(Refusal.WRONG_NAME, f"CSR subject has {len(names)} CNs, expected one")
    if names and names[0].value != node_id:
        raise RequestRefused(Refusal.WRONG_NAME, f"CSR subject CN {names[0].value!r} is not the node id {node_id!r}")
    return csr, public_key


def _key_name(kind: str) -> str:
    # "_RSAPublicKey" and the like: a readable word for the one-line error.
    return kind.strip("_").removesuffix("PublicKey") or kind

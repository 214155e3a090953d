"""The ways the PKI says no."""

from __future__ import annotations

from enum import StrEnum

from fleet.protocol.errors import FleetError


class PkiError(FleetError):
    """A PKI file is missing, unreadable or inconsistent, or a request on it is refused.

    The message names the file or the identity, so the CLI can print it as the one-line error.
    """


class CertificateRejected(FleetError):
    """A (peer) certificate carries no usable fleet identity; the message says why."""


class Refusal(StrEnum):
    """Why an enrollment or renewal request was refused (for the enrollment service's status and metrics)."""

    BAD_REQUEST = "bad_request"  # not a CSR / certificate / signature at all
    CSR_SIGNATURE = "csr_signature"  # the CSR is not signed by the key it carries
    KEY_TYPE = "key_type"  # not an EC P-256 key
    WRONG_NAME = "wrong_name"  # CN differs from the node id, or the name belongs to someone else
    FOREIGN_ISSUER = "foreign_issuer"  # the old certificate was not issued by this PKI
    WRONG_ROLE = "wrong_role"  # the old certificate is no device certificate
    REVOKED = "revoked"  # the old certificate is on the CRL
    EXPIRED = "expired"  # expired longer ago than the grace period (or not valid yet)
    PROOF = "proof"  # the possession proof is not a signature by the old key over the CSR


class RequestRefused(PkiError):
    """An enrollment/renewal request is refused; ``reason`` says which check failed, the message says why."""

    def __init__(self, reason: Refusal, message: str) -> None:
        self.reason = reason
        super().__init__(message)

"""The fleet PKI: an offline root CA, a device-issuing CA, server, controller, operator and device
certificates, their CRLs, the release key.

A certificate's subject carries its identity (``CN=<name>, OU=<role>, O=fleet``); the broker reads it
with :func:`identity_from_der` on every connection.
"""

from certs.authority import (
    CONTROLLER_DAYS,
    DEFAULT_DAYS,
    DEVICE_DAYS,
    ISSUING_DAYS,
    OPERATOR_DAYS,
    Issuer,
)
from certs.control import load_control_key
from certs.crl import ensure_not_older
from certs.enroll import RECOVERY_GRACE, issue_from_csr, verify_possession_proof
from certs.errors import CertificateRejected, PkiError, Refusal, RequestRefused
from certs.identity import AccessRole, Identity, Role, access_role_of, identity_from_cert, identity_from_der
from certs.identity_files import recover_identity_files, replace_identity_files
from certs.paths import ClientPaths, PkiPaths
from certs.pki import (
    IdentityInfo,
    PkiUpgrade,
    Renewal,
    init_pki,
    issue_controller,
    issue_device,
    issue_operator,
    list_identities,
    renew,
    revoke,
    upgrade_pki,
)
from certs.revocation import Revocations, is_revoked, load_revocations, load_revoked_serials, revoke_certificate

__all__ = [
    "CONTROLLER_DAYS",
    "DEFAULT_DAYS",
    "DEVICE_DAYS",
    "ISSUING_DAYS",
    "OPERATOR_DAYS",
    "RECOVERY_GRACE",
    "AccessRole",
    "CertificateRejected",
    "ClientPaths",
    "Identity",
    "IdentityInfo",
    "Issuer",
    "PkiError",
    "PkiPaths",
    "PkiUpgrade",
    "Refusal",
    "Renewal",
    "RequestRefused",
    "Revocations",
    "Role",
    "access_role_of",
    "ensure_not_older",
    "identity_from_cert",
    "identity_from_der",
    "init_pki",
    "is_revoked",
    "issue_controller",
    "issue_device",
    "issue_from_csr",
    "issue_operator",
    "list_identities",
    "load_control_key",
    "load_revocations",
    "load_revoked_serials",
    "recover_identity_files",
    "renew",
    "replace_identity_files",
    "revoke",
    "revoke_certificate",
    "upgrade_pki",
    "verify_possession_proof",
]

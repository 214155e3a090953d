"""The fleet PKI: CA, server, controller, operator and device certificates, the CRL, the release key.

A certificate's subject carries its identity (``CN=<name>, OU=<role>, O=fleet``); the broker reads it
with :func:`identity_from_der` on every connection.
"""

from certs.errors import CertificateRejected, PkiError
from certs.identity import Identity, Role, identity_from_cert, identity_from_der
from certs.paths import ClientPaths, PkiPaths
from certs.pki import (
    DEFAULT_DAYS,
    IdentityInfo,
    init_pki,
    issue_controller,
    issue_device,
    issue_operator,
    list_identities,
    load_revoked_serials,
    revoke,
)

__all__ = [
    "DEFAULT_DAYS",
    "CertificateRejected",
    "ClientPaths",
    "Identity",
    "IdentityInfo",
    "PkiError",
    "PkiPaths",
    "Role",
    "identity_from_cert",
    "identity_from_der",
    "init_pki",
    "issue_controller",
    "issue_device",
    "issue_operator",
    "list_identities",
    "load_revoked_serials",
    "revoke",
]

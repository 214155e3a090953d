"""Who a certificate speaks for: name and role live in its subject (CN=<name>, OU=<role>, O=fleet)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.errors import CertificateRejected
from fleet.protocol.ids import is_valid_node_id

ORGANIZATION = "fleet"
CONTROLLER_NAME = "fleet-controller"
OPERATOR_NAME = "operator"
SERVER_NAME = "fleet-server"
# Names of the identities ``init`` creates; nobody else may take them, whatever the role.
RESERVED_NAMES = frozenset({CONTROLLER_NAME, OPERATOR_NAME, SERVER_NAME})
ROOT_CA_COMMON_NAME = "fleet CA"
ISSUING_CA_COMMON_NAME = "fleet device CA"


class Role(StrEnum):
    DEVICE = "device"
    CONTROLLER = "controller"
    OPERATOR = "operator"
    SERVER = "server"


class AccessRole(StrEnum):
    """What an operator may do on the controller's HTTP API; each role includes the ones before it.

    An operator certificate carries its access role in the subject's ``title`` attribute
    (``CN=alice, OU=operator, O=fleet, title=admin``); an operator certificate without one (issued
    before access roles existed) is an ``operator``. API tokens carry one as well.
    """

    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # + commands, rollouts (start, pause, resume, abort), labels
    ADMIN = "admin"  # + tokens, identities, releases

    def allows(self, needed: AccessRole) -> bool:
        """Whether this role may do what ``needed`` may."""
        return _ACCESS_RANK[self] >= _ACCESS_RANK[needed]


_ACCESS_RANK = {AccessRole.VIEWER: 0, AccessRole.OPERATOR: 1, AccessRole.ADMIN: 2}
LEGACY_OPERATOR_ACCESS = AccessRole.OPERATOR
"""The access role of an operator certificate without a ``title`` (issued before access roles)."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    serial: int


def subject_for(name: str, role: Role, access: AccessRole | None = None) -> x509.Name:
    """``CN=<name>, OU=<role>, O=fleet``, plus ``title=<access>`` for an operator (only operators have one)."""
    if access is not None and role is not Role.OPERATOR:
        raise ValueError(f"only operator certificates carry an access role, not {role}")
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ]
    if access is not None:
        attributes.append(x509.NameAttribute(NameOID.TITLE, access.value))
    return x509.Name(attributes)


def ca_subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


ROOT_CA_SUBJECT = ca_subject(ROOT_CA_COMMON_NAME)
ISSUING_CA_SUBJECT = ca_subject(ISSUING_CA_COMMON_NAME)


def identity_from_der(der: bytes) -> Identity:
    """The identity of a DER certificate (as the broker gets it from the TLS layer).

    Only parses the certificate and reads two subject attributes; trust (chain, expiry, CRL) is
    the TLS layer's job and has already happened when the broker calls this. Measured at ~15 us per
    call, so there is no cache to keep bounded or invalidate.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateRejected(f"not a DER X.509 certificate: {exc}") from exc
    return identity_from_cert(cert)


def identity_from_cert(cert: x509.Certificate) -> Identity:
    name = _single_attribute(cert, NameOID.COMMON_NAME, "CN")
    role = _role(_single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"))
    # Every name is a client id and a topic level, so an odd CN must not get in under any role.
    if not is_valid_node_id(name):
        raise CertificateRejected(f"subject CN {name!r} is not a valid node id (role {role})")
    # The issuing CA's key lives on the (online) enrollment host and signs devices only; a controller
    # or operator certificate from it means that key was misused. The TLS layer has verified the
    # chain, so the issuer name is the CA that really signed this certificate.
    if cert.issuer == ISSUING_CA_SUBJECT and role is not Role.DEVICE:
        raise CertificateRejected(f"{role} {name!r} issued by the device-issuing CA, which issues devices only")
    return Identity(name=name, role=role, serial=cert.serial_number)


def access_role_of(cert: x509.Certificate) -> AccessRole | None:
    """The API access role of an operator certificate (``title``; none: ``LEGACY_OPERATOR_ACCESS``);
    None for every other role. ``CertificateRejected`` for an unknown or repeated title."""
    if identity_from_cert(cert).role is not Role.OPERATOR:
        return None
    titles = cert.subject.get_attributes_for_oid(NameOID.TITLE)
    if not titles:
        return LEGACY_OPERATOR_ACCESS
    if len(titles) > 1:
        raise CertificateRejected(f"subject has {len(titles)} title attributes, expected at most one")
    value = titles[0].value
    try:
        return AccessRole(value if isinstance(value, str) else "")
    except ValueError:
        known = ", ".join(role.value for role in AccessRole)
        raise CertificateRejected(f"unknown access role title={value!r} (known: {known})") from None


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    attributes = cert.subject.get_attributes_for_oid(oid)
    if not attributes:
        raise CertificateRejected(f"subject has no {label} (expected CN=<name>, OU=<role>, O=fleet)")
    if len(attributes) > 1:
        raise CertificateRejected(f"subject has {len(attributes)} {label} attributes, expected one")
    value = attributes[0].value
    if not isinstance(value, str):
        raise CertificateRejected(f"subject {label} is not a string")
    return value


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        known = ", ".join(role.value for role in Role)
        raise CertificateRejected(f"unknown role OU={value!r} (known: {known})") from None

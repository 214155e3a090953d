"""Creating and running the fleet PKI: an offline root, a device-issuing CA, a server, controllers,
operators and devices, and their CRLs.

Every operation computes all it will write first and then writes each file atomically, so an error
(a name collision, an unreadable CA key, a full disk) leaves the directory as it was.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from certs.authority import (
    CONTROLLER_DAYS,
    DEFAULT_DAYS,
    DEVICE_DAYS,
    ISSUING_DAYS,
    OPERATOR_DAYS,
    Authority,
    Issuer,
    build_leaf,
    ca_certs,
    cert_pem,
    device_authority,
    issuer_of,
    key_pem,
    leaf_validity,
    load_authority,
    new_issuing,
    new_key,
    new_root,
    now_utc,
    public_key_pem,
    read_bytes,
    read_cert,
    read_root_cert,
    recertify_root,
    root_allows_issuing_ca,
    validity_for_days,
)
from certs.crl import build_crl, parse_verified_crls
from certs.errors import CertificateRejected, PkiError
from certs.files import PendingFile, write_files
from certs.identity import (
    CONTROLLER_NAME,
    OPERATOR_NAME,
    RESERVED_NAMES,
    SERVER_NAME,
    AccessRole,
    Role,
    access_role_of,
    identity_from_cert,
    subject_for,
)
from certs.identity_files import recover_identity_files, replace_identity_files
from certs.paths import CONTROLLERS_DIR, DEVICES_DIR, OPERATORS_DIR, ClientPaths, PkiPaths
from certs.revocation import crl_lock, fresh_crl_number, load_revoked_serials, revoke_certificate
from fleet.protocol.ids import InvalidNodeId, validate_node_id

DEFAULT_SERVER_SANS = ("localhost", "127.0.0.1", "::1")
# Default lifetime per role when issuing or renewing; the server's is the root's (``init --days``).
DEFAULT_ROLE_DAYS = {
    Role.DEVICE: DEVICE_DAYS,
    Role.CONTROLLER: CONTROLLER_DAYS,
    Role.OPERATOR: OPERATOR_DAYS,
    Role.SERVER: DEFAULT_DAYS,
}

_ROLE_ORDER = {Role.SERVER: 0, Role.CONTROLLER: 1, Role.OPERATOR: 2, Role.DEVICE: 3}
_ROLE_DIRS = {Role.DEVICE: DEVICES_DIR, Role.OPERATOR: OPERATORS_DIR, Role.CONTROLLER: CONTROLLERS_DIR}


@dataclass(frozen=True)
class IdentityInfo:
    """One line of ``fleet certs ls``."""

    name: str
    role: Role
    serial: int
    not_after: datetime
    revoked: bool
    cert: Path
    issuer: Issuer | None = None  # None: signed by no CA of this PKI (left over from a replaced one)
    access: AccessRole | None = None  # operators only: what they may do on the controller's HTTP API


@dataclass(frozen=True)
class PkiUpgrade:
    """What :func:`upgrade_pki` changed in an existing PKI."""

    written: tuple[Path, ...]
    issuing_added: bool
    root_recertified: bool  # ca.pem re-signed with path length 1 (same key, subject and validity)
    crl_completed: bool  # crl.pem got the CRL of a CA that had none
    control_key_added: bool = False  # control.key/control.pub (the control-plane signing key) were made


@dataclass(frozen=True)
class Renewal:
    """What :func:`renew` did."""

    paths: ClientPaths
    role: Role
    serial: int
    issuer: Issuer
    not_after: datetime
    recovered: str | None  # an interrupted earlier renewal that was repaired first


# ---------------------------------------------------------------------------------------------- public


def init_pki(
    root: Path | str,
    *,
    force: bool = False,
    extra_sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
) -> PkiPaths:
    """Create a root CA, the device-issuing CA and what a fleet needs to start: server, controller,
    operator, release key, control key (certs.control), CRLs.

    ``days`` is the validity of the root and of the server certificate; the issuing CA gets
    ``ISSUING_DAYS``, the default controller and operator ``CONTROLLER_DAYS``/``OPERATOR_DAYS``, none
    beyond the root. With ``force`` an existing PKI is replaced; identities issued by the old CAs
    stay on disk but are no longer trusted. An existing PKI without ``force`` is an error (see
    :func:`upgrade_pki` for adding what an older version did not create).
    """
    pki = PkiPaths(Path(root))
    if pki.ca_cert.exists() and not force:
        raise PkiError(f"{pki.ca_cert}: already exists (--force replaces the whole PKI)")
    sans = _server_sans(extra_sans)
    now = now_utc()
    ca = new_root(validity_for_days(now, days))
    issuing = new_issuing(ca, ISSUING_DAYS, now=now)
    release_key = ed25519.Ed25519PrivateKey.generate()
    control_key = ed25519.Ed25519PrivateKey.generate()
    files = [
        PendingFile(pki.ca_cert, cert_pem(ca.cert)),
        PendingFile(pki.ca_key, key_pem(ca.key), private=True),
        PendingFile(pki.issuing_cert, cert_pem(issuing.cert)),
        PendingFile(pki.issuing_key, key_pem(issuing.key), private=True),
        *_leaf_files(ca, SERVER_NAME, Role.SERVER, pki.server, days, now=now, sans=sans),
        *_leaf_files(ca, CONTROLLER_NAME, Role.CONTROLLER, pki.default_controller, CONTROLLER_DAYS, now=now),
        # The shared operator of `init` is an admin: whoever runs init holds ca.key anyway.
        *_leaf_files(
            ca, OPERATOR_NAME, Role.OPERATOR, pki.default_operator, OPERATOR_DAYS, now=now, access=AccessRole.ADMIN
        ),
        PendingFile(pki.release_key, key_pem(release_key), private=True),
        PendingFile(pki.release_pub, public_key_pem(release_key.public_key())),
        *_control_key_files(pki, control_key),
        PendingFile(
            pki.crl,
            build_crl(ca.cert, ca.key, {}, number=1, now=now)
            + build_crl(issuing.cert, issuing.key, {}, number=1, now=now),
        ),
    ]
    write_files(files)
    return pki


def upgrade_pki(pki: PkiPaths, *, issuing_days: int = ISSUING_DAYS) -> PkiUpgrade:
    """Add to an existing PKI what it lacks: the issuing CA (and its CRL in crl.pem), the
    control-plane signing key (control.key, control.pub).

    A root made before the issuing CA existed has path length 0, under which OpenSSL accepts no CA;
    it is re-certified first: same key, subject, validity and key identifier, path length 1, so
    every certificate it signed stays valid and only verifiers holding the new ``ca.pem`` accept
    devices from the issuing CA. Identities on disk are not touched. Re-running after a crash
    completes what is missing; ``PkiError`` when nothing is.
    """
    read_root_cert(pki)  # a missing PKI says so
    with crl_lock(pki):
        return _upgrade(pki, issuing_days)


def _upgrade(pki: PkiPaths, issuing_days: int) -> PkiUpgrade:
    root = load_authority(pki, Issuer.ROOT)
    now = now_utc()
    files: list[PendingFile] = []
    recertified = not root_allows_issuing_ca(root.cert)
    if recertified:
        root = recertify_root(root)
        files.append(PendingFile(pki.ca_cert, cert_pem(root.cert)))
    issuing_added = not pki.issuing_cert.exists()
    if issuing_added:
        issuing = new_issuing(root, issuing_days, now=now)
        files += [
            PendingFile(pki.issuing_key, key_pem(issuing.key), private=True),
            PendingFile(pki.issuing_cert, cert_pem(issuing.cert)),
        ]
    else:
        issuing = load_authority(pki, Issuer.ISSUING)
    crl, crl_completed = _completed_crl(pki, root, issuing, now=now)
    if crl is not None:
        files.append(PendingFile(pki.crl, crl))
    control_added = not pki.control_key.exists()
    if control_added:
        files += _control_key_files(pki, ed25519.Ed25519PrivateKey.generate())
    elif not pki.control_pub.exists():  # the public half lost: derived again from the key
        files.append(PendingFile(pki.control_pub, _control_pub_pem(pki)))
    if not files:
        raise PkiError(f"{pki.ca_cert}: already exists, with its issuing CA (--force replaces the whole PKI)")
    write_files(files)
    return PkiUpgrade(
        tuple(pending.path for pending in files), issuing_added, recertified, crl_completed, control_added
    )


def _control_key_files(pki: PkiPaths, key: ed25519.Ed25519PrivateKey) -> list[PendingFile]:
    # The key last: a crash between the two leaves no key, and the next upgrade makes both again.
    return [
        PendingFile(pki.control_pub, public_key_pem(key.public_key())),
        PendingFile(pki.control_key, key_pem(key), private=True),
    ]


def _control_pub_pem(pki: PkiPaths) -> bytes:
    key = serialization.load_pem_private_key(read_bytes(pki.control_key), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{pki.control_key}: not an Ed25519 private key")
    return public_key_pem(key.public_key())


def issue_device(
    pki: PkiPaths,
    node_id: str,
    *,
    force: bool = False,
    days: int = DEVICE_DAYS,
    not_valid_before: datetime | None = None,
    not_valid_after: datetime | None = None,
) -> ClientPaths:
    """Issue the certificate of device ``node_id`` (its CN, so its MQTT client id and topic level).

    Signed by the issuing CA (the root in a PKI without one); ``cert.pem`` holds the certificate
    followed by the issuing CA's, the chain a TLS client sends. ``not_valid_before`` /
    ``not_valid_after`` override ``days`` exactly (tests use them to make an expired certificate);
    dates without a timezone are taken as UTC.
    """
    return _issue(pki, node_id, Role.DEVICE, force=force, days=days, start=not_valid_before, end=not_valid_after)


def issue_operator(
    pki: PkiPaths,
    name: str,
    *,
    force: bool = False,
    days: int = OPERATOR_DAYS,
    access: AccessRole = AccessRole.OPERATOR,
) -> ClientPaths:
    """Issue a personal operator identity, so two operators' tools do not kick each other off the broker.

    ``access`` is what it may do on the controller's HTTP API (viewer, operator, admin), written
    into the certificate's subject."""
    return _issue(pki, name, Role.OPERATOR, force=force, days=days, access=access)


def issue_controller(pki: PkiPaths, name: str, *, force: bool = False, days: int = CONTROLLER_DAYS) -> ClientPaths:
    """Issue one more controller instance identity (each instance needs its own MQTT client id)."""
    return _issue(pki, name, Role.CONTROLLER, force=force, days=days)


def renew(pki: PkiPaths, name: str, *, days: int | None = None) -> Renewal:
    """Re-issue identity ``name`` (any role, also those ``init`` made) with a new key.

    Devices get the issuing CA (so renewal moves a root-issued device of an upgraded PKI to it),
    everything else the root. ``days`` defaults to the role's lifetime. The files are swapped
    crash-safely (certs.identity_files); the old certificate is not revoked (revoke it first if its
    key may have leaked: revocation applies to the certificate on disk).
    """
    _validate_name(name, "identity")
    read_root_cert(pki)  # a missing PKI says so, rather than "no identity"
    paths = find_identity(pki, name)
    recovered = recover_identity_files(paths)
    old = read_cert(paths.cert)
    try:
        identity = identity_from_cert(old)
    except CertificateRejected as exc:
        raise PkiError(f"{paths.cert}: {exc}") from exc
    if identity.name != name:
        raise PkiError(f"{paths.cert}: its CN is {identity.name!r}, not {name!r}")
    authority = device_authority(pki) if identity.role is Role.DEVICE else load_authority(pki, Issuer.ROOT)
    validity = leaf_validity(authority.cert, days or DEFAULT_ROLE_DAYS[identity.role], now=now_utc())
    sans = _sans_of(old) if identity.role is Role.SERVER else ()
    key = new_key()
    # An operator keeps its access role; one without (issued before access roles) stays without.
    access = access_role_of(old) if old.subject.get_attributes_for_oid(NameOID.TITLE) else None
    subject = subject_for(name, identity.role, access)
    cert = build_leaf(authority, subject, key.public_key(), identity.role, validity, sans=sans)
    replace_identity_files(paths, cert_pem=cert_pem(cert) + authority.chain_pem, key_pem=key_pem(key))
    return Renewal(paths, identity.role, cert.serial_number, authority.kind, validity.not_after, recovered)


def revoke(pki: PkiPaths, name: str) -> int:
    """Add the current certificate of identity ``name`` to its CA's CRL and re-sign it; return its serial.

    Revoking an already revoked certificate changes nothing.
    """
    _validate_name(name, "identity")
    read_root_cert(pki)  # a missing PKI says so, rather than "no identity"
    paths = find_identity(pki, name)
    return revoke_certificate(pki, read_cert(paths.cert), source=str(paths.cert))


def list_identities(pki: PkiPaths, roles: Iterable[Role] | None = None) -> list[IdentityInfo]:
    """Every identity on disk (of ``roles`` only, if given), server first, then controllers,
    operators and devices by name."""
    wanted = frozenset(Role) if roles is None else frozenset(roles)
    revoked = load_revoked_serials(pki)
    cas = ca_certs(pki)
    infos = [
        _identity_info(pki, paths.cert, revoked, cas)
        for _, role, paths in _existing_identities(pki, wanted)
        if role in wanted
    ]
    return sorted(infos, key=lambda info: (_ROLE_ORDER[info.role], info.name))


def find_identity(pki: PkiPaths, name: str) -> ClientPaths:
    """The files of identity ``name`` whatever its role (``init``'s defaults included)."""
    for candidate, _, paths in _existing_identities(pki):
        if candidate == name:
            return paths
    raise PkiError(f"no identity named {name!r} in {pki.root}")


def ensure_name_available(pki: PkiPaths, name: str, role: Role) -> None:
    """``PkiError`` if ``name`` is reserved or the name of an identity of another role on disk.

    One namespace for all roles: the name is the MQTT client id, and a device called "alice" would
    otherwise take over the session of (and look like) operator alice.
    """
    if name in RESERVED_NAMES:
        raise PkiError(f"{name!r} is reserved for an identity that `fleet certs init` creates")
    for other_role in _ROLE_DIRS:
        other = _paths_for(pki, other_role, name)
        if other_role is not role and _exists(other):
            raise PkiError(f"{name!r} is already the name of {other_role} identity {other.cert.parent}")


# ------------------------------------------------------------------------------------------- issuing


def _issue(
    pki: PkiPaths,
    name: str,
    role: Role,
    *,
    force: bool,
    days: int,
    start: datetime | None = None,
    end: datetime | None = None,
    access: AccessRole | None = None,
) -> ClientPaths:
    _validate_name(name, role)
    paths = _paths_for(pki, role, name)
    ensure_name_available(pki, name, role)
    if _exists(paths) and not force:
        raise PkiError(f"{paths.cert.parent}: {role} {name!r} already exists (--force replaces it)")
    issuer = device_authority(pki) if role is Role.DEVICE else load_authority(pki, Issuer.ROOT)
    files = _leaf_files(issuer, name, role, paths, days, now=now_utc(), start=start, end=end, access=access)
    if role is Role.DEVICE and pki.control_pub.exists():
        # The device gets the key that control-plane messages to it are signed with, with its identity.
        files.append(PendingFile(pki.device_control_pub(name), read_bytes(pki.control_pub)))
    write_files(files)
    return paths


def _validate_name(name: str, what: str) -> None:
    # Names are the CN, so the MQTT client id, a topic level and a directory name: node id rules.
    try:
        validate_node_id(name)
    except InvalidNodeId as exc:
        raise PkiError(f"{what} name {exc.reason}") from exc


def _paths_for(pki: PkiPaths, role: Role, name: str) -> ClientPaths:
    if role is Role.DEVICE:
        return pki.device(name)
    if role is Role.OPERATOR:
        return pki.operator(name)
    if role is Role.CONTROLLER:
        return pki.controller(name)
    raise PkiError(f"{role} identities are created by `fleet certs init` only")


def _exists(paths: ClientPaths) -> bool:
    return paths.cert.exists() or paths.key.exists()


def _leaf_files(
    issuer: Authority,
    name: str,
    role: Role,
    paths: ClientPaths,
    days: int,
    *,
    now: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    sans: Sequence[x509.GeneralName] = (),
    access: AccessRole | None = None,
) -> list[PendingFile]:
    validity = leaf_validity(issuer.cert, days, now=now, start=start, end=end)
    key = new_key()
    cert = build_leaf(issuer, subject_for(name, role, access), key.public_key(), role, validity, sans=sans)
    return [
        PendingFile(paths.cert, cert_pem(cert) + issuer.chain_pem),
        PendingFile(paths.key, key_pem(key), private=True),
    ]


def _completed_crl(pki: PkiPaths, root: Authority, issuing: Authority, *, now: datetime) -> tuple[bytes | None, bool]:
    """crl.pem with a CRL for both CAs (existing ones kept as they are), or None if it has both."""
    current: dict[x509.Name, x509.CertificateRevocationList] = {}
    if pki.crl.exists():
        data = read_bytes(pki.crl)
        current = parse_verified_crls(data, source=str(pki.crl), cas=[root.cert, issuing.cert])
    if root.cert.subject in current and issuing.cert.subject in current:
        return None, False
    blocks = []
    for authority in (root, issuing):
        crl = current.get(authority.cert.subject)
        if crl is not None:
            blocks.append(crl.public_bytes(serialization.Encoding.PEM))
        else:
            # A new issuing CA's CRL starts at 1 (nobody saw one); a lost root CRL must not restart there.
            number = 1 if authority is issuing and not pki.issuing_cert.exists() else fresh_crl_number(now)
            blocks.append(build_crl(authority.cert, authority.key, {}, number=number, now=now))
    return b"".join(blocks), True


def _server_sans(extra: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for value in (*DEFAULT_SERVER_SANS, *extra):
        san = _general_name(value)
        if san not in sans:
            sans.append(san)
    return sans


def _sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or not value.isascii() or any(char.isspace() or char in "/:@" for char in value):
        raise PkiError(f"--san {value!r}: neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


# ----------------------------------------------------------------------------------------- inventory


def _existing_identities(
    pki: PkiPaths, roles: frozenset[Role] = frozenset(Role)
) -> Iterator[tuple[str, Role, ClientPaths]]:
    """(name, role, paths) of every identity whose certificate is on disk, as the layout names them;
    the directories of roles not in ``roles`` are not read."""
    defaults = (
        (SERVER_NAME, Role.SERVER, pki.server),
        (CONTROLLER_NAME, Role.CONTROLLER, pki.default_controller),
        (OPERATOR_NAME, Role.OPERATOR, pki.default_operator),
    )
    for name, role, paths in defaults:
        if paths.cert.exists():
            yield name, role, paths
    for role, directory in _ROLE_DIRS.items():
        parent = pki.root / directory
        if role not in roles or not parent.is_dir():
            continue
        for child in sorted(parent.iterdir()):
            paths = _paths_for(pki, role, child.name)
            if child.is_dir() and paths.cert.exists():
                yield child.name, role, paths


def _identity_info(
    pki: PkiPaths, path: Path, revoked: frozenset[int], cas: dict[Issuer, x509.Certificate]
) -> IdentityInfo:
    cert = read_cert(path)
    try:
        identity = identity_from_cert(cert)
        access = access_role_of(cert)
    except CertificateRejected as exc:
        raise PkiError(f"{path}: {exc}") from exc
    return IdentityInfo(
        name=identity.name,
        role=identity.role,
        serial=identity.serial,
        not_after=cert.not_valid_after_utc,
        revoked=identity.serial in revoked,
        cert=path,
        issuer=issuer_of(pki, cert, cas),
        access=access,
    )

"""Who is asking: operator client certificates and API tokens, and what their role allows.

Two ways in, both always checked (there is no anonymous access to the API):

* **An operator certificate** from the fleet PKI, presented in the TLS handshake (the server asks
  for one and verifies it against the PKI's root). The CN is the user; the role is the
  certificate's access role (``certs.access_role_of``). A certificate listed in ``crl.pem`` is
  refused: the CRL is re-read when the file changes (checked at most once a second), a broken file
  keeps the last good one. Other roles (devices, controllers, the server) have no API access.
* **An API token** (``Authorization: Bearer fleet_<id>_<secret>``), made by an admin with
  ``fleet token create``. Only a salted SHA-256 of the secret is stored; a presented token is found
  by its public id and compared with ``hmac.compare_digest``. Tokens carry a role, may expire and
  may be revoked. The token table is cached in memory and re-read from the database at most once a
  second (so a revocation on one controller reaches the others sharing the file).

A request with a bearer token is judged by the token alone, whatever certificate it presents.
Secrets never reach a log line, an error message or the audit trail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certs import (
    AccessRole,
    CertificateRejected,
    PkiError,
    PkiPaths,
    Revocations,
    Role,
    access_role_of,
    load_revocations,
)
from certs import identity_from_cert as certificate_identity
from fleet.controller.facade import AccessRoleName, Conflict, Forbidden, NotFound, TokenView, Unauthorized
from fleet.controller.storage import Database

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fleet_"  # noqa: S105 - the public prefix of every token, not a secret
_TOKEN = re.compile(r"^fleet_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")
CACHE_SECONDS = 1.0
"""How stale the in-memory token table and CRL may be."""
_CERT_CACHE = 256  # verified certificates remembered (DER -> principal), per process

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created REAL NOT NULL,
    created_by TEXT NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active_name ON api_tokens (name) WHERE revoked_at IS NULL;
"""


class Via:
    CERTIFICATE = "certificate"
    TOKEN = "token"  # noqa: S105 - a kind of credential, not one


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the name the audit trail records, how it got in, its role."""

    name: str
    via: str  # Via.CERTIFICATE or Via.TOKEN
    role: AccessRole

    def allows(self, needed: AccessRole) -> bool:
        return self.role.allows(needed)


@dataclass(frozen=True)
class _Token:
    id: str
    name: str
    role: AccessRole
    salt: bytes
    hash: bytes
    created: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None

    def view(self) -> TokenView:
        return TokenView(
            name=self.name,
            role=AccessRoleName(self.role.value),
            created=self.created,
            created_by=self.created_by,
            expires_at=self.expires_at,
            revoked_at=self.revoked_at,
        )


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


class TokenStore:
    """API tokens: created (the secret returned once), listed, revoked, checked. Thread-safe."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, _Token] = {}
        self._loaded_at = float("-inf")
        db.migrate(SCHEMA)

    def create(self, name: str, role: AccessRole, expires_in: float | None, created_by: str) -> tuple[TokenView, str]:
        """A new token; returns its view and the full token string (shown once, never stored)."""
        token_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
        salt = os.urandom(16)
        now = self.clock()
        expires_at = None if expires_in is None else now + expires_in
        with self.db.transaction() as conn:
            active = conn.execute("SELECT 1 FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
            if active is not None:
                raise Conflict(f"token {name!r} exists already (revoke it first, or pick another name)")
            conn.execute(
                "INSERT INTO api_tokens (id, name, role, salt, hash, created, created_by, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, name, role.value, salt, _digest(salt, secret), now, created_by, expires_at),
            )
        self._invalidate()
        log.info("API token %s (%s) created by %s", name, role.value, created_by)
        view = _Token(token_id, name, role, salt, b"", now, created_by, expires_at, None).view()
        return view, f"{TOKEN_PREFIX}{token_id}_{secret}"

    def revoke(self, name: str) -> TokenView:
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT id FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no active token {name!r}")
            conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now, row[0]))
        self._invalidate()
        log.info("API token %s revoked", name)
        return next(token.view() for token in self._tokens() if token.id == row[0])

    def list(self, *, include_revoked: bool = False) -> list[TokenView]:
        tokens = sorted(self._tokens(), key=lambda token: (token.name, token.created))
        return [token.view() for token in tokens if include_revoked or token.revoked_at is None]

    def authenticate(self, presented: str) -> Principal:
        """The token's principal; ``Unauthorized`` (naming no secret) for anything else."""
        found = _TOKEN.match(presented)
        if found is None:
            raise Unauthorized("malformed bearer token")
        self._refresh()
        with self._lock:
            token = self._by_id.get(found.group("id"))
        if token is None:
            _burn(presented)  # about the same work as a real check: no timing hint that the id is unknown
            raise Unauthorized("unknown token")
        if not hmac.compare_digest(_digest(token.salt, found.group("secret")), token.hash):
            raise Unauthorized("unknown token")
        if token.revoked_at is not None:
            raise Unauthorized(f"token {token.name!r} was revoked")
        if token.expires_at is not None and token.expires_at <= self.clock():
            raise Unauthorized(f"token {token.name!r} expired")
        return Principal(token.name, Via.TOKEN, token.role)

    def _tokens(self) -> Iterable[_Token]:
        self._refresh(force=True)
        with self._lock:
            return list(self._by_id.values())

    def _invalidate(self) -> None:
        with self._lock:
            self._loaded_at = float("-inf")

    def _refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._loaded_at < CACHE_SECONDS:
                return
        rows = self.db.query(
            "SELECT id, name, role, salt, hash, created, created_by, expires_at, revoked_at FROM api_tokens"
        )
        tokens = {}
        for token_id, name, role, salt, digest, created, created_by, expires_at, revoked_at in rows:
            try:
                access = AccessRole(role)
            except ValueError:
                log.warning("API token %s has unknown role %r: ignored", name, role)
                continue
            tokens[token_id] = _Token(
                token_id, name, access, bytes(salt), bytes(digest), created, created_by, expires_at, revoked_at
            )
        with self._lock:
            self._by_id = tokens
            self._loaded_at = now


def _burn(presented: str) -> None:
    hmac.compare_digest(_digest(b"\0" * 16, presented), b"\0" * 32)


class CertificateAuthenticator:
    """Operator certificates presented in the TLS handshake (already verified against the root)."""

    def __init__(self, pki: PkiPaths) -> None:
        self.pki = pki
        self._lock = threading.Lock()
        self._revocations: Revocations | None = None
        self._crl_stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._cache: OrderedDict[bytes, tuple[Principal, int] | str] = OrderedDict()
        self.seen: dict[str, tuple[AccessRole, float]] = {}  # CN -> (access role, not after) for metrics
        self._reload_crl()

    def authenticate(self, der: bytes) -> Principal:
        """The operator ``der`` names; ``Unauthorized`` if revoked or unreadable, ``Forbidden`` for
        a certificate of another role."""
        serial_revoked = self._revoked_serials()
        with self._lock:
            known = self._cache.get(der)
            if known is not None:
                self._cache.move_to_end(der)
        if known is None:
            known = self._identify(der)
            with self._lock:
                self._cache[der] = known
                while len(self._cache) > _CERT_CACHE:
                    self._cache.popitem(last=False)
        if isinstance(known, str):
            raise Forbidden(known)
        principal, serial = known
        if serial_revoked is None:
            raise Unauthorized(f"cannot check revocation: {self.pki.crl} unreadable")
        if serial in serial_revoked:
            raise Unauthorized(f"certificate of {principal.name!r} is revoked")
        return principal

    def _identify(self, der: bytes) -> tuple[Principal, int] | str:
        """A principal, or (as a string) why this certificate has no API access."""
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = certificate_identity(cert)
            access = access_role_of(cert)
        except (ValueError, CertificateRejected) as exc:
            return f"client certificate not accepted: {exc}"
        if identity.role is not Role.OPERATOR or access is None:
            return f"{identity.role} certificates have no API access (only operator certificates)"
        with self._lock:
            self.seen[identity.name] = (access, cert.not_valid_after_utc.timestamp())
        return Principal(identity.name, Via.CERTIFICATE, access), identity.serial

    def _revoked_serials(self) -> frozenset[int] | None:
        now = time.monotonic()
        with self._lock:
            due = now - self._checked_at >= CACHE_SECONDS
            if due:
                self._checked_at = now
        if due:
            self._reload_crl()
        with self._lock:
            return None if self._revocations is None else self._revocations.serials

    def _reload_crl(self) -> None:
        try:
            stat = self.pki.crl.stat()
        except OSError as exc:
            if self._revocations is None:
                log.error("API: cannot read %s (%s): operator certificates are refused", self.pki.crl, exc.strerror)
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._crl_stamp:
            return
        try:
            revocations = load_revocations(self.pki, not_older_than=self._revocations)
        except PkiError as exc:
            log.error("API: %s (keeping the last good CRL)", exc)
            with self._lock:
                self._crl_stamp = stamp
            return
        with self._lock:
            self._revocations, self._crl_stamp = revocations, stamp


# ---- Host header -------------------------------------------------------------------------------

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")  # noqa: S104 - recognising it, not binding it


def certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses in a server certificate's subjectAltName."""
    pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(sans.get_values_for_type(x509.DNSName))
    names += [str(address) for address in sans.get_values_for_type(x509.IPAddress)]
    return names


class HostCheck:
    """Which ``Host`` headers a listener answers (a defence against DNS rebinding): its own
    names; ``None`` allows any (a listener on a wildcard address with no names configured)."""

    def __init__(self, allowed: Iterable[str] | None) -> None:
        self.allowed = None if allowed is None else frozenset(name.lower().strip("[]") for name in allowed)

    @classmethod
    def for_listener(cls, host: str, names: Iterable[str], extra: Iterable[str]) -> HostCheck:
        """Names a client may use for a listener on ``host``: ``names`` (the TLS certificate's), the
        address itself, the loopback names for a loopback listener, and ``extra``."""
        allowed = {*names, *extra}
        if is_loopback(host):
            allowed |= set(_LOOPBACK_NAMES)
        if is_wildcard(host):
            if not allowed:
                return cls(None)
        else:
            allowed.add(host)
        return cls(allowed)

    def permits(self, header: str | None) -> bool:
        if self.allowed is None:
            return True
        if not header:
            return False
        host = header.strip().lower()
        if host.startswith("["):  # [v6]:port
            host = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        return host in self.allowed

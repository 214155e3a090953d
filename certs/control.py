"""The control-plane signing key: ``control.key`` signs desired state and commands (the controller,
``fleet sign``), ``control.pub`` verifies them (agents). Made by ``fleet certs init``; ``init`` on an
older PKI adds it; ``fleet certs device`` copies ``control.pub`` into the device's directory."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certs.authority import read_bytes
from certs.errors import PkiError
from certs.paths import PkiPaths
from fleet.protocol.signing import InvalidKey, load_private_key


def load_control_key(pki: PkiPaths) -> Ed25519PrivateKey:
    """The PKI's control key; ``PkiError`` naming the file (and how to make it) otherwise."""
    path = pki.control_key
    hint = f" (the control-plane signing key; `fleet certs init {pki.root}` adds it to an existing PKI)"
    pem = read_bytes(path, missing_hint=hint)
    try:
        return load_private_key(pem)
    except InvalidKey as exc:
        raise PkiError(f"{path}: {exc}") from exc

"""Where every file of a PKI directory lives: the layout is part of the operator contract."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICES_DIR = "devices"
OPERATORS_DIR = "operators"
CONTROLLERS_DIR = "controllers"


@dataclass(frozen=True)
class ClientPaths:
    """Certificate and private key of one identity."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """The files of one PKI directory (see ``fleet certs init``)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def issuing_cert(self) -> Path:
        """The device-issuing intermediate CA (absent in a PKI made before it existed)."""
        return self.root / "issuing.pem"

    @property
    def issuing_key(self) -> Path:
        return self.root / "issuing.key"

    @property
    def crl_lock(self) -> Path:
        """Serialises read-modify-write of ``crl.pem`` (CLI and controller may revoke at once)."""
        return self.root / ".crl.lock"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def controller_cert(self) -> Path:
        return self.root / "controller.pem"

    @property
    def controller_key(self) -> Path:
        return self.root / "controller.key"

    @property
    def operator_cert(self) -> Path:
        return self.root / "operator.pem"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def release_key(self) -> Path:
        return self.root / "release.key"

    @property
    def release_pub(self) -> Path:
        return self.root / "release.pub"

    @property
    def control_key(self) -> Path:
        """The controller's Ed25519 key: it signs desired state and commands (private, 0600)."""
        return self.root / "control.key"

    @property
    def control_pub(self) -> Path:
        """Its public half: agents verify desired state and commands with it."""
        return self.root / "control.pub"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def root_authority(self) -> ClientPaths:
        return ClientPaths(self.ca_cert, self.ca_key)

    @property
    def issuing_authority(self) -> ClientPaths:
        return ClientPaths(self.issuing_cert, self.issuing_key)

    @property
    def server(self) -> ClientPaths:
        return ClientPaths(self.server_cert, self.server_key)

    @property
    def default_controller(self) -> ClientPaths:
        """The shared ``fleet-controller`` identity created by ``init``."""
        return ClientPaths(self.controller_cert, self.controller_key)

    @property
    def default_operator(self) -> ClientPaths:
        """The shared ``operator`` identity created by ``init``."""
        return ClientPaths(self.operator_cert, self.operator_key)

    def device(self, node_id: str) -> ClientPaths:
        return self._client(DEVICES_DIR, node_id)

    def device_control_pub(self, node_id: str) -> Path:
        """The copy of ``control.pub`` handed out with a device's identity (``fleet certs device``)."""
        return self.root / DEVICES_DIR / node_id / "control.pub"

    def operator(self, name: str) -> ClientPaths:
        return self._client(OPERATORS_DIR, name)

    def controller(self, name: str) -> ClientPaths:
        return self._client(CONTROLLERS_DIR, name)

    def _client(self, kind: str, name: str) -> ClientPaths:
        directory = self.root / kind / name
        return ClientPaths(directory / "cert.pem", directory / "key.pem")

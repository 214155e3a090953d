"""The controller's signing key: desired state and commands signed with it are verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.protocol.errors import ConfigError


class ControllerKey:
    """The key from ``controller_public_key``; without one, nothing is verified."""

    def __init__(self, path: Path | None) -> None:
        self._key = _load(path)

    @property
    def configured(self) -> bool:
        return self._key is not None

    def verify(self, raw: dict[str, Any]) -> None:
        """InvalidMessage unless ``raw`` carries a valid signature by this key."""
        from fleet.protocol.signing import verify_document

        assert self._key is not None
        verify_document(raw, self._key)


def _load(path: Path | None) -> Any:
    if path is None:
        return None
    from fleet.protocol.signing import load_public_key

    try:
        return load_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc

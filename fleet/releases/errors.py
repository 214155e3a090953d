"""Errors of the release store; all of them are ``FleetError`` so the CLI turns them into one line."""

from __future__ import annotations

from fleet.protocol.artifacts import ArtifactMismatch
from fleet.protocol.errors import FleetError

__all__ = ["ArtifactMismatch", "ReleaseError", "ReleaseNotFound"]


class ReleaseError(FleetError):
    """A release cannot be built, stored or read; the message names the file or value."""


class ReleaseNotFound(ReleaseError):
    """No complete release ``name@version`` (or digest) in the store."""

"""What is installed and which release runs: agent.db says which, each release's manifest says what."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agent.store import Store
from fleet.protocol.errors import FleetError
from fleet.protocol.messages import ProbeSpec, ReleaseRef

UPDATE_KEY = "update"  # JSON: {"phase": ..., "target": ReleaseRef, "generation": int}
VERSION, DIGEST = "version", "current_digest"
PREVIOUS_VERSION, PREVIOUS_DIGEST = "previous_version", "previous_digest"
FAILED_KEY = "failed_release"  # JSON: {"digest": ..., "generation": ...}: not retried for this generation


class UpdateFailed(FleetError):
    """The release cannot be installed; the message is the reason reported to the controller."""


@dataclass(frozen=True)
class Release:
    """An installed release as the workload supervisor needs it."""

    version: str
    digest: str
    directory: Path
    entry: list[str]
    health: ProbeSpec | None


class Releases:
    """The releases unpacked under ``state_dir/releases``, looked up by version."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.directory = root / "releases"
        self.store = store

    def current(self) -> Release | None:
        return self.get(self.store.get_text(VERSION))

    def previous(self) -> Release | None:
        return self.get(self.store.get_text(PREVIOUS_VERSION))

    def get(self, version: str | None) -> Release | None:
        if version is None:
            return None
        directory = self.directory / version
        try:
            manifest = json.loads((directory / ".fleet" / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        health = ProbeSpec.model_validate(manifest["health"]) if manifest.get("health") else None
        return Release(version, str(manifest["digest"]), directory, list(manifest.get("entry") or []), health)

    def installed(self, target: ReleaseRef) -> Release | None:
        """The release already unpacked (a crash after install, or the previous one coming back)."""
        release = self.get(target.version)
        return release if release is not None and release.digest == target.digest else None

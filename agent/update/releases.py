"""What is installed and which release runs: agent.db says which, each release's manifest says what."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.store import Store
from fleet.protocol.errors import FleetError
from fleet.protocol.ids import is_safe_release_name
from fleet.protocol.messages import ProbeSpec, ReleaseRef

UPDATE_KEY = "update"  # JSON: {"phase": ..., "target": ReleaseRef, "generation": int}
VERSION, DIGEST = "version", "current_digest"
PREVIOUS_VERSION, PREVIOUS_DIGEST = "previous_version", "previous_digest"
FAILED_KEY = "failed_release"  # JSON: {"digest": ..., "generation": ...}: not retried for this generation


class UpdateFailed(FleetError):
    """The release cannot be installed; the message is the reason reported to the controller."""


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_release_ref(target: ReleaseRef) -> None:
    """UpdateFailed unless the desired release's name and version are safe path components; checked
    before any path is built from them (``releases/<version>``)."""
    for what, value in (("name", target.name), ("version", target.version)):
        if not is_safe_release_name(value):
            raise UpdateFailed(
                f"release {what} {value[:130]!r} refused: 1-128 characters of A-Z a-z 0-9 . _ + -,"
                " starting with a letter or digit, no '..'"
            )


@dataclass(frozen=True)
class Release:
    """An installed release as the workload supervisor needs it."""

    name: str
    version: str
    digest: str
    directory: Path
    entry: list[str]
    health: ProbeSpec | None
    health_env: frozenset[str] = field(default=frozenset())
    """The workload variables ``${VAR}`` in the health probe's target may use (manifest ``health.env``)."""


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

    def installed_name(self) -> str | None:
        """The name of the release this node runs (else of the previous one): the workload it is for."""
        release = self.current() or self.previous()
        return release.name if release is not None else None

    def get(self, version: str | None) -> Release | None:
        if version is None or not is_safe_release_name(version):
            return None
        directory = self.directory / version
        try:
            manifest = json.loads((directory / ".fleet" / "manifest.json").read_text())
            name, digest = str(manifest["name"]), str(manifest["digest"])
            health = ProbeSpec.model_validate(manifest["health"]) if manifest.get("health") else None
        except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
            return None
        # The signed manifest's ``health.env`` (fleet.releases.ReleaseProbe); ProbeSpec ignores it.
        declared = manifest["health"].get("env") if health is not None else None
        names = declared if isinstance(declared, list) else []
        env = frozenset(name for name in names if isinstance(name, str) and _ENV_NAME.fullmatch(name))
        return Release(name, version, digest, directory, list(manifest.get("entry") or []), health, env)

    def installed(self, target: ReleaseRef) -> Release | None:
        """The release already unpacked (a crash after install, or the previous one coming back)."""
        release = self.get(target.version)
        return release if release is not None and release.digest == target.digest else None

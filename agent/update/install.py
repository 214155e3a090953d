"""Install a decoded release and decide whether it stays: unpack, switch, health gate, rollback.

Crash safety: the phase of an update is in agent.db, a release directory is complete before it
gets its final name, and agent.db says which release runs (the ``current`` link, switched first,
mirrors it for people and tools). After a kill -9 anywhere the agent redoes an interrupted unpack
or re-runs the health window of a switched release (and rolls back if it fails): it runs the old
or the new release, never a mix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from agent import core, failpoints
from agent.config import AgentSettings
from agent.files import write_atomically
from agent.probes import HealthMonitor
from agent.store import Store
from agent.update.download import part_path
from agent.update.hooks import Hooks
from agent.update.releases import (
    DIGEST,
    FAILED_KEY,
    PREVIOUS_DIGEST,
    PREVIOUS_VERSION,
    UPDATE_KEY,
    VERSION,
    Release,
    Releases,
    UpdateFailed,
    check_release_ref,
)
from fleet.protocol.messages import ReleaseRef, UpdateState

log = logging.getLogger(__name__)


class Installer:
    def __init__(
        self, settings: AgentSettings, store: Store, releases: Releases, health: HealthMonitor, hooks: Hooks
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.releases = releases
        self.health = health
        self.hooks = hooks
        self.root = settings.state_dir

    # ---- unpack ----------------------------------------------------------------------------

    def unpack(self, target: ReleaseRef, manifest: dict[str, Any], payload: Path) -> Release:
        """Unpack ``payload`` into ``releases/<version>`` (complete before it gets that name).

        The release directory is 0755 (a workload of its own user reads it, ``agent.runas``); its
        ``.fleet/`` with the payload and manifest stays the agent's (0700)."""
        check_release_ref(target)  # a version is a directory name: nothing else is built from it
        final = self.releases.directory / target.version
        staging = self.releases.directory / f".{target.version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        self.releases.directory.mkdir(exist_ok=True)
        staging.mkdir()
        (staging / ".fleet").mkdir(mode=0o700)
        for directory in (self.releases.directory, staging):
            os.chmod(directory, 0o755)  # noqa: S103 - whatever the umask (the unit's is 0077): the workload reads it
        import tarfile  # only while installing: the idle agent does not carry it

        try:
            # From the file, member by member: the payload is never in memory as a whole.
            with tarfile.open(payload, mode="r:") as archive:
                archive.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            payload.unlink(missing_ok=True)
            raise UpdateFailed(f"cannot unpack {target.version}: {exc}") from exc
        # Moved, not copied (same file system, fsynced when decoded): kept as the next delta's base.
        os.replace(payload, staging / ".fleet" / "payload.tar")
        write_atomically(staging / ".fleet" / "manifest.json", json.dumps(manifest, sort_keys=True).encode())
        _fsync_tree(staging)
        failpoints.hit("update.unpacked")
        if final.exists():
            shutil.rmtree(final)  # a different build under the same version (never the running one)
        os.rename(staging, final)
        _fsync_dir(self.releases.directory)
        release = self.releases.get(target.version)
        assert release is not None
        self.store.forget_download(target.digest)
        part_path(self.root, target.digest).unlink(missing_ok=True)
        return release

    # ---- switch and health gate ------------------------------------------------------------

    async def switch_to(self, release: Release, generation: int) -> None:
        current = self.releases.current()
        self._point_current_at(release.version)  # before it the old release runs, after it the new
        failpoints.hit("update.link_switched")
        values: dict[str, bytes | None] = {VERSION: release.version.encode(), DIGEST: release.digest.encode()}
        if current is not None and current.version != release.version:
            values |= {PREVIOUS_VERSION: current.version.encode(), PREVIOUS_DIGEST: current.digest.encode()}
        values[UPDATE_KEY] = json.dumps(
            {"phase": "health", "version": release.version, "generation": generation}
        ).encode()
        self.store.put_many(values)
        log.info("%s: switched to release %s", self.node, release.version)
        self.hooks.event("release_switched", None, {"version": release.version})
        await self.hooks.run_release(release)

    async def health_gate(self, release: Release, generation: int) -> None:
        """Keep ``release`` if it stays healthy through the health window, else roll back."""
        healthy, reason = await self._watch_health(release)
        if healthy:
            self.store.put_many({UPDATE_KEY: None, FAILED_KEY: None})
            self.hooks.event("release_healthy", None, {"version": release.version})
            self.hooks.report(UpdateState.HEALTHY, f"{release.version} healthy", None)
            self.collect_garbage()
            return
        failed = {"digest": release.digest, "generation": generation}
        self.store.put(FAILED_KEY, json.dumps(failed).encode())
        await self.rollback(f"{release.version} failed its health check: {reason}")

    def _health_window(self) -> float:
        spec = self.health.spec
        update = self.settings.update
        if spec is None:
            return update.no_probe_window
        return spec.initial_delay + spec.failure_threshold * max(spec.period, spec.timeout) + update.health_grace

    async def _watch_health(self, release: Release) -> tuple[bool, str]:
        spec = self.health.spec
        window = self._health_window()
        exits_before = self.hooks.workload_exits()
        failpoints.hit("update.health_window")
        self.hooks.report(UpdateState.VERIFYING, f"health window {window:.0f}s for {release.version}", None)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            if self.health.state.healthy is False:
                last = self.health.state.last
                return False, last.detail if last is not None and last.detail else "probe failed"
            if self.hooks.workload_exits() - exits_before >= 2:
                return False, "the workload keeps exiting"
            await asyncio.sleep(0.1)
        if spec is not None and self.health.state.healthy is not True:
            return False, "no successful probe in the health window"
        if spec is None and self.hooks.workload_exits() > exits_before:
            return False, "the workload exited"
        return True, ""

    # ---- rollback --------------------------------------------------------------------------

    async def rollback(self, reason: str) -> str:
        """Switch back to the previous release, or to the configured workload when the failed one
        was the first release; report rolled_back."""
        previous = self.releases.previous()
        current = self.releases.current()
        if current is None:
            raise UpdateFailed(core.NO_PREVIOUS_RELEASE)
        values: dict[str, bytes | None] = {
            UPDATE_KEY: None,
            PREVIOUS_VERSION: current.version.encode(),
            PREVIOUS_DIGEST: current.digest.encode(),
        }
        if previous is None:
            (self.root / "current").unlink(missing_ok=True)
            _fsync_dir(self.root)
            values |= {VERSION: None, DIGEST: None}
        else:
            self._point_current_at(previous.version)
            values |= {VERSION: previous.version.encode(), DIGEST: previous.digest.encode()}
        self.store.put_many(values)
        back_to = previous.version if previous is not None else core.CONFIGURED_WORKLOAD
        log.warning("%s: rolled back from %s to %s: %s", self.node, current.version, back_to, reason)
        await self.hooks.run_release(previous)
        self.hooks.event("rolled_back", reason, {"from": current.version, "to": back_to})
        self.hooks.report(UpdateState.ROLLED_BACK, reason, None)
        return core.rolled_back(current.version, previous.version if previous is not None else None)

    def _point_current_at(self, version: str) -> None:
        """Switch the ``current`` link with one rename: the one atomic step of a switch."""
        link = self.root / "current"
        temp = self.root / ".current.new"
        temp.unlink(missing_ok=True)
        os.symlink(Path("releases") / version, temp)
        os.replace(temp, link)
        _fsync_dir(self.root)

    # ---- garbage collection ----------------------------------------------------------------

    def collect_garbage(self) -> None:
        """Keep the running and the previous release; drop other releases and stale downloads."""
        keep = {self.store.get_text(VERSION), self.store.get_text(PREVIOUS_VERSION)}
        for directory in self.releases.directory.iterdir():
            if directory.name not in keep:
                shutil.rmtree(directory, ignore_errors=True)
        downloads = self.root / "downloads"
        for part in downloads.glob("*.part") if downloads.is_dir() else []:
            if self.store.download("sha256:" + part.stem) is None:
                part.unlink(missing_ok=True)
        for payload in downloads.glob("*.payload") if downloads.is_dir() else []:
            payload.unlink(missing_ok=True)  # decoded, then the crash came before the unpack; no update runs now

    # ---- crash recovery --------------------------------------------------------------------

    async def recover(self) -> tuple[ReleaseRef, int] | None:
        """Finish what a crash interrupted. Returns the release and generation whose download or
        install must be resumed (converging again resumes from the chunks on disk), or None."""
        raw = self.store.get(UPDATE_KEY)
        if raw is None:
            return None
        record = json.loads(raw)
        releases = self.releases.directory
        for staging in releases.glob(".*.partial") if releases.is_dir() else []:
            shutil.rmtree(staging, ignore_errors=True)  # an unpack the crash interrupted
        if record["phase"] == "health":
            release = self.releases.current()
            if release is None or release.version != record["version"]:
                self._finish_interrupted_switch(record)
                release = self.releases.current()
            if release is not None:
                log.info("%s: re-running the health window of %s after a restart", self.node, release.version)
                await self.health_gate(release, int(record["generation"]))
            return None
        return ReleaseRef.model_validate(record["target"]), int(record["generation"])

    def _finish_interrupted_switch(self, record: dict[str, Any]) -> None:
        link = self.root / "current"
        target = os.readlink(link) if link.is_symlink() else None
        if target is not None and Path(target).name == record["version"]:
            release = self.releases.get(record["version"])
            if release is not None:
                self.store.put_many({VERSION: release.version.encode(), DIGEST: release.digest.encode()})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))

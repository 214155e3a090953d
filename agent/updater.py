"""Release updates on the device: resumable chunked download, verify, A/B install, health-gated commit.

``Updater`` is what the rest of the agent sees: it takes the desired release, converges to it in
one owned loop and rolls back on demand. The work is done by the parts in ``agent.update`` (see
its docstring for the on-disk layout): ``Downloader`` fills the artifact's ``.part`` file over MQTT
or HTTPS, ``decode`` checks the signed manifest and decodes the artifact to a payload, and
``Installer`` unpacks, switches, runs the health gate, rolls back and recovers after a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from agent import core, failpoints
from agent.config import AgentSettings
from agent.probes import HealthMonitor
from agent.store import Store
from agent.transport import Inbound, Transport
from agent.update.decode import decode_artifact, verified_manifest
from agent.update.download import Downloader, delta_base
from agent.update.hooks import Hooks
from agent.update.install import Installer
from agent.update.releases import DIGEST, FAILED_KEY, UPDATE_KEY, Release, Releases, UpdateFailed, check_release_ref
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import ReleaseRef, UpdateState

log = logging.getLogger(__name__)


class Updater:
    def __init__(
        self, settings: AgentSettings, store: Store, transport: Transport, health: HealthMonitor, hooks: Hooks
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.hooks = hooks
        self.releases = Releases(settings.state_dir, store)
        self.downloader = Downloader(settings, store, transport, hooks)
        self.installer = Installer(settings, store, self.releases, health, hooks)
        self._wake = asyncio.Event()
        self._target: ReleaseRef | None = None
        self._generation = 0

    # ---- what runs now ---------------------------------------------------------------------

    def current(self) -> Release | None:
        return self.releases.current()

    def previous(self) -> Release | None:
        return self.releases.previous()

    # ---- inputs ----------------------------------------------------------------------------

    def set_target(self, release: ReleaseRef | None, generation: int) -> None:
        self._target = release
        self._generation = generation
        self._wake.set()

    def on_reconnect(self) -> None:
        self.downloader.on_reconnect()

    def on_chunk(self, inbound: Inbound) -> None:
        self.downloader.on_chunk(inbound)

    # ---- the owned loop --------------------------------------------------------------------

    async def run(self) -> None:
        interrupted = await self.installer.recover()
        if interrupted is not None:
            self._target, self._generation = interrupted
        while True:
            self._wake.clear()
            target = self._target
            if target is not None and self._wants(target):
                await self._attempt(target, self._generation)
            await self._wake.wait()

    def _wants(self, target: ReleaseRef) -> bool:
        """Whether converging to ``target`` takes anything (``core.plan_update``): not when it runs
        already, nor when it failed or was rolled back for this generation (wait for a new one)."""
        stored = self.store.get(FAILED_KEY)
        record = json.loads(stored) if stored is not None else None
        failed = (str(record["digest"]), int(record["generation"])) if record is not None else None
        plan = core.plan_update(
            target,
            self._generation,
            running=self.store.get_text(DIGEST),
            installed=(target.digest,) if self.releases.installed(target) is not None else (),
            failed=failed,
        )
        return plan is not core.UpdatePlan.NONE

    async def _attempt(self, target: ReleaseRef, generation: int) -> None:
        try:
            check_release_ref(target)  # before any path is built from its name or version
            manifest = verified_manifest(target, self.settings.release_public_key, self.hooks.event)
            release = self.releases.installed(target)
            if release is None:
                self._save_phase("downloading", target, generation)
                payload = await self._fetch_payload(target)  # a file under downloads/
                self._save_phase("installing", target, generation)
                self.hooks.report(UpdateState.INSTALLING, f"installing {target.version}", None)
                release = self.installer.unpack(target, manifest, payload)
            await self.installer.switch_to(release, generation)
            await self.installer.health_gate(release, generation)
        except UpdateFailed as exc:
            self._give_up(target, generation, str(exc))

    def _give_up(self, target: ReleaseRef, generation: int, reason: str) -> None:
        log.error("%s: update to %s failed: %s", self.node, target.version, reason)
        self.store.put_many(
            {FAILED_KEY: json.dumps({"digest": target.digest, "generation": generation}).encode(), UPDATE_KEY: None}
        )
        self.hooks.event("update_failed", reason, {"version": target.version})
        self.hooks.report(UpdateState.FAILED, reason, None)

    def _save_phase(self, phase: str, target: ReleaseRef, generation: int) -> None:
        record: dict[str, Any] = {"phase": phase, "target": target.model_dump(mode="json"), "generation": generation}
        self.store.put(UPDATE_KEY, json.dumps(record).encode())

    async def _fetch_payload(self, target: ReleaseRef) -> Path:
        """Download the artifact (HTTPS when usable, else MQTT) and decode it to the payload file;
        an artifact that does not decode to the signed payload is fetched again, in full."""
        base = delta_base(self.releases.current(), target)
        https = base is None and self.downloader.https_usable(target)
        for attempt in range(1, self.settings.update.max_failures + 1):
            if https:
                https = await self.downloader.over_https(target)
            if not https:
                await self.downloader.over_mqtt(target, base)
            failpoints.hit("update.downloaded")
            self.hooks.report(UpdateState.VERIFYING, f"verifying {target.version}", None)
            try:
                return decode_artifact(target, self.store, self.releases)
            except InvalidMessage as exc:
                # Every chunk matched its digest, yet the whole does not decode to the signed payload:
                # corrupt or forged at the source. Start over; nothing was installed.
                self.hooks.event("artifact_refused", str(exc), {"version": target.version, "attempt": attempt})
                log.warning("%s: artifact for %s refused (%s); fetching again", self.node, target.version, exc)
                self.downloader.discard(target.digest)
                base = None  # a delta that went wrong once is not tried again
                if https:  # the same URL would serve the same wrong bytes
                    self.downloader.fall_back(target, f"artifact from {target.url} refused: {exc}")
                    https = False
        raise UpdateFailed(core.artifact_refused(target.version, self.settings.update.max_failures))

    # ---- on demand -------------------------------------------------------------------------

    async def rollback(self, reason: str) -> str:
        """Switch back to the previous release (or the configured workload); see ``Installer.rollback``."""
        return await self.installer.rollback(reason)

    def mark_left_behind(self, digest: str) -> None:
        """An operator's rollback: do not converge back to what was left for this generation."""
        self.store.put(FAILED_KEY, json.dumps({"digest": digest, "generation": self._generation}).encode())

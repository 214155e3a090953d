"""Release updates on the device: resumable chunked download, verify, A/B install, health-gated commit.

Layout under ``state_dir``::

    releases/<version>/             unpacked release; .fleet/payload.tar and .fleet/manifest.json beside it
    current -> releases/<version>   the running release; switched with one rename (atomic)
    downloads/<target-hex>.part     artifact being fetched; verified chunks are listed in agent.db
    downloads/<target-hex>.payload  the payload decoded from it, moved into the release once unpacked

The artifact comes over MQTT (``artifact/req`` / ``artifact/chunk``) or, when the desired release
names a URL and no delta applies, over HTTPS with Range requests (``agent.https_source``); both
fill the same ``.part`` file and chunk records, so either resumes what the other started, and a
failing HTTPS source falls back to MQTT. Memory stays flat: the artifact is hashed and decoded from
file to file in blocks and the tar is unpacked from the payload file (only a delta's base payload
is held whole, as zstd's dictionary).

Crash safety: the phase of an update is in agent.db, each chunk is fsynced before it is recorded,
a release directory is complete before it gets its final name, and agent.db says which release
runs (the ``current`` link, switched first, mirrors it for people and tools). After a kill -9
anywhere the agent resumes the download from the first missing chunk, redoes an interrupted
unpack, or re-runs the health window of a switched release (and rolls back if it fails): it runs
the old or the new release, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import failpoints
from agent.config import AgentSettings
from agent.files import write_atomically
from agent.probes import HealthMonitor
from agent.store import Download, Store
from agent.transport import Inbound, Transport
from fleet.protocol.codec import decode, encode
from fleet.protocol.errors import FleetError, InvalidMessage, TransportError
from fleet.protocol.messages import ArtifactChunk, ArtifactRequest, ProbeSpec, ReleaseRef, UpdateState, digest_hex
from fleet.protocol.topics import Channel, node_topic

log = logging.getLogger(__name__)

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


@dataclass
class Hooks:
    """What the updater asks of the rest of the agent."""

    report: Callable[[UpdateState, str | None, float | None], None]
    event: Callable[[str, str | None, dict[str, Any]], None]
    run_release: Callable[[Release | None], Awaitable[None]]  # switch the workload (None: the configured one)
    workload_exits: Callable[[], int]  # monotonically growing count of workload exits


class Updater:
    def __init__(
        self, settings: AgentSettings, store: Store, transport: Transport, health: HealthMonitor, hooks: Hooks
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.transport = transport
        self.health = health
        self.hooks = hooks
        self.root = settings.state_dir
        self._wake = asyncio.Event()
        self._chunk_arrived = asyncio.Event()
        self._target: ReleaseRef | None = None
        self._generation = 0
        self._last_progress_report = 0.0
        self._server_error: str | None = None
        self._downloading: ReleaseRef | None = None  # chunks for anything else are stale

    # ---- what runs now ---------------------------------------------------------------------

    def current(self) -> Release | None:
        return self._release(self._text(VERSION))

    def previous(self) -> Release | None:
        return self._release(self._text(PREVIOUS_VERSION))

    def _release(self, version: str | None) -> Release | None:
        if version is None:
            return None
        directory = self.root / "releases" / version
        try:
            manifest = json.loads((directory / ".fleet" / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        health = ProbeSpec.model_validate(manifest["health"]) if manifest.get("health") else None
        return Release(version, str(manifest["digest"]), directory, list(manifest.get("entry") or []), health)

    def _text(self, key: str) -> str | None:
        value = self.store.get(key)
        return None if value is None else value.decode()

    # ---- inputs ----------------------------------------------------------------------------

    def set_target(self, release: ReleaseRef | None, generation: int) -> None:
        self._target = release
        self._generation = generation
        self._wake.set()

    def on_reconnect(self) -> None:
        """Chunks in flight when the link dropped are gone (QoS 0): ask again now, not at the timeout."""
        self._chunk_arrived.set()

    def on_chunk(self, inbound: Inbound) -> None:
        try:
            chunk = decode(inbound.topic, inbound.payload, ArtifactChunk)
        except InvalidMessage as exc:
            log.warning("%s: ignored artifact chunk: %s", self.node, exc)
            return
        if chunk.error is not None:
            self._server_error = chunk.error
        else:
            self._store_chunk(chunk)
        self._chunk_arrived.set()

    # ---- the owned loop --------------------------------------------------------------------

    async def run(self) -> None:
        await self._recover()
        while True:
            self._wake.clear()
            target = self._target
            if target is not None and self._wants(target):
                await self._attempt(target, self._generation)
            await self._wake.wait()

    def _wants(self, target: ReleaseRef) -> bool:
        if target.digest == self._text(DIGEST):
            return False
        failed = self.store.get(FAILED_KEY)
        if failed is not None:
            record = json.loads(failed)
            if record["digest"] == target.digest and record["generation"] == self._generation:
                return False  # failed or rolled back for this generation: wait for a new one
        return True

    async def _attempt(self, target: ReleaseRef, generation: int) -> None:
        try:
            manifest = self._verified_manifest(target)
            release = self._installed(target)
            if release is None:
                self._save_phase("downloading", target, generation)
                payload = await self._fetch_payload(target)  # a file under downloads/
                self._save_phase("installing", target, generation)
                self.hooks.report(UpdateState.INSTALLING, f"installing {target.version}", None)
                release = self._install(target, manifest, payload)
            await self._switch_to(release, generation)
            await self._health_gate(release, generation)
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
        record = {"phase": phase, "target": target.model_dump(mode="json"), "generation": generation}
        self.store.put(UPDATE_KEY, json.dumps(record).encode())

    # ---- signature ------------------------------------------------------------------------

    def _verified_manifest(self, target: ReleaseRef) -> dict[str, Any]:
        from fleet.protocol.signing import load_public_key, verify_manifest

        if target.manifest is None:
            raise UpdateFailed("the desired release has no signed manifest")
        key_path = self.settings.release_public_key
        if key_path is None:
            raise UpdateFailed("no release_public_key configured: the agent installs only signed releases")
        try:
            verify_manifest(target.manifest, load_public_key(key_path.read_bytes()))
        except (InvalidMessage, OSError, FleetError) as exc:
            self.hooks.event("release_refused", str(exc), {"version": target.version})
            raise UpdateFailed(f"release {target.name}@{target.version} refused: {exc}") from exc
        manifest = target.manifest
        for field in ("name", "version", "digest", "size", "chunk_size"):
            if manifest.get(field) != getattr(target, field):
                raise UpdateFailed(f"desired release and its signed manifest disagree on {field}")
        return manifest

    # ---- download --------------------------------------------------------------------------

    def _part_path(self, target: str) -> Path:
        return self.root / "downloads" / f"{digest_hex(target)}.part"

    def _payload_path(self, target: str) -> Path:
        return self.root / "downloads" / f"{digest_hex(target)}.payload"

    def _delta_base(self, target: ReleaseRef) -> str | None:
        current = self.current()
        if current is None or current.digest not in target.delta_bases:
            return None
        return current.digest if (current.directory / ".fleet" / "payload.tar").is_file() else None

    async def _fetch_payload(self, target: ReleaseRef) -> Path:
        base = self._delta_base(target)
        https = base is None and self._https_usable(target)
        for attempt in range(1, self.settings.update.max_failures + 1):
            if https:
                https = await self._download_https(target)
            if not https:
                await self._download(target, base)
            failpoints.hit("update.downloaded")
            try:
                return self._decode_artifact(target)
            except InvalidMessage as exc:
                # Every chunk matched its digest, yet the whole does not decode to the signed payload:
                # corrupt or forged at the source. Start over; nothing was installed.
                self.hooks.event("artifact_refused", str(exc), {"version": target.version, "attempt": attempt})
                log.warning("%s: artifact for %s refused (%s); fetching again", self.node, target.version, exc)
                self.store.forget_download(target.digest)
                self._part_path(target.digest).unlink(missing_ok=True)
                base = None  # a delta that went wrong once is not tried again
                if https:  # the same URL would serve the same wrong bytes
                    self._fall_back(target, f"artifact from {target.url} refused: {exc}")
                    https = False
        raise UpdateFailed(
            f"artifact for {target.version} failed verification {self.settings.update.max_failures} times"
        )

    # ---- download over HTTPS ---------------------------------------------------------------

    def _https_usable(self, target: ReleaseRef) -> bool:
        if target.url is None:
            return False
        if target.artifact_size is None or target.artifact_digest is None:
            self._fall_back(target, f"{target.url}: the desired release lacks artifact_size/artifact_digest")
            return False
        from agent.https_source import SourceError, check_url  # idle agents never load http.client

        try:
            check_url(target.url)
        except SourceError as exc:
            self.hooks.event("https_refused", str(exc), {"version": target.version})
            self._fall_back(target, str(exc))
            return False
        return True

    def _fall_back(self, target: ReleaseRef, reason: str) -> None:
        log.warning("%s: HTTPS source of %s unusable (%s); downloading over MQTT", self.node, target.version, reason)
        self.hooks.event("https_fallback", reason, {"version": target.version, "url": target.url})

    async def _download_https(self, target: ReleaseRef) -> bool:
        """Fetch the missing chunks of the full artifact with Range requests; False when the source
        failed ``max_failures`` times in a row (the caller falls back to MQTT)."""
        assert target.url is not None and target.artifact_size is not None and target.artifact_digest is not None
        wanted = Download(
            target.digest,
            None,
            "sha256:" + digest_hex(target.artifact_digest),  # the release server's spelling: MQTT can resume
            target.artifact_size,
            -(-target.artifact_size // target.chunk_size),
        )
        self._start_download(wanted)
        self._last_progress_report = 0.0
        from agent.https_source import RangeClient, SourceError, tls_context

        ca = self.settings.tls.ca if self.settings.tls is not None else None
        client = RangeClient(target.url, timeout=self.settings.update.request_timeout, context=tls_context(ca))
        failures = 0
        try:
            while not self._complete(target.digest):
                index = _first_missing(self.store.stored_chunks(target.digest), wanted.total)
                start = index * target.chunk_size
                length = min(target.chunk_size, wanted.size - start)
                try:
                    data = await asyncio.to_thread(client.fetch, start, length, wanted.size)
                except SourceError as exc:
                    failures += 1
                    self.hooks.event("download_error", str(exc), {"version": target.version, "source": "https"})
                    if failures >= self.settings.update.max_failures:
                        self._fall_back(target, f"{failures} failures in a row, last: {exc}")
                        return False
                    await asyncio.sleep(min(8.0, 0.5 * 2.0**failures))
                    continue
                failures = 0
                self._keep_chunk(target.digest, index, data, target.chunk_size, wanted.total)
        finally:
            client.close()
        return True

    # ---- download over MQTT ----------------------------------------------------------------

    async def _download(self, target: ReleaseRef, base: str | None) -> None:
        self._downloading = target
        self._last_progress_report = 0.0
        failures = 0
        try:
            while not self._complete(target.digest):
                await self.transport.wait_connected()
                have = self.store.stored_chunks(target.digest)
                download = self.store.download(target.digest)
                first = _first_missing(have, download.total if download else None)
                window = self.settings.update.window
                self._request(ArtifactRequest(digest=target.digest, first=first, window=window, delta_base=base))
                progressed = await self._wait_for_chunks(target.digest, len(have))
                if self._server_error is not None:
                    error, self._server_error = self._server_error, None
                    failures += 1
                    self.hooks.event("download_error", error, {"version": target.version})
                    if failures >= self.settings.update.max_failures:
                        raise UpdateFailed(f"release server: {error}")
                    await asyncio.sleep(min(30.0, 2.0**failures))
                elif not progressed:
                    log.info("%s: no chunks of %s arrived; asking again", self.node, target.version)
        finally:
            self._downloading = None

    def _request(self, request: ArtifactRequest) -> None:
        # Not connected: the download loop waits for the connection and asks again.
        with contextlib.suppress(TransportError):
            self.transport.publish(node_topic(self.node, Channel.ARTIFACT_REQ), encode(request), qos=1)

    async def _wait_for_chunks(self, target: str, had: int) -> bool:
        """Wait for the requested window (or a stall, or an error); True when anything new arrived."""
        deadline = time.monotonic() + self.settings.update.request_timeout
        asked_on = self.transport.connects
        while True:
            self._chunk_arrived.clear()
            have = len(self.store.stored_chunks(target))
            remaining = deadline - time.monotonic()
            window_done = have - had >= self.settings.update.window
            if self.transport.connects != asked_on:
                return True  # reconnected since we asked: what was in flight is lost, ask again now
            if self._server_error is not None or self._complete(target) or window_done or remaining <= 0:
                return have > had
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._chunk_arrived.wait(), remaining)

    def _complete(self, target: str) -> bool:
        download = self.store.download(target)
        return download is not None and len(self.store.stored_chunks(target)) >= download.total

    def _store_chunk(self, chunk: ArtifactChunk) -> None:
        downloading = self._downloading
        if downloading is None or chunk.digest != downloading.digest:
            return  # a late chunk of an abandoned or finished download
        if chunk.sha256 is None or chunk.artifact is None or chunk.size is None or chunk.total is None:
            log.warning("%s: chunk %d lacks its digests; ignored", self.node, chunk.index)
            return
        if digest_hex(chunk.sha256) != hashlib.sha256(chunk.data).hexdigest():
            log.warning(
                "%s: chunk %d of %s fails its digest; will ask again", self.node, chunk.index, chunk.digest[:19]
            )
            self.hooks.event("chunk_refused", f"chunk {chunk.index} digest mismatch", {"index": chunk.index})
            return
        wanted = Download(chunk.digest, chunk.base, chunk.artifact, chunk.size, chunk.total)
        self._start_download(wanted)
        if chunk.index in self.store.stored_chunks(chunk.digest):
            return
        self._keep_chunk(chunk.digest, chunk.index, chunk.data, downloading.chunk_size, chunk.total)

    def _start_download(self, wanted: Download) -> None:
        """Record the artifact being fetched, keeping the chunks on disk only if they are of it."""
        if self.store.download(wanted.target) != wanted:
            # First chunk, or another artifact now (full instead of delta, or a rebuilt one).
            self.store.start_download(wanted)
            self._part_path(wanted.target).unlink(missing_ok=True)

    def _keep_chunk(self, target: str, index: int, data: bytes, chunk_size: int, total: int) -> None:
        self._write_chunk(target, index, data, chunk_size)
        self.store.chunk_stored(target, index)
        failpoints.hit("update.chunk_stored")
        self._maybe_report_progress(target, total)

    def _write_chunk(self, target: str, index: int, data: bytes, chunk_size: int) -> None:
        path = self._part_path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, index * chunk_size)
            os.fsync(fd)  # on disk before it is recorded: a crash never records a chunk that is not there
        finally:
            os.close(fd)

    def _maybe_report_progress(self, target: str, total: int) -> None:
        now = time.monotonic()
        done = len(self.store.stored_chunks(target))
        if done < total and now - self._last_progress_report < 1.0:
            return
        self._last_progress_report = now
        self.hooks.report(UpdateState.DOWNLOADING, f"chunk {done}/{total}", done / total)

    def _decode_artifact(self, target: ReleaseRef) -> Path:
        """Check the assembled artifact and decode it to the payload file, in blocks (flat memory)."""
        from fleet.protocol.artifacts import apply_delta_stream, decompress_full_stream, sha256_stream

        self.hooks.report(UpdateState.VERIFYING, f"verifying {target.version}", None)
        download = self.store.download(target.digest)
        assert download is not None
        part, payload = self._part_path(target.digest), self._payload_path(target.digest)
        with part.open("rb") as artifact:
            # Chunks only ever land inside the artifact, so a longer file is not this artifact.
            if os.fstat(artifact.fileno()).st_size != download.size:
                raise InvalidMessage("the assembled artifact is not of its recorded size", field="artifact")
            if digest_hex(sha256_stream(artifact)) != digest_hex(download.artifact):
                raise InvalidMessage("the assembled artifact does not match its digest", field="artifact")
            artifact.seek(0)
            base = self._delta_base_payload(download)
            # 0o600 like every release payload.tar (it is renamed into the release, never copied).
            with open(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                try:
                    if base is None:
                        decompress_full_stream(artifact, out, target.digest, target.size)
                    else:
                        apply_delta_stream(base, artifact, out, target.digest, target.size)
                except InvalidMessage:
                    payload.unlink(missing_ok=True)
                    raise
                out.flush()
                os.fsync(out.fileno())  # it becomes the release's payload.tar by a rename
        return payload

    def _delta_base_payload(self, download: Download) -> bytes | None:
        """The base payload a delta applies to (whole in memory: zstd needs its dictionary), or None."""
        if download.base is None:
            return None
        current = self.current()
        if current is None or current.digest != download.base:
            raise InvalidMessage("the delta's base release is no longer installed", field="base")
        return (current.directory / ".fleet" / "payload.tar").read_bytes()

    # ---- install and switch ----------------------------------------------------------------

    def _installed(self, target: ReleaseRef) -> Release | None:
        """The release already unpacked (a crash after install, or the previous one coming back)."""
        release = self._release(target.version)
        return release if release is not None and release.digest == target.digest else None

    def _install(self, target: ReleaseRef, manifest: dict[str, Any], payload: Path) -> Release:
        releases = self.root / "releases"
        final = releases / target.version
        staging = releases / f".{target.version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / ".fleet").mkdir(parents=True)
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
        _fsync_dir(releases)
        release = self._release(target.version)
        assert release is not None
        self.store.forget_download(target.digest)
        self._part_path(target.digest).unlink(missing_ok=True)
        return release

    async def _switch_to(self, release: Release, generation: int) -> None:
        current = self.current()
        link = self.root / "current"
        temp = self.root / ".current.new"
        temp.unlink(missing_ok=True)
        os.symlink(Path("releases") / release.version, temp)
        os.replace(temp, link)  # the one atomic step: before it the old release runs, after it the new
        _fsync_dir(self.root)
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

    async def _health_gate(self, release: Release, generation: int) -> None:
        healthy, reason = await self._watch_health(release)
        if healthy:
            self.store.put_many({UPDATE_KEY: None, FAILED_KEY: None})
            self.hooks.event("release_healthy", None, {"version": release.version})
            self.hooks.report(UpdateState.HEALTHY, f"{release.version} healthy", None)
            self._collect_garbage()
            return
        failed = {"digest": release.digest, "generation": generation}
        self.store.put(FAILED_KEY, json.dumps(failed).encode())
        await self.rollback(f"{release.version} failed its health check: {reason}")

    async def _watch_health(self, release: Release) -> tuple[bool, str]:
        spec = self.health.spec
        update = self.settings.update
        if spec is None:
            window = update.no_probe_window
        else:
            window = spec.initial_delay + spec.failure_threshold * max(spec.period, spec.timeout) + update.health_grace
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

    async def rollback(self, reason: str) -> str:
        """Switch back to the previous release, or to the configured workload when the failed one
        was the first release; report rolled_back."""
        previous = self.previous()
        current = self.current()
        if current is None:
            raise UpdateFailed("no previous release")
        link = self.root / "current"
        values: dict[str, bytes | None] = {
            UPDATE_KEY: None,
            PREVIOUS_VERSION: current.version.encode(),
            PREVIOUS_DIGEST: current.digest.encode(),
        }
        if previous is None:
            link.unlink(missing_ok=True)
            values |= {VERSION: None, DIGEST: None}
        else:
            temp = self.root / ".current.new"
            temp.unlink(missing_ok=True)
            os.symlink(Path("releases") / previous.version, temp)
            os.replace(temp, link)
            values |= {VERSION: previous.version.encode(), DIGEST: previous.digest.encode()}
        _fsync_dir(self.root)
        self.store.put_many(values)
        back_to = previous.version if previous is not None else "the configured workload"
        log.warning("%s: rolled back from %s to %s: %s", self.node, current.version, back_to, reason)
        await self.hooks.run_release(previous)
        self.hooks.event("rolled_back", reason, {"from": current.version, "to": back_to})
        self.hooks.report(UpdateState.ROLLED_BACK, reason, None)
        return f"rolled back from {current.version} to {back_to}"

    def mark_left_behind(self, digest: str) -> None:
        """An operator's rollback: do not converge back to what was left for this generation."""
        self.store.put(FAILED_KEY, json.dumps({"digest": digest, "generation": self._generation}).encode())

    def _collect_garbage(self) -> None:
        keep = {self._text(VERSION), self._text(PREVIOUS_VERSION)}
        releases = self.root / "releases"
        for directory in releases.iterdir():
            if directory.name not in keep:
                shutil.rmtree(directory, ignore_errors=True)
        downloads = self.root / "downloads"
        for part in downloads.glob("*.part") if downloads.is_dir() else []:
            if self.store.download("sha256:" + part.stem) is None:
                part.unlink(missing_ok=True)
        for payload in downloads.glob("*.payload") if downloads.is_dir() else []:
            payload.unlink(missing_ok=True)  # decoded, then the crash came before the unpack; no update runs now

    # ---- crash recovery --------------------------------------------------------------------

    async def _recover(self) -> None:
        raw = self.store.get(UPDATE_KEY)
        if raw is None:
            return
        record = json.loads(raw)
        phase = record["phase"]
        for staging in (self.root / "releases").glob(".*.partial") if (self.root / "releases").is_dir() else []:
            shutil.rmtree(staging, ignore_errors=True)  # an unpack the crash interrupted
        if phase == "health":
            release = self.current()
            if release is None or release.version != record["version"]:
                self._finish_interrupted_switch(record)
                release = self.current()
            if release is not None:
                log.info("%s: re-running the health window of %s after a restart", self.node, release.version)
                await self._health_gate(release, int(record["generation"]))
            return
        # downloading / installing: converging again resumes from the chunks on disk.
        self._target = ReleaseRef.model_validate(record["target"])
        self._generation = int(record["generation"])

    def _finish_interrupted_switch(self, record: dict[str, Any]) -> None:
        link = self.root / "current"
        target = os.readlink(link) if link.is_symlink() else None
        if target is not None and Path(target).name == record["version"]:
            release = self._release(record["version"])
            if release is not None:
                self.store.put_many({VERSION: release.version.encode(), DIGEST: release.digest.encode()})


def _first_missing(have: set[int], total: int | None) -> int:
    index = 0
    while index in have and (total is None or index < total):
        index += 1
    return index


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

"""Fetch an artifact into ``downloads/<target-hex>.part``, chunk by chunk, resumable.

The artifact comes over MQTT (``artifact/req`` / ``artifact/chunk``) or, when the desired release
names a URL and no delta applies, over HTTPS with Range requests (``agent.https_source``); both
fill the same ``.part`` file and chunk records, so either resumes what the other started, and a
failing HTTPS source falls back to MQTT. Each chunk is fsynced before it is recorded in agent.db,
so after a kill -9 the download resumes from the first missing chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from agent import core, failpoints
from agent.config import AgentSettings
from agent.store import Download, Store
from agent.transport import Inbound, Transport
from agent.update.hooks import Hooks
from agent.update.releases import Release, UpdateFailed
from fleet.protocol.codec import decode, encode
from fleet.protocol.errors import InvalidMessage, TransportError
from fleet.protocol.messages import ArtifactChunk, ArtifactRequest, ReleaseRef, UpdateState, digest_hex
from fleet.protocol.topics import Channel, node_topic

log = logging.getLogger(__name__)


def part_path(root: Path, target: str) -> Path:
    return root / "downloads" / f"{digest_hex(target)}.part"


def payload_path(root: Path, target: str) -> Path:
    return root / "downloads" / f"{digest_hex(target)}.payload"


def delta_base(current: Release | None, target: ReleaseRef) -> str | None:
    """The payload a delta to ``target`` may start from: the running release's, if the release
    server offers a delta from it and its payload is still kept; None asks for the full artifact."""
    if current is None or current.digest not in target.delta_bases:
        return None
    return current.digest if (current.directory / ".fleet" / "payload.tar").is_file() else None


class Downloader:
    """Fills the ``.part`` file of one artifact at a time, over MQTT or HTTPS."""

    def __init__(self, settings: AgentSettings, store: Store, transport: Transport, hooks: Hooks) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.transport = transport
        self.hooks = hooks
        self.root = settings.state_dir
        self._chunk_arrived = asyncio.Event()
        self._last_progress_report = 0.0
        self._server_error: str | None = None
        self._downloading: ReleaseRef | None = None  # chunks for anything else are stale

    def part_path(self, target: str) -> Path:
        return part_path(self.root, target)

    def complete(self, target: str) -> bool:
        download = self.store.download(target)
        return download is not None and len(self.store.stored_chunks(target)) >= download.total

    def discard(self, target: str) -> None:
        """Forget the chunks of ``target`` and delete its ``.part`` file: the next fetch starts over."""
        self.store.forget_download(target)
        self.part_path(target).unlink(missing_ok=True)

    # ---- inputs from the link --------------------------------------------------------------

    def on_reconnect(self) -> None:
        """Chunks in flight when the link dropped are gone (QoS 0): ask again now, not at the timeout."""
        self._chunk_arrived.set()

    def on_chunk(self, inbound: Inbound) -> None:
        self._take_chunk(inbound)
        self.transport.ack(inbound)

    def _take_chunk(self, inbound: Inbound) -> None:
        try:
            chunk = decode(inbound.topic, inbound.payload, ArtifactChunk)
        except InvalidMessage as exc:
            log.warning("%s: ignored artifact chunk: %s", self.node, exc)
            return
        self._store_chunk(chunk)
        self._chunk_arrived.set()

    # ---- over HTTPS ------------------------------------------------------------------------

    def https_usable(self, target: ReleaseRef) -> bool:
        if target.url is None:
            return False
        if target.artifact_size is None or target.artifact_digest is None:
            self.fall_back(target, f"{target.url}: the desired release lacks artifact_size/artifact_digest")
            return False
        from agent.https_source import SourceError, check_url  # idle agents never load http.client

        try:
            check_url(target.url)
        except SourceError as exc:
            self.hooks.event("https_refused", str(exc), {"version": target.version})
            self.fall_back(target, str(exc))
            return False
        return True

    def fall_back(self, target: ReleaseRef, reason: str) -> None:
        log.warning("%s: HTTPS source of %s unusable (%s); downloading over MQTT", self.node, target.version, reason)
        self.hooks.event("https_fallback", reason, {"version": target.version, "url": target.url})

    async def over_https(self, target: ReleaseRef) -> bool:
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
            while not self.complete(target.digest):
                index = core.first_missing(self.store.stored_chunks(target.digest), wanted.total)
                start = index * target.chunk_size
                length = min(target.chunk_size, wanted.size - start)
                try:
                    data = await asyncio.to_thread(client.fetch, start, length, wanted.size)
                except SourceError as exc:
                    failures += 1
                    self.hooks.event("download_error", str(exc), {"version": target.version, "source": "https"})
                    if failures >= self.settings.update.max_failures:
                        self.fall_back(target, f"{failures} failures in a row, last: {exc}")
                        return False
                    await asyncio.sleep(min(8.0, 0.5 * 2.0**failures))
                    continue
                failures = 0
                self._keep_chunk(target.digest, index, data, target.chunk_size, wanted.total)
        finally:
            client.close()
        return True

    # ---- over MQTT -------------------------------------------------------------------------

    async def over_mqtt(self, target: ReleaseRef, base: str | None) -> None:
        """Ask for windows of chunks from the first missing one until the artifact is complete."""
        self._downloading = target
        self._last_progress_report = 0.0
        failures = 0
        try:
            while not self.complete(target.digest):
                await self.transport.wait_connected()
                download = self.store.download(target.digest)
                ask = core.ask_window(
                    self.store.stored_chunks(target.digest),
                    download.total if download else None,
                    self.settings.update.window,
                    now=time.monotonic(),
                    connection=self.transport.connects,
                )
                self._request(ask.request(target.digest, base))
                status, held = await self._wait_for_chunks(target.digest, ask)
                if status is core.WindowStatus.SERVER_ERROR:
                    error, self._server_error = self._server_error or "", None
                    failures += 1
                    self.hooks.event("download_error", error, {"version": target.version})
                    wait = core.after_server_error(failures, self.settings.update.max_failures)
                    if wait is None:
                        raise UpdateFailed(core.server_error_reason(error))
                    await asyncio.sleep(wait)
                elif not core.progressed(ask, status, held):
                    log.info("%s: no chunks of %s arrived; asking again", self.node, target.version)
        finally:
            self._downloading = None

    def _request(self, request: ArtifactRequest) -> None:
        # Not connected: the download loop waits for the connection and asks again.
        with contextlib.suppress(TransportError):
            self.transport.publish(node_topic(self.node, Channel.ARTIFACT_REQ), encode(request), qos=1)

    async def _wait_for_chunks(self, target: str, ask: core.WindowAsk) -> tuple[core.WindowStatus, int]:
        """Wait until the asked window is filled, complete, timed out, lost to a reconnect or
        answered with a server error (``core.window_status``); that status and the chunks held."""
        timeout = self.settings.update.request_timeout
        while True:
            self._chunk_arrived.clear()
            held = len(self.store.stored_chunks(target))
            now = time.monotonic()
            status = core.window_status(
                ask,
                held=held,
                complete=self.complete(target),
                now=now,
                timeout=timeout,
                connection=self.transport.connects,
                server_error=self._server_error is not None,
            )
            if status is not core.WindowStatus.WAITING:
                return status, held
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._chunk_arrived.wait(), core.wait_left(ask, now, timeout))

    def _store_chunk(self, chunk: ArtifactChunk) -> None:
        downloading = self._downloading
        verdict = core.check_chunk(chunk, downloading.digest if downloading is not None else None)
        if verdict is core.ChunkVerdict.SERVER_ERROR:
            self._server_error = chunk.error
            return
        if verdict is core.ChunkVerdict.STALE or downloading is None:
            return  # a late chunk of an abandoned or finished download
        if verdict is core.ChunkVerdict.INCOMPLETE:
            log.warning("%s: chunk %d lacks its digests; ignored", self.node, chunk.index)
            return
        if verdict is core.ChunkVerdict.OUT_OF_RANGE:
            # Never written: at index * chunk_size it would land past the artifact's end.
            detail = f"chunk {chunk.index} is past the last of {chunk.total} chunks"
            log.warning("%s: %s; ignored", self.node, detail)
            self.hooks.event("chunk_refused", detail, {"index": chunk.index})
            return
        if verdict is core.ChunkVerdict.CORRUPT:
            log.warning(
                "%s: chunk %d of %s fails its digest; will ask again", self.node, chunk.index, chunk.digest[:19]
            )
            self.hooks.event("chunk_refused", f"chunk {chunk.index} digest mismatch", {"index": chunk.index})
            return
        assert chunk.artifact is not None and chunk.size is not None and chunk.total is not None  # KEEP
        wanted = Download(chunk.digest, chunk.base, chunk.artifact, chunk.size, chunk.total)
        self._start_download(wanted)
        if chunk.index in self.store.stored_chunks(chunk.digest):
            return
        self._keep_chunk(chunk.digest, chunk.index, chunk.data, downloading.chunk_size, chunk.total)

    # ---- the .part file and its chunk records ----------------------------------------------

    def _start_download(self, wanted: Download) -> None:
        """Record the artifact being fetched, keeping the chunks on disk only if they are of it."""
        if self.store.download(wanted.target) != wanted:
            # First chunk, or another artifact now (full instead of delta, or a rebuilt one).
            self.store.start_download(wanted)
            self.part_path(wanted.target).unlink(missing_ok=True)

    def _keep_chunk(self, target: str, index: int, data: bytes, chunk_size: int, total: int) -> None:
        self._write_chunk(target, index, data, chunk_size)
        self.store.chunk_stored(target, index)
        failpoints.hit("update.chunk_stored")
        self._maybe_report_progress(target, total)

    def _write_chunk(self, target: str, index: int, data: bytes, chunk_size: int) -> None:
        path = self.part_path(target)
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
        if not core.progress_due(now, self._last_progress_report, done, total):
            return
        self._last_progress_report = now
        self.hooks.report(UpdateState.DOWNLOADING, core.progress_detail(done, total), done / total)

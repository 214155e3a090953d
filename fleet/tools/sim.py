"""``fleet sim``: many simulated devices in one process, speaking the real protocol over mutual TLS.

Every simulated device is an ``agent.mqtt`` client with its own device certificate (the broker
forces client id = certificate CN and applies the per-device ACL): the agent's own MQTT adapter,
with no thread per client. One asyncio event loop drives them all; blocking TCP + TLS connects run
in a small thread pool (``connect_workers``), started at no more than ``connect_rate`` per second.

Every protocol decision is the agent's own, from ``agent.core``: which desired generation to apply,
command dedupe, expiry and validation (with the agent's ack texts), rollback against the command's
``from``/``to``, whether an update downloads or switches to a release still installed, and the
chunk windows (next window, filled, complete, timed out, lost to a reconnect, server-error backoff,
which chunks to keep). What a simulated device does not do like an agent:

- signatures and release manifests are not verified; a downloaded artifact is hashed (every chunk
  and the whole) but neither kept nor decompressed, and chunks more than two windows past the
  last contiguous one are dropped (asked for again) instead of written at their offset;
- no workload runs: ``restart`` is instant, and health comes from ``--fail-version`` /
  ``--fail-fraction``: such a device reports ``failed`` and stays unhealthy on that version (the
  agent would roll itself back) until told otherwise;
- nothing is durable (no outbox: paho sends QoS-1 messages again after a reconnect), progress is
  reported once per download, not every second, and a download that got no chunk after
  ``_STALL_RETRIES`` asks in a row fails (the agent keeps asking).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import core
from agent.config import UpdateSettings
from agent.mqtt import Inbound, MqttClient, Options, Will, tls_context
from certs import PkiPaths, issue_device
from fleet.protocol import (
    AckStatus,
    ArtifactChunk,
    Channel,
    Command,
    DesiredState,
    Health,
    Heartbeat,
    ReleaseRef,
    Reported,
    Status,
    UpdateState,
    channel_qos,
    channel_retained,
    decode,
    decode_raw,
    digest_hex,
    encode,
    node_topic,
    parse_node_topic,
    validate,
)
from fleet.protocol.errors import ConfigError, InvalidMessage, TransportError
from fleet.protocol.ids import is_valid_node_id
from fleet.protocol.messages import Message

log = logging.getLogger(__name__)

AGENT_VERSION = "fleet-sim"
_UPDATE = UpdateSettings()  # the agent's defaults: window, request timeout, failures before giving up
WINDOW = _UPDATE.window
"""Chunks asked for per ``artifact/req``."""
_TICK = 0.5
"""Seconds between ticker rounds (heartbeats, injected faults, reconnects, download timeouts)."""
_STALL_RETRIES = 30
"""Asks in a row without a chunk before the download counts as failed (the real agent never gives up)."""
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 10.0
_SEEN_COMMANDS = 256
_MAX_ERRORS_SHOWN = 20
_SHUTDOWN_GRACE = 5.0
_CONNECT_TIMEOUT = 5.0
"""TCP + TLS handshake (paho's default); the CONNACK may take up to the keepalive."""


@dataclass(frozen=True)
class SimSettings:
    agents: int
    host: str
    port: int
    certs: Path
    duration: float = 60.0
    heartbeat: float = 30.0
    offline_fraction: float = 0.0
    disconnect_rate: float = 0.0
    """Injected link drops per device per minute."""
    fail_version: str | None = None
    fail_fraction: float = 0.0
    prefix: str = "sim-"
    connect_rate: float = 200.0
    """New TLS connections started per second."""
    connect_workers: int = 8
    keepalive: int = 60
    initial_version: str | None = "0.0.0"
    """The release every device starts on; None: none installed (an agent running its configured workload)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.agents < 1:
            raise ConfigError(f"--agents {self.agents}: must be at least 1")
        for name in ("offline_fraction", "fail_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be between 0 and 1")
        for name in ("duration", "heartbeat", "connect_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        if self.disconnect_rate < 0:
            raise ConfigError(f"--disconnect-rate {self.disconnect_rate}: must not be negative")
        if self.connect_workers < 1:
            raise ConfigError(f"connect_workers {self.connect_workers}: must be at least 1")
        if not is_valid_node_id(self.node_id(self.agents - 1)):
            raise ConfigError(f"--prefix {self.prefix!r}: {self.node_id(0)!r} is not a valid node id")

    def node_id(self, index: int) -> str:
        return f"{self.prefix}{index:05d}"


@dataclass
class SimStats:
    heartbeats_sent: int = 0
    messages_received: int = 0
    commands_acked: int = 0
    desired_applied: int = 0
    downloads_completed: int = 0
    downloads_failed: int = 0
    bytes_downloaded: int = 0
    disconnects_injected: int = 0
    connection_losses: int = 0
    connect_attempts: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < _MAX_ERRORS_SHOWN:
            self.error_samples.append(message)
        log.debug("%s", message)


_Artifact = tuple[str | None, str, int, int]
"""What the chunks say the artifact is: (delta base, artifact digest, size, chunk count)."""


@dataclass
class _Download:
    release: ReleaseRef
    artifact: _Artifact | None = None
    held: set[int] = field(default_factory=set)
    """Chunks verified (the agent's stored chunks)."""
    buffered: dict[int, bytes] = field(default_factory=dict)
    """Held chunks past the first gap, waiting to be hashed in order."""
    hashed: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    ask: core.WindowAsk | None = None
    timeout: float = _UPDATE.request_timeout
    resume_at: float | None = None
    """After a server error: when to ask again."""
    stalls: int = 0
    server_errors: int = 0
    attempt: int = 1

    @property
    def total(self) -> int | None:
        return None if self.artifact is None else self.artifact[3]

    def restart(self, artifact: _Artifact | None) -> None:
        """Drop what was held: the first chunk of another artifact, or a new attempt."""
        self.artifact = artifact
        self.held.clear()
        self.buffered.clear()
        self.hashed = 0
        self.hasher = hashlib.sha256()
        self.size = 0


@dataclass
class SimDevice:
    index: int
    node_id: str
    cert: Path
    key: Path
    offline: bool
    fails: bool
    version: str | None
    """The running release (None: none, the configured workload)."""
    digest: str | None = None
    previous: str | None = None
    previous_digest: str | None = None
    client: MqttClient | None = None
    generation: int | None = None
    """The applied desired generation (None: none yet; reported as 0 like the agent)."""
    state: UpdateState = UpdateState.IDLE
    healthy: bool = True
    commands: core.CommandMemory = field(default_factory=lambda: core.CommandMemory(_SEEN_COMMANDS))
    controller_clock: core.ControllerClock | None = None
    """The controller's clock as learned from ``issued_at`` (not verified: the simulator checks no signature)."""
    failed_release: tuple[str, int] | None = None
    """(digest, generation) that failed or was rolled back: not retried for that generation."""
    heartbeat_seq: int = 0
    next_heartbeat: float = 0.0
    dialing: bool = False
    reconnect_at: float | None = None
    backoff: float = _BACKOFF_MIN
    attempt_started: float = 0.0
    first_connect: float | None = None
    """Seconds from the first attempt's start to the first CONNACK."""
    first_attempt: float | None = None
    download: _Download | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    @property
    def connection(self) -> int:
        return 0 if self.client is None else self.client.id

    def topic(self, channel: Channel) -> str:
        return node_topic(self.node_id, channel)


def prepare_certs(settings: SimSettings) -> list[tuple[str, Path, Path]]:
    """Every simulated device's (node id, cert, key), issuing the missing ones into the PKI."""
    pki = PkiPaths(settings.certs)
    if not pki.ca_cert.is_file():
        raise ConfigError(f"{pki.ca_cert}: no such file (run `fleet certs init {settings.certs}`)")
    out = []
    for index in range(settings.agents):
        node_id = settings.node_id(index)
        paths = pki.device(node_id)
        if not (paths.cert.is_file() and paths.key.is_file()):
            paths = issue_device(pki, node_id)
        out.append((node_id, paths.cert, paths.key))
    return out


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[max(0, min(98, round(fraction * 100) - 1))]


class Simulator:
    """N simulated devices on one event loop; ``run()`` returns the report as a dict."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.stats = SimStats()
        self.devices: list[SimDevice] = []
        self._rng = random.Random(settings.seed)  # noqa: S311 - simulation, not cryptography
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._queue: asyncio.Queue[SimDevice] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ca = str(PkiPaths(settings.certs).ca_cert)
        self._open_sockets = 0
        self._all_closed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop early; safe from any thread and from a signal handler."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    async def run(self) -> dict[str, Any]:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._queue = asyncio.Queue()
        identities = await asyncio.to_thread(prepare_certs, self.settings)
        self._make_devices(identities)
        started = time.monotonic()
        self._pool = ThreadPoolExecutor(self.settings.connect_workers, thread_name_prefix="sim-connect")
        try:
            # A failing loop ends the simulation at once with its exception (nothing is swallowed);
            # leaving the group waits for the connects still in the pool.
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for device in self.devices:
                    if not device.offline:
                        self._queue.put_nowait(device)
                connector = tasks.create_task(self._connector(), name="sim-connector")
                ticker = tasks.create_task(self._ticker(), name="sim-ticker")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self.settings.duration)
                elapsed = time.monotonic() - started
                self._stopping = True
                connector.cancel()
                ticker.cancel()
            connected_at_end = sum(1 for d in self.devices if d.connected)
            await self._disconnect_all()
        finally:
            self._stopping = True
            self._tasks = None
            await asyncio.to_thread(self._pool.shutdown, wait=True)
            self._force_close_all()
        return self._report(started, elapsed, connected_at_end)

    def _make_devices(self, identities: list[tuple[str, Path, Path]]) -> None:
        settings = self.settings
        count = len(identities)
        offline = set(self._rng.sample(range(count), round(settings.offline_fraction * count)))
        failing = set(self._rng.sample(range(count), round(settings.fail_fraction * count)))
        self.devices = [
            SimDevice(
                index=index,
                node_id=node_id,
                cert=cert,
                key=key,
                offline=index in offline,
                fails=index in failing,
                version=settings.initial_version,
            )
            for index, (node_id, cert, key) in enumerate(identities)
        ]

    async def _disconnect_all(self) -> None:
        """Publish a retained offline status and DISCONNECT; wait (bounded) for the sockets to close."""
        for device in self.devices:
            client = device.client
            if client is None or not client.connected:
                continue
            self._publish(device, Channel.STATUS, Status(state="offline", ts=time.time(), agent_version=AGENT_VERSION))
            client.disconnect()
        if self._open_sockets > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=_SHUTDOWN_GRACE)

    def _force_close_all(self) -> None:
        for device in self.devices:
            if device.client is not None:
                device.client.close()

    # -- connecting ------------------------------------------------------------------------------

    async def _connector(self) -> None:
        """Start queued connects at no more than ``connect_rate`` per second."""
        assert self._queue is not None and self._tasks is not None
        interval = 1.0 / self.settings.connect_rate
        limit = asyncio.Semaphore(self.settings.connect_workers * 4)
        next_at = time.monotonic()
        while True:
            device = await self._queue.get()
            await limit.acquire()
            now = time.monotonic()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at = max(next_at + interval, time.monotonic() - 1.0)
            task = self._tasks.create_task(self._connect(device), name=f"sim-connect-{device.node_id}")
            task.add_done_callback(lambda _task: limit.release())

    def _client(self, device: SimDevice) -> MqttClient:
        if device.client is not None:
            return device.client
        settings = self.settings
        options = Options(
            client_id=device.node_id,
            host=settings.host,
            port=settings.port,
            keepalive=settings.keepalive,
            # Built here, not in the connect pool: loading a key holds the GIL for milliseconds,
            # and eight workers doing it starve the event loop (connects got slower, not faster).
            tls=tls_context(self._ca, device.cert, device.key),
            will=Will(device.topic(Channel.STATUS), encode(Status(state="offline", agent_version=AGENT_VERSION))),
            clean_session=False,
            connect_timeout=_CONNECT_TIMEOUT,
            connack_timeout=settings.keepalive,
        )
        device.client = MqttClient(
            options,
            on_message=functools.partial(self._on_message, device),
            on_connect=functools.partial(self._on_connect, device),
            on_lost=functools.partial(self._on_lost, device),
            on_closed=self._socket_closed,
            on_error=functools.partial(self._handler_failed, device),
        )
        return device.client

    async def _connect(self, device: SimDevice) -> None:
        """Open the connection (TCP + TLS in the pool); the CONNACK is handled by ``_on_connect``."""
        assert self._pool is not None
        if self._stopping or device.dialing or (device.client is not None and device.client.socket_open):
            return
        try:
            client = self._client(device)
        except OSError as exc:  # ssl.SSLError included
            self.stats.error(f"{device.node_id}: cannot load TLS identity: {exc}")
            return
        device.dialing = True
        device.attempt_started = time.monotonic()
        if device.first_attempt is None:
            device.first_attempt = device.attempt_started
        self.stats.connect_attempts += 1
        try:
            accepted = await client.dial(self._pool)
        except TransportError as exc:
            self.stats.error(f"{device.node_id}: {exc}")
            self._schedule_reconnect(device)
            return
        finally:
            device.dialing = False
        self._open_sockets += 1
        accepted.add_done_callback(functools.partial(self._connack_failed, device))

    def _connack_failed(self, device: SimDevice, accepted: asyncio.Future[int]) -> None:
        error = None if accepted.cancelled() else accepted.exception()
        if error is None or self._stopping:
            return
        self.stats.error(f"{device.node_id}: {error}")
        self._schedule_reconnect(device)

    def _socket_closed(self) -> None:
        self._open_sockets -= 1
        if self._open_sockets == 0 and self._stopping:
            self._all_closed.set()

    def _schedule_reconnect(self, device: SimDevice) -> None:
        if self._stopping or device.offline:
            return
        delay = device.backoff * self._rng.uniform(0.5, 1.0)
        device.backoff = min(device.backoff * 2, _BACKOFF_MAX)
        device.reconnect_at = time.monotonic() + delay

    # -- connection callbacks --------------------------------------------------------------------

    def _on_connect(self, device: SimDevice, _connection: int) -> None:
        now = time.monotonic()
        device.backoff = _BACKOFF_MIN
        if device.first_connect is None:
            device.first_connect = now - (device.first_attempt or device.attempt_started)
        assert device.client is not None
        device.client.subscribe(
            [
                (device.topic(Channel.DESIRED), channel_qos(Channel.DESIRED)),
                (device.topic(Channel.CMD), channel_qos(Channel.CMD)),
                (device.topic(Channel.ARTIFACT_CHUNK), 0),
            ]
        )
        self._publish(device, Channel.STATUS, Status(state="online", ts=time.time(), agent_version=AGENT_VERSION))
        self._report_state(device)
        device.next_heartbeat = now + self.settings.heartbeat * self._rng.random()
        download = device.download
        if download is not None and download.resume_at is None:
            if download.ask is None:
                self._ask(device, download)
            else:
                self._advance(device, download)  # reconnected: what was in flight is lost, ask again

    def _on_lost(self, device: SimDevice, _connection: int, _reason: str) -> None:
        if self._stopping:
            return
        self.stats.connection_losses += 1
        self._schedule_reconnect(device)

    def _handler_failed(self, device: SimDevice, exc: BaseException) -> None:
        log.error("%s: message handler failed", device.node_id, exc_info=exc)
        self.stats.error(f"{device.node_id}: message handler failed: {exc!r}")

    def _on_message(self, device: SimDevice, inbound: Inbound) -> None:
        self.stats.messages_received += 1
        try:
            node_id, channel = parse_node_topic(inbound.topic)
        except InvalidMessage as exc:
            self.stats.error(f"{device.node_id}: {inbound.topic}: {exc}")
            return
        if node_id != device.node_id:
            self.stats.error(f"{device.node_id}: got a message for {node_id}")
        elif channel is Channel.DESIRED:
            self._on_desired(device, inbound)
        elif channel is Channel.CMD:
            self._on_command(device, inbound)
        elif channel is Channel.ARTIFACT_CHUNK:
            self._on_chunk(device, inbound)

    # -- publishing ------------------------------------------------------------------------------

    def _publish(self, device: SimDevice, channel: Channel, msg: Message) -> None:
        client = device.client
        if client is None:
            return
        # Not connected: the link just dropped; the state goes out again on the next connect.
        with contextlib.suppress(TransportError):
            client.send(device.topic(channel), encode(msg), qos=channel_qos(channel), retain=channel_retained(channel))

    def _reported(self, device: SimDevice, detail: str | None = None, progress: float | None = None) -> None:
        reported = Reported(
            generation=device.generation or 0,
            version=device.version,
            previous_version=device.previous,
            state=device.state,
            detail=detail,
            progress=progress,
            ts=time.time(),
        )
        self._publish(device, Channel.REPORTED, reported)

    def _report_state(self, device: SimDevice, detail: str | None = None) -> None:
        self._reported(device, detail)
        self._publish(device, Channel.HEALTH, Health(version=device.version, healthy=device.healthy, ts=time.time()))

    def _ack(self, device: SimDevice, command_id: str, status: AckStatus, detail: str | None) -> None:
        self._publish(device, Channel.ACK, core.ack(command_id, status, detail, time.time()))

    # -- desired state and updates ---------------------------------------------------------------

    def _on_desired(self, device: SimDevice, inbound: Inbound) -> None:
        if not inbound.payload:
            return  # a cleared retained topic: nothing to converge to
        try:
            desired = decode(inbound.topic, inbound.payload, DesiredState)
        except InvalidMessage as exc:
            self.stats.error(f"{device.node_id}: {exc}")
            return
        self._learn_controller_time(device, desired.issued_at)
        decision = core.accept_desired(device.generation, desired.generation)
        if not decision.apply:
            if decision.reason is not None:
                log.debug("%s: %s", device.node_id, decision.reason)
            return
        device.generation = desired.generation
        self.stats.desired_applied += 1
        release = desired.release
        installed = {digest for digest in (device.digest, device.previous_digest) if digest is not None}
        plan = core.plan_update(
            release, desired.generation, running=device.digest, installed=installed, failed=device.failed_release
        )
        download = device.download
        if plan is core.UpdatePlan.DOWNLOAD and release is not None:
            if download is None or download.release.digest != release.digest:
                download = device.download = _Download(release=release)
                self._ask(device, download)
            device.state = UpdateState.DOWNLOADING
            self._reported(device, progress=0.0)
            return
        device.download = None
        if plan is core.UpdatePlan.SWITCH and release is not None:
            self._switch(device, release)
        else:
            self._report_state(device)

    def _switch(self, device: SimDevice, release: ReleaseRef) -> None:
        """The new release runs; the one before it becomes the previous one (the agent's A/B switch)."""
        if device.version is not None and device.version != release.version:
            device.previous, device.previous_digest = device.version, device.digest
        device.version, device.digest = release.version, release.digest
        if device.fails and release.version == self.settings.fail_version:
            device.state, device.healthy = UpdateState.FAILED, False
            device.failed_release = (release.digest, device.generation or 0)
            self._report_state(device, "injected health failure")
        else:
            device.state, device.healthy = UpdateState.HEALTHY, True
            self._report_state(device, f"{release.version} healthy")

    def _ask(self, device: SimDevice, download: _Download) -> None:
        """Ask for the next window of chunks (or wait for the connection)."""
        client = device.client
        if client is None or not client.connected:
            download.ask = None  # asked on the next connect
            return
        download.ask = core.ask_window(
            download.held, download.total, WINDOW, now=time.monotonic(), connection=client.id
        )
        # Jittered (never slower than the agent): a release service that shed a burst of requests
        # does not get them all back at the same moment.
        download.timeout = _UPDATE.request_timeout * self._rng.uniform(0.5, 1.0)
        self._publish(device, Channel.ARTIFACT_REQ, download.ask.request(download.release.digest))

    def _advance(self, device: SimDevice, download: _Download) -> None:
        """After a chunk, a tick or a reconnect: ask for the next window, ask again, or finish."""
        ask = download.ask
        if ask is None:
            return
        total = download.total
        held = len(download.held)
        status = core.window_status(
            ask,
            held=held,
            complete=total is not None and held >= total,
            now=time.monotonic(),
            timeout=download.timeout,
            connection=device.connection,
        )
        if status is core.WindowStatus.WAITING:
            return
        if status is core.WindowStatus.COMPLETE:
            self._verify(device, download)
            return
        if not core.progressed(ask, status, held):
            download.stalls += 1
            if download.stalls > _STALL_RETRIES:
                self._download_failed(device, download, f"no chunk after {_STALL_RETRIES} asks")
                return
        self._ask(device, download)

    def _on_chunk(self, device: SimDevice, inbound: Inbound) -> None:
        try:
            chunk = decode(inbound.topic, inbound.payload, ArtifactChunk)
        except InvalidMessage as exc:
            self.stats.error(f"{device.node_id}: {exc}")
            return
        download = device.download
        verdict = core.check_chunk(chunk, download.release.digest if download is not None else None)
        if download is None or verdict is core.ChunkVerdict.STALE:
            return  # a late chunk of an abandoned or finished download
        if verdict is core.ChunkVerdict.SERVER_ERROR:
            self._server_error(device, download, chunk.error or "")
            return
        if verdict is not core.ChunkVerdict.KEEP:
            self.stats.error(f"{device.node_id}: chunk {chunk.index} of {download.release.version}: {verdict}")
            return  # asked for again when the window times out
        assert chunk.artifact is not None and chunk.size is not None and chunk.total is not None
        artifact = (chunk.base, chunk.artifact, chunk.size, chunk.total)
        if download.artifact != artifact:
            download.restart(artifact)  # the first chunk, or of another artifact (full instead of delta...)
        if chunk.index in download.held or chunk.index >= download.hashed + 2 * WINDOW:
            return
        download.held.add(chunk.index)
        download.buffered[chunk.index] = chunk.data
        while download.hashed in download.buffered:
            data = download.buffered.pop(download.hashed)
            download.hasher.update(data)
            download.size += len(data)
            download.hashed += 1
            self.stats.bytes_downloaded += len(data)
        download.stalls = 0
        self._advance(device, download)

    def _verify(self, device: SimDevice, download: _Download) -> None:
        """Every chunk is held: check the assembled artifact, then switch (or fetch it again)."""
        assert download.artifact is not None
        _base, digest, size, _total = download.artifact
        if download.size == size and download.hasher.hexdigest() == digest_hex(digest):
            self.stats.downloads_completed += 1
            device.download = None
            self._switch(device, download.release)
            return
        self.stats.error(f"{device.node_id}: artifact of {download.release.version} does not verify")
        if not core.refetch_bad_artifact(download.attempt, _UPDATE.max_failures):
            self._download_failed(device, download, core.artifact_refused(download.release.version, download.attempt))
            return
        download.attempt += 1
        download.restart(None)
        self._ask(device, download)

    def _server_error(self, device: SimDevice, download: _Download, error: str) -> None:
        download.server_errors += 1
        wait = core.after_server_error(download.server_errors, _UPDATE.max_failures)
        if wait is None:
            self._download_failed(device, download, core.server_error_reason(error))
            return
        download.ask = None
        download.resume_at = time.monotonic() + wait

    def _download_failed(self, device: SimDevice, download: _Download, reason: str) -> None:
        self.stats.downloads_failed += 1
        self.stats.error(f"{device.node_id}: download of {download.release.version} failed: {reason}")
        device.download = None
        device.state = UpdateState.FAILED
        device.failed_release = (download.release.digest, device.generation or 0)
        self._report_state(device, reason)

    # -- commands --------------------------------------------------------------------------------

    def _on_command(self, device: SimDevice, inbound: Inbound) -> None:
        try:
            raw = decode_raw(inbound.topic, inbound.payload)
        except InvalidMessage as exc:
            self.stats.error(f"{device.node_id}: {exc}")
            return
        try:
            command = validate(inbound.topic, raw, Command)
        except InvalidMessage as exc:
            self.stats.error(f"{device.node_id}: {exc}")
            command_id = core.refusable_id(raw)
            if command_id is not None:
                if device.commands.status(command_id) is None:
                    device.commands.record(command_id, AckStatus.REJECTED.value)
                self._ack(device, command_id, AckStatus.REJECTED, exc.reason)
            return
        earlier = device.commands.status(command.id)
        if earlier is None:
            device.commands.record(command.id, "received")
        self._learn_controller_time(device, command.issued_at)
        now = core.controller_now(device.controller_clock, time.time())  # expiry: on the controller's clock
        intake = core.command_intake(command, earlier=earlier, now=now)
        if intake.remember:
            device.commands.record(command.id, intake.ack.value)
        self._ack(device, command.id, intake.ack, intake.detail)
        if not intake.execute:
            return
        device.commands.record(command.id, "executing")
        status, detail = self._execute(device, command)
        device.commands.record(command.id, status.value)
        self._ack(device, command.id, status, detail)
        self.stats.commands_acked += 1

    @staticmethod
    def _learn_controller_time(device: SimDevice, issued_at: float | None) -> None:
        if issued_at is not None:
            device.controller_clock = core.learn_controller_time(device.controller_clock, issued_at, time.time())

    def _execute(self, device: SimDevice, command: Command) -> tuple[AckStatus, str | None]:
        action = command.action
        if action == "ping":
            return core.result("pong")
        if action == "report":
            self._report_state(device)
            return core.result("reported")
        if action == "restart":
            return core.result("workload restarted (simulated)")
        if action == "reload":
            self._reported(device)
            return core.result("configuration reloaded")
        if action == "rollback":
            return self._rollback(device, command)
        raise AssertionError(f"action {action!r} passed core.command_intake but has no simulation")

    def _rollback(self, device: SimDevice, command: Command) -> tuple[AckStatus, str | None]:
        decision = core.decide_rollback(device.version, device.previous, command.args)
        if decision.verdict is core.RollbackVerdict.NOOP:
            return core.result(decision.detail)
        if decision.verdict is core.RollbackVerdict.FAIL:
            return core.result(error=decision.detail or core.NO_PREVIOUS_RELEASE)
        running, running_digest = device.version, device.digest
        assert running is not None
        device.version, device.digest = device.previous, device.previous_digest
        device.previous, device.previous_digest = running, running_digest
        if running_digest is not None:
            device.failed_release = (running_digest, device.generation or 0)  # not converged back to
        device.state, device.healthy = UpdateState.ROLLED_BACK, True
        self._report_state(device, core.ROLLBACK_REASON)
        return core.result(core.rolled_back(running, decision.back_to))

    # -- the ticker ------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        assert self._queue is not None
        drop_chance = self.settings.disconnect_rate / 60.0 * _TICK
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for device in self.devices:
                if device.reconnect_at is not None and now >= device.reconnect_at:
                    device.reconnect_at = None
                    self._queue.put_nowait(device)
                if not device.connected:
                    continue
                if drop_chance and self._rng.random() < drop_chance:
                    self._drop_link(device)
                    continue
                if now >= device.next_heartbeat:
                    self._heartbeat(device, now)
                download = device.download
                if download is None:
                    continue
                if download.resume_at is not None:
                    if now >= download.resume_at:
                        download.resume_at = None
                        self._ask(device, download)
                else:
                    self._advance(device, download)

    def _heartbeat(self, device: SimDevice, now: float) -> None:
        device.next_heartbeat = now + self.settings.heartbeat * self._rng.uniform(0.9, 1.1)
        device.heartbeat_seq += 1
        self._publish(
            device,
            Channel.HEARTBEAT,
            Heartbeat(
                seq=device.heartbeat_seq,
                uptime=now - device.started,
                cpu=self._rng.uniform(1.0, 20.0),
                mem_free=256 * 1024 * 1024,
                disk_free=4 * 1024 * 1024 * 1024,
                version=device.version,
            ),
        )
        self._publish(device, Channel.HEALTH, Health(version=device.version, healthy=device.healthy, ts=time.time()))
        self.stats.heartbeats_sent += 1

    def _drop_link(self, device: SimDevice) -> None:
        """Cut the TCP connection without DISCONNECT (the broker publishes the last will)."""
        if device.client is not None and device.client.drop():
            self.stats.disconnects_injected += 1

    # -- report ----------------------------------------------------------------------------------

    def _report(self, started: float, elapsed: float, connected_at_end: int) -> dict[str, Any]:
        online = [d for d in self.devices if not d.offline]
        times = [d.first_connect for d in self.devices if d.first_connect is not None]
        ever = len(times)
        last = max(
            (d.first_attempt + d.first_connect for d in online if d.first_attempt and d.first_connect is not None),
            default=None,
        )
        total = last - started if last is not None and ever == len(online) else None
        stats = self.stats
        return {
            "devices": len(self.devices),
            "offline_by_design": len(self.devices) - len(online),
            "ever_connected": ever,
            "connected_at_end": connected_at_end,
            "duration_s": round(elapsed, 3),
            "connect_time_s": {
                "p50": _round(_percentile(times, 0.50)),
                "p95": _round(_percentile(times, 0.95)),
                "max": _round(max(times, default=None)),
                "all_connected_after": _round(total),
                "per_second": round(ever / total, 1) if total else None,
            },
            "connect_attempts": stats.connect_attempts,
            "connection_losses": stats.connection_losses,
            "disconnects_injected": stats.disconnects_injected,
            "heartbeats_sent": stats.heartbeats_sent,
            "messages_received": stats.messages_received,
            "commands_acked": stats.commands_acked,
            "desired_applied": stats.desired_applied,
            "downloads_completed": stats.downloads_completed,
            "downloads_failed": stats.downloads_failed,
            "bytes_downloaded": stats.bytes_downloaded,
            "errors": stats.errors,
            "error_samples": stats.error_samples,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


async def run_sim(settings: SimSettings, simulator: Simulator | None = None) -> dict[str, Any]:
    """Run a simulation to its end (``duration`` or ``Simulator.request_stop``); the JSON-able report."""
    return await (simulator or Simulator(settings)).run()

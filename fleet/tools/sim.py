"""``fleet sim``: many simulated devices in one process, speaking the real protocol over mutual TLS.

Every simulated device is a paho client with its own device certificate (the broker forces client
id = certificate CN and applies the per-device ACL). No client gets a network thread: one asyncio
event loop drives them all through paho's external-loop API, as aiomqtt does (``loop.add_reader``
-> ``loop_read``, ``on_socket_register_write`` -> ``loop.add_writer`` -> ``loop_write``, and one
ticker calling ``loop_misc`` about once a second for keepalive).

paho's ``reconnect()`` opens the TCP connection and does the TLS handshake blocking. Thousands of
those on the event loop would stall every connected device, so connects run in a small thread pool
(``connect_workers``) with the socket callbacks detached; only when ``reconnect()`` has returned does
the loop thread attach the socket to the event loop. From then on the client is touched only by
the loop thread.

Simplifications against the real agent: signatures and release manifests are not verified, and a
downloaded artifact is hashed (every chunk and the whole) but neither kept nor decompressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import ssl
import statistics
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from certs import PkiPaths, issue_device
from fleet.protocol import (
    Ack,
    AckStatus,
    ArtifactChunk,
    ArtifactRequest,
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
    digest_hex,
    encode,
    node_topic,
    parse_node_topic,
)
from fleet.protocol.errors import ConfigError, FleetError
from fleet.protocol.ids import is_valid_node_id
from fleet.protocol.messages import Message

log = logging.getLogger(__name__)

AGENT_VERSION = "fleet-sim"
WINDOW = 8
"""Chunks asked for per ``artifact/req``."""
_TICK = 0.5
"""Seconds between ticker rounds (keepalive, heartbeats, injected faults, reconnects, stalls)."""
_STALL = 10.0
"""Seconds without a chunk before a window is asked for again (jittered by +-50 % per device, so a
release service that shed a burst of requests does not get them all back at the same moment)."""
_STALL_RETRIES = 30
"""Asks in a row without a chunk before the download counts as failed (the real agent never gives up)."""
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 10.0
_SEEN_COMMANDS = 256
_MAX_ERRORS_SHOWN = 20
_SHUTDOWN_GRACE = 5.0


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
    initial_version: str = "0.0.0"
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


@dataclass
class _Download:
    release: ReleaseRef
    generation: int
    next: int = 0
    window_end: int = 0
    total: int | None = None
    hasher: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    last_activity: float = 0.0
    stalls: int = 0
    stall_after: float = _STALL


@dataclass
class SimDevice:
    index: int
    node_id: str
    cert: Path
    key: Path
    offline: bool
    fails: bool
    version: str
    client: mqtt.Client | None = None
    previous: str | None = None
    generation: int = 0
    target: int = 0
    state: UpdateState = UpdateState.IDLE
    healthy: bool = True
    seen_commands: OrderedDict[str, None] = field(default_factory=OrderedDict)
    heartbeat_seq: int = 0
    next_heartbeat: float = 0.0
    connected: bool = False
    connecting: bool = False
    reconnect_at: float | None = None
    backoff: float = _BACKOFF_MIN
    attempt_started: float = 0.0
    first_connect: float | None = None
    """Seconds from the first attempt's start to the first CONNACK."""
    first_attempt: float | None = None
    download: _Download | None = None
    started: float = field(default_factory=time.monotonic)

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
        self._connects: set[asyncio.Task[None]] = set()
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
            for device in self.devices:
                if not device.offline:
                    self._queue.put_nowait(device)
            connector = asyncio.create_task(self._connector(), name="sim-connector")
            ticker = asyncio.create_task(self._ticker(), name="sim-ticker")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.duration)
            elapsed = time.monotonic() - started
            self._stopping = True
            for task in (connector, ticker):
                task.cancel()
            await asyncio.gather(connector, ticker, return_exceptions=True)
            if self._connects:
                await asyncio.gather(*self._connects, return_exceptions=True)
            connected_at_end = sum(1 for d in self.devices if d.connected)
            await self._disconnect_all()
        finally:
            self._stopping = True
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
            if client is None or not device.connected:
                continue
            self._publish(device, Channel.STATUS, Status(state="offline", ts=time.time(), agent_version=AGENT_VERSION))
            client.disconnect()
        if self._open_sockets:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=_SHUTDOWN_GRACE)

    def _force_close_all(self) -> None:
        for device in self.devices:
            client = device.client
            if client is not None and client.socket() is not None:
                # paho has no public "drop the socket" call; _sock_close runs on_socket_close
                # (unregistering it from the loop) and closes it.
                client._sock_close()
            device.connected = False

    # -- connecting ------------------------------------------------------------------------------

    async def _connector(self) -> None:
        """Start queued connects at no more than ``connect_rate`` per second."""
        assert self._queue is not None
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
            task = asyncio.create_task(self._connect(device), name=f"sim-connect-{device.node_id}")
            self._connects.add(task)
            task.add_done_callback(self._connects.discard)
            task.add_done_callback(lambda _task: limit.release())

    def _client(self, device: SimDevice) -> mqtt.Client:
        if device.client is not None:
            return device.client
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.node_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            userdata=device,
        )
        context = ssl.create_default_context(cafile=self._ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(device.cert), str(device.key))
        client.tls_set_context(context)
        client.will_set(
            device.topic(Channel.STATUS),
            encode(Status(state="offline", agent_version=AGENT_VERSION)),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        device.client = client
        return client

    async def _connect(self, device: SimDevice) -> None:
        loop = self._loop
        assert loop is not None and self._pool is not None
        if self._stopping or device.connected or device.connecting:
            return
        try:
            client = self._client(device)
        except (OSError, ssl.SSLError) as exc:
            self.stats.error(f"{device.node_id}: cannot load TLS identity: {exc}")
            return
        self._detach(client)  # the worker thread must not touch the event loop
        device.connecting = True
        device.attempt_started = time.monotonic()
        if device.first_attempt is None:
            device.first_attempt = device.attempt_started
        self.stats.connect_attempts += 1
        try:
            rc = await loop.run_in_executor(self._pool, client.reconnect)
        except (OSError, ssl.SSLError, ValueError) as exc:
            device.connecting = False
            self.stats.error(f"{device.node_id}: connect failed: {exc}")
            self._schedule_reconnect(device)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.stats.error(f"{device.node_id}: connect failed: {mqtt.error_string(rc)}")
        self._attach(device)

    def _detach(self, client: mqtt.Client) -> None:
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None

    def _attach(self, device: SimDevice) -> None:
        client, loop = device.client, self._loop
        assert client is not None and loop is not None
        sock = client.socket()
        if sock is None:
            device.connecting = False
            self._schedule_reconnect(device)
            return
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        loop.add_reader(sock, self._readable, device)
        self._open_sockets += 1
        if client.want_write():
            loop.add_writer(sock, self._writable, device)

    def _schedule_reconnect(self, device: SimDevice) -> None:
        if self._stopping or device.offline:
            return
        delay = device.backoff * self._rng.uniform(0.5, 1.0)
        device.backoff = min(device.backoff * 2, _BACKOFF_MAX)
        device.reconnect_at = time.monotonic() + delay

    # -- socket callbacks (loop thread) ------------------------------------------------------------

    def _readable(self, device: SimDevice) -> None:
        client = device.client
        assert client is not None
        rc = client.loop_read()
        # TLS may hold decrypted bytes that no longer show as a readable file descriptor.
        sock = client.socket()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = client.loop_read()
            sock = client.socket()

    def _writable(self, device: SimDevice) -> None:
        client = device.client
        assert client is not None
        client.loop_write()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._open_sockets -= 1
        if self._open_sockets == 0 and self._stopping:
            self._all_closed.set()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._writable, userdata)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    # -- MQTT callbacks (loop thread) --------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, device: SimDevice, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        device.connecting = False
        if reason.is_failure:
            self.stats.error(f"{device.node_id}: CONNACK refused: {reason}")
            return  # the broker closes the connection; _on_disconnect schedules the retry
        now = time.monotonic()
        device.connected = True
        device.backoff = _BACKOFF_MIN
        if device.first_connect is None:
            device.first_connect = now - (device.first_attempt or device.attempt_started)
        client.subscribe(
            [
                (device.topic(Channel.DESIRED), channel_qos(Channel.DESIRED)),
                (device.topic(Channel.CMD), channel_qos(Channel.CMD)),
                (device.topic(Channel.ARTIFACT_CHUNK), 0),
            ]
        )
        self._publish(device, Channel.STATUS, Status(state="online", ts=time.time(), agent_version=AGENT_VERSION))
        self._report_state(device)
        device.next_heartbeat = now + self.settings.heartbeat * self._rng.random()
        if device.download is not None:
            self._request_window(device, device.download)

    def _on_disconnect(
        self, client: mqtt.Client, device: SimDevice, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        was_connected = device.connected
        device.connected = False
        device.connecting = False
        if self._stopping:
            return
        if was_connected:
            self.stats.connection_losses += 1
        self._schedule_reconnect(device)

    def _on_message(self, client: mqtt.Client, device: SimDevice, message: mqtt.MQTTMessage) -> None:
        self.stats.messages_received += 1
        try:
            node_id, channel = parse_node_topic(message.topic)
            if node_id != device.node_id:
                self.stats.error(f"{device.node_id}: got a message for {node_id}")
            elif channel is Channel.DESIRED:
                self._on_desired(device, decode(message.topic, message.payload, DesiredState))
            elif channel is Channel.CMD:
                self._on_command(device, decode(message.topic, message.payload, Command))
            elif channel is Channel.ARTIFACT_CHUNK:
                self._on_chunk(device, decode(message.topic, message.payload, ArtifactChunk))
        except FleetError as exc:
            self.stats.error(f"{device.node_id}: {message.topic}: {exc}")

    # -- behaviour -------------------------------------------------------------------------------

    def _publish(self, device: SimDevice, channel: Channel, msg: Message) -> None:
        client = device.client
        assert client is not None
        client.publish(device.topic(channel), encode(msg), qos=channel_qos(channel), retain=channel_retained(channel))

    def _report_state(self, device: SimDevice, detail: str | None = None) -> None:
        now = time.time()
        self._publish(
            device,
            Channel.REPORTED,
            Reported(
                generation=device.generation,
                version=device.version,
                previous_version=device.previous,
                state=device.state,
                detail=detail,
                ts=now,
            ),
        )
        self._publish(device, Channel.HEALTH, Health(version=device.version, healthy=device.healthy, ts=now))

    def _on_desired(self, device: SimDevice, desired: DesiredState) -> None:
        if desired.generation <= device.target:
            return  # replay, or the retained copy of what we have already applied
        device.target = desired.generation
        release = desired.release
        if release is None or release.version == device.version:
            device.download = None
            self._applied(device, desired.generation)
            return
        download = _Download(release=release, generation=desired.generation, last_activity=time.monotonic())
        device.download = download
        device.state = UpdateState.DOWNLOADING
        self._publish(
            device,
            Channel.REPORTED,
            Reported(
                generation=device.generation,
                version=device.version,
                previous_version=device.previous,
                state=UpdateState.DOWNLOADING,
                progress=0.0,
                ts=time.time(),
            ),
        )
        self._request_window(device, download)

    def _applied(self, device: SimDevice, generation: int, detail: str | None = None) -> None:
        device.generation = generation
        self.stats.desired_applied += 1
        self._report_state(device, detail)

    def _request_window(self, device: SimDevice, download: _Download) -> None:
        download.window_end = download.next + WINDOW
        download.last_activity = time.monotonic()
        if device.connected:
            self._publish(
                device,
                Channel.ARTIFACT_REQ,
                ArtifactRequest(digest=download.release.digest, first=download.next, window=WINDOW),
            )

    def _on_chunk(self, device: SimDevice, chunk: ArtifactChunk) -> None:
        download = device.download
        if download is None or digest_hex(chunk.digest) != digest_hex(download.release.digest):
            return
        if chunk.error is not None:
            self._download_failed(device, download, f"server: {chunk.error}")
            return
        if chunk.index != download.next:
            return  # a duplicate or a chunk after a lost one: the stall timer asks again
        if chunk.sha256 is None or hashlib.sha256(chunk.data).hexdigest() != digest_hex(chunk.sha256):
            self._download_failed(device, download, f"chunk {chunk.index}: sha256 mismatch")
            return
        download.hasher.update(chunk.data)
        download.size += len(chunk.data)
        self.stats.bytes_downloaded += len(chunk.data)
        download.next += 1
        download.total = chunk.total
        download.last_activity = time.monotonic()
        download.stalls = 0
        if chunk.eof or (download.total is not None and download.next >= download.total):
            if chunk.artifact is None or download.hasher.hexdigest() != digest_hex(chunk.artifact):
                self._download_failed(device, download, "artifact digest mismatch")
            elif chunk.size is not None and chunk.size != download.size:
                self._download_failed(device, download, f"artifact size {download.size} != {chunk.size}")
            else:
                self._install(device, download)
        elif download.next >= download.window_end:
            self._request_window(device, download)

    def _install(self, device: SimDevice, download: _Download) -> None:
        self.stats.downloads_completed += 1
        device.download = None
        device.previous, device.version = device.version, download.release.version
        if device.fails and download.release.version == self.settings.fail_version:
            device.state, device.healthy = UpdateState.FAILED, False
            self._applied(device, download.generation, "injected health failure")
        else:
            device.state, device.healthy = UpdateState.HEALTHY, True
            self._applied(device, download.generation)

    def _download_failed(self, device: SimDevice, download: _Download, reason: str) -> None:
        self.stats.downloads_failed += 1
        self.stats.error(f"{device.node_id}: download of {download.release.version} failed: {reason}")
        device.download = None
        device.state = UpdateState.FAILED
        self._applied(device, download.generation, f"download failed: {reason}")

    def _on_command(self, device: SimDevice, command: Command) -> None:
        if command.id in device.seen_commands:
            self._ack(device, command.id, AckStatus.DUPLICATE)
            return
        device.seen_commands[command.id] = None
        while len(device.seen_commands) > _SEEN_COMMANDS:
            device.seen_commands.popitem(last=False)
        if command.expires_at is not None and command.expires_at < time.time():
            self._ack(device, command.id, AckStatus.EXPIRED)
            return
        self._ack(device, command.id, AckStatus.ACCEPTED)
        if command.action == "rollback" and device.previous is not None:
            device.previous, device.version = device.version, device.previous
            device.state, device.healthy = UpdateState.ROLLED_BACK, True
            self._report_state(device)
        self._ack(device, command.id, AckStatus.DONE)
        self.stats.commands_acked += 1

    def _ack(self, device: SimDevice, command_id: str, status: AckStatus) -> None:
        self._publish(device, Channel.ACK, Ack(id=command_id, status=status, ts=time.time()))

    # -- the ticker ------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        assert self._queue is not None
        drop_chance = self.settings.disconnect_rate / 60.0 * _TICK
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for device in self.devices:
                client = device.client
                if device.reconnect_at is not None and now >= device.reconnect_at:
                    device.reconnect_at = None
                    self._queue.put_nowait(device)
                if client is None or not device.connected:
                    continue
                client.loop_misc()
                if drop_chance and self._rng.random() < drop_chance:
                    self._drop_link(device)
                    continue
                if now >= device.next_heartbeat:
                    self._heartbeat(device, now)
                download = device.download
                if download is not None and now - download.last_activity > download.stall_after:
                    download.stalls += 1
                    download.stall_after = _STALL * self._rng.uniform(0.5, 1.5)
                    if download.stalls > _STALL_RETRIES:
                        self._download_failed(device, download, f"no chunk after {_STALL_RETRIES} asks")
                    else:
                        self._request_window(device, download)

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
        client = device.client
        assert client is not None
        sock = client.socket()
        if sock is None:
            return
        self.stats.disconnects_injected += 1
        try:
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            self.stats.error(f"{device.node_id}: cannot drop link: {exc}")

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

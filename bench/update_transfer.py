"""Release transfer over MQTT with a real agent: goodput, a rate-limited link, bytes re-sent after cuts,
a delta update and the agent's peak RSS while applying an update.

    python bench/update_transfer.py [--size-mib 4] [--broker mosquitto|amqtt] [--quick]

Prints ONE JSON document on stdout (progress on stderr). Everything runs on loopback: a throwaway PKI,
a TLS broker on a free port, the release service (fleet.controller.release_service) on its own controller
connection, real ``python -m agent.cli`` processes, tests/faultproxy.FaultProxy for the rate-limited and
the cut link, and an operator observer that timestamps ``reported`` and ``artifact/req``. Delta sizes on
real binaries are bench/delta_sizes.py's job, not this one's. Targets come from issue 4 ("Benchmarks").
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt

from bench.common import (
    BenchAgent,
    BenchPki,
    Stamped,
    StampedClient,
    mib,
    mqtt_session,
    proc_status_kib,
    run_and_print,
    running_broker,
    say,
    wait_for,
)
from certs import issue_controller, issue_operator
from fleet.controller.mqtt import FleetMqtt, TlsIdentity
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import DesiredState, Reported, UpdateState
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import ReleaseManifest, ReleaseStore, build_release
from tests.faultproxy import FaultProxy
from tests.mqtt import Credentials, Endpoint, MqttClient

NODE = "gw-bench"
RAW_NODE = "gw-bench-raw"  # the raw baseline publishes on this node's chunk topic: same ACL path, no agent
CHUNK = 64 * 1024
WINDOW = 8  # the agent's update.window (its default) and the raw publisher's in-flight limit
BANDWIDTH = 256 * 1024  # bytes/s per direction for the rate-limited link
CUT_EVERY = 512 * 1024  # downstream bytes between cuts
EDITS = 300  # bytes edited between v1 and v2
SEED = 20240604
MB = 1_000_000
WAIT_S = 60.0  # bound on one update over an unthrottled link
SETTLE_S = 1.5  # after connect, before reading the idle RSS
AGENT_UPDATE = {"window": WINDOW, "request_timeout": "3s", "health_grace": 0, "no_probe_window": "0.5s"}
RSS_TARGET_FACTOR = 2.0

RUN_SCRIPT = "#!/bin/sh\n# bench app: does nothing but stay up\nexec sleep 3600\n"


# ---- arguments and signals ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=4.0, help="size of the app's incompressible data file")
    parser.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    parser.add_argument("--quick", action="store_true", help="--size-mib 1 (for the smoke test)")
    parser.add_argument("--keep", type=Path, help="work in this (new) directory and keep it: logs, PKI, store")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib = 1.0
    if not 0 < args.size_mib <= 256:
        parser.error("--size-mib must be in (0, 256]")
    return args


def _mb_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / MB, 3) if seconds > 0 else 0.0


# ---- releases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Releases:
    store: ReleaseStore
    v1: ReleaseManifest
    v2: ReleaseManifest

    def artifact_size(self, manifest: ReleaseManifest) -> int:
        return self.store.artifact_path(manifest).stat().st_size

    def chunks(self, manifest: ReleaseManifest) -> int:
        return math.ceil(self.artifact_size(manifest) / manifest.chunk_size)


def app_tree(root: Path, size: int, edits: int) -> Path:
    """``run`` (sleeps) plus ``data.bin``: ``size`` seeded random bytes, ``edits`` of them changed."""
    root.mkdir(parents=True)
    run = root / "run"
    run.write_text(RUN_SCRIPT)
    run.chmod(0o755)
    data = bytearray(random.Random(SEED).randbytes(size))
    edit = random.Random(SEED + edits)
    for _ in range(edits):
        data[edit.randrange(size)] = edit.randrange(256)
    (root / "data.bin").write_bytes(bytes(data))
    return root


def build_releases(pki: BenchPki, workdir: Path, size: int) -> Releases:
    key = load_private_key(pki.paths.release_key.read_bytes())
    store = workdir / "store"

    def build(version: str, edits: int) -> ReleaseManifest:
        tree = app_tree(workdir / "src" / version, size, edits)
        return build_release(
            tree,
            name="benchapp",
            version=version,
            store=store,
            release_key=key,
            entry=["./run"],
            health=None,
            chunk_size=CHUNK,
        )

    return Releases(ReleaseStore(store), build("1.0.0", 0), build("2.0.0", EDITS))


# ---- the rig -----------------------------------------------------------------------------------


@dataclass
class Rig:
    pki: BenchPki
    endpoint: Endpoint
    workdir: Path
    releases: Releases
    service: ReleaseService
    observer: StampedClient
    controller: StampedClient
    proxy: FaultProxy
    seen: list[Stamped] = field(default_factory=list)
    agents: int = 0
    generation: int = 0

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def collect(self) -> list[Stamped]:
        self.seen.extend(self.observer.take())
        return self.seen

    def first(self, channel: Channel, since: float, match: Callable[[bytes], bool] | None = None) -> Stamped | None:
        topic = node_topic(NODE, channel)
        for message in self.collect():
            if message.topic == topic and message.at >= since and (match is None or match(message.payload)):
                return message
        return None

    def reported(self, since: float, generation: int, state: UpdateState, **want: Any) -> Stamped | None:
        topic = node_topic(NODE, Channel.REPORTED)

        def matches(payload: bytes) -> bool:
            reported = decode(topic, payload, Reported)
            if reported.generation != generation or reported.state != state:
                return False
            return all(getattr(reported, name) == value for name, value in want.items())

        return self.first(Channel.REPORTED, since, matches)

    def last_progress(self, since: float, generation: int) -> float | None:
        """The last download progress the agent reported for ``generation`` (0..1)."""
        topic = node_topic(NODE, Channel.REPORTED)
        progress = None
        for message in self.collect():
            if message.topic == topic and message.at >= since:
                reported = decode(topic, message.payload, Reported)
                if reported.generation == generation and reported.state == UpdateState.DOWNLOADING:
                    progress = reported.progress
        return progress

    def wait_reported(self, since: float, generation: int, state: UpdateState, timeout: float, **want: Any) -> float:
        what = f"reported {state.value} generation {generation} {want or ''}"
        wait_for(lambda: self.reported(since, generation, state, **want) is not None, timeout, what, 0.005)
        found = self.reported(since, generation, state, **want)
        assert found is not None
        return found.at

    def publish_desired(self, generation: int, manifest: ReleaseManifest | None, *bases: str) -> float:
        """Publish (retained) and return the monotonic time just before the publish."""
        release = manifest.ref(delta_bases=bases) if manifest is not None else None
        desired = DesiredState(generation=generation, release=release, issued_at=time.time())
        started = time.monotonic()
        self.controller.publish(node_topic(NODE, Channel.DESIRED), encode(self.pki.signed(desired)), qos=1, retain=True)
        return started

    def new_agent(self, via_proxy: bool) -> BenchAgent:
        """A fresh agent (own state dir) straight to the broker or through the fault proxy."""
        self.agents += 1
        endpoint = Endpoint(self.endpoint.kind, "127.0.0.1", self.proxy.port) if via_proxy else self.endpoint
        workdir = self.workdir / f"agent-{self.agents}"
        extra = {
            "release_public_key": str(self.pki.paths.release_pub),
            "heartbeat_interval": "30s",
            "workload": {
                "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                "restart_backoff": {"initial": "200ms", "maximum": "1s", "jitter": 0},
            },
            "update": dict(AGENT_UPDATE),
        }
        return BenchAgent(NODE, endpoint, self.pki.device(), workdir, extra=extra)


def _identity(pki: BenchPki, name: str, controller: bool) -> Credentials:
    paths = (issue_controller if controller else issue_operator)(pki.paths, name, force=True)
    return Credentials(pki.paths.ca_cert, paths.cert, paths.key)


def build_rig(stack: ExitStack, args: argparse.Namespace, workdir: Path) -> tuple[Rig, Credentials, Credentials]:
    say(f"PKI, releases of {args.size_mib} MiB and a {args.broker} broker in {workdir}")
    pki = BenchPki.create(workdir / "pki", NODE)
    # Mosquitto's ACL names every controller and operator: issue them all before rendering its config.
    service_id = _identity(pki, "bench-release-service", controller=True)
    raw_publisher = _identity(pki, "bench-raw-publisher", controller=True)
    raw_subscriber = _identity(pki, "bench-raw-subscriber", controller=False)
    releases = build_releases(pki, workdir, int(args.size_mib * 1024 * 1024))
    endpoint = stack.enter_context(running_broker(args.broker, pki, workdir / "broker"))
    assert service_id.cert is not None and service_id.key is not None
    fleet_mqtt = FleetMqtt(endpoint.host, endpoint.port, TlsIdentity(service_id.ca, service_id.cert, service_id.key))
    fleet_mqtt.start()
    stack.callback(fleet_mqtt.close)
    # rate_limit=0: the goodput measured is the transfer's, not the default per-device limit's.
    service = ReleaseService(fleet_mqtt, ReleaseServer(releases.store), rate_limit=0)
    service.start()
    stack.callback(service.stop)
    observer = stack.enter_context(mqtt_session(endpoint, pki.operator()))
    for channel in (Channel.REPORTED, Channel.ARTIFACT_REQ):
        observer.subscribe(node_topic(NODE, channel))
    controller = stack.enter_context(mqtt_session(endpoint, pki.controller()))
    proxy = stack.enter_context(FaultProxy(endpoint.host, endpoint.port))
    rig = Rig(pki, endpoint, workdir, releases, service, observer, controller, proxy)
    return rig, raw_publisher, raw_subscriber


# ---- 1a. the raw baseline: paho -> broker -> paho ----------------------------------------------


def raw_baseline(rig: Rig, publisher_creds: Credentials, subscriber_creds: Credentials) -> dict[str, Any]:
    """The v1 artifact's bytes as QoS-1 messages of CHUNK bytes between two plain paho clients."""
    data = rig.releases.store.artifact_path(rig.releases.v1).read_bytes()
    pieces = [data[start : start + CHUNK] for start in range(0, len(data), CHUNK)]
    topic = node_topic(RAW_NODE, Channel.ARTIFACT_CHUNK)
    publisher = StampedClient(rig.endpoint, publisher_creds)
    publisher.client.max_inflight_messages_set(WINDOW)  # paho holds the rest until PUBACKs free a slot
    with ExitStack() as stack:
        stack.callback(publisher.close)
        publisher.connect()
        subscriber = stack.enter_context(mqtt_session(rig.endpoint, subscriber_creds))
        subscriber.subscribe(topic, qos=1)
        sliding = _raw_run(publisher.client, subscriber, topic, pieces, batch=False)
        batched = _raw_run(publisher.client, subscriber, topic, pieces, batch=True)
    say(f"raw baseline: {sliding['mb_per_s']} MB/s sliding window, {batched['mb_per_s']} MB/s windows of {WINDOW}")
    return {
        "bytes": len(data),
        "messages": len(pieces),
        "message_bytes": CHUNK,
        "qos": 1,
        "sliding_window": sliding,
        "stop_and_wait_windows": batched,
        "note": f"sliding_window: at most {WINDOW} unacknowledged PUBLISHes (paho max_inflight), timed from the "
        "first publish to the last delivery at the subscriber; stop_and_wait_windows: publish "
        f"{WINDOW}, wait for their PUBACKs and deliveries, repeat (the agent's request/window pattern)",
    }


def _raw_run(
    client: mqtt.Client, subscriber: StampedClient, topic: str, pieces: list[bytes], *, batch: bool
) -> dict[str, Any]:
    subscriber.take()
    received: list[Stamped] = []

    def arrived(count: int) -> Callable[[], bool]:
        def done() -> bool:
            received.extend(subscriber.take())
            return len(received) >= count

        return done

    started = time.monotonic()
    step = WINDOW if batch else len(pieces)
    for first in range(0, len(pieces), step):
        infos = [client.publish(topic, piece, qos=1) for piece in pieces[first : first + step]]
        deadline = time.monotonic() + WAIT_S
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("raw baseline: a PUBLISH was not acknowledged in time")
        wait_for(arrived(first + len(infos)), WAIT_S, "raw baseline deliveries", 0.001)
    seconds = received[-1].at - started
    nbytes = sum(len(message.payload) for message in received)
    return {"seconds": round(seconds, 3), "mb_per_s": _mb_per_s(nbytes, seconds)}


# ---- one update, timed -------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    published: float
    first_request: float | None
    downloaded: float | None  # reported downloading with progress 1.0: the last chunk is stored
    healthy: float
    chunks_sent: int
    bytes_sent: int

    @property
    def to_healthy_s(self) -> float:
        return self.healthy - self.published

    @property
    def transfer_s(self) -> float | None:
        if self.first_request is None or self.downloaded is None:
            return None
        return self.downloaded - self.first_request


def run_update(rig: Rig, manifest: ReleaseManifest, timeout: float, *bases: str) -> Update:
    before = rig.service.stats()
    generation = rig.next_generation()
    published = rig.publish_desired(generation, manifest, *bases)
    healthy = rig.wait_reported(published, generation, UpdateState.HEALTHY, timeout, version=manifest.version)
    after = rig.service.stats()
    request = rig.first(Channel.ARTIFACT_REQ, published)
    downloaded = rig.reported(published, generation, UpdateState.DOWNLOADING, progress=1.0)
    return Update(
        published,
        request.at if request else None,
        downloaded.at if downloaded else None,
        healthy,
        after.chunks_sent - before.chunks_sent,
        after.bytes_sent - before.bytes_sent,
    )


def timing(update: Update, artifact_bytes: int) -> dict[str, Any]:
    transfer = update.transfer_s
    return {
        "publish_to_healthy_s": round(update.to_healthy_s, 3),
        "goodput_publish_to_healthy_mb_per_s": _mb_per_s(artifact_bytes, update.to_healthy_s),
        "first_request_to_last_chunk_s": round(transfer, 3) if transfer is not None else None,
        "goodput_transfer_mb_per_s": _mb_per_s(artifact_bytes, transfer) if transfer is not None else None,
        "chunks_sent": update.chunks_sent,
        "bytes_sent": update.bytes_sent,
    }


def start_agent(stack: ExitStack, rig: Rig, via_proxy: bool) -> BenchAgent:
    agent = rig.new_agent(via_proxy)
    stack.callback(agent.stop)
    agent.start(timeout=20.0)
    return agent


def retire(agent: BenchAgent, rig: Rig) -> None:
    """Stop the agent, wipe its broker session (chunks still queued for it) and leave a release-less
    desired state, so the next fresh agent starts idle and is served only what it asks for."""
    agent.stop()
    session = MqttClient(rig.endpoint, rig.pki.device(), clean_session=True)
    try:
        session.connect()
    finally:
        session.close()
    rig.publish_desired(rig.next_generation(), None)


# ---- 1 + 4 + 5: goodput, delta update and peak RSS with one agent straight to the broker --------


def goodput_delta_and_rss(stack: ExitStack, rig: Rig, raw: dict[str, Any]) -> dict[str, Any]:
    releases = rig.releases
    full = releases.artifact_size(releases.v1)
    say("agent 1 (straight to the broker): idle, then v1 in full, then v2 as a delta")
    agent = start_agent(stack, rig, via_proxy=False)
    time.sleep(SETTLE_S)
    idle_rss = proc_status_kib(agent.pid, "VmRSS") * 1024
    hwm_before = proc_status_kib(agent.pid, "VmHWM") * 1024
    full_update = run_update(rig, releases.v1, WAIT_S)
    hwm_after = proc_status_kib(agent.pid, "VmHWM") * 1024
    rss_after = proc_status_kib(agent.pid, "VmRSS") * 1024
    loopback = timing(full_update, full)
    say(f"v1 full: {loopback['publish_to_healthy_s']}s to healthy, {loopback['goodput_transfer_mb_per_s']} MB/s")
    raw_rate = raw["sliding_window"]["mb_per_s"]
    batch_rate = raw["stop_and_wait_windows"]["mb_per_s"]
    agent_rate = loopback["goodput_transfer_mb_per_s"] or loopback["goodput_publish_to_healthy_mb_per_s"]
    goodput = {
        "artifact_bytes": full,
        "chunks": releases.chunks(releases.v1),
        "chunk_size": CHUNK,
        "window": WINDOW,
        "agent": loopback,
        "raw_paho_baseline": raw,
        "ratio_agent_to_raw_sliding": round(agent_rate / raw_rate, 3) if raw_rate else None,
        "ratio_agent_to_raw_stop_and_wait": round(agent_rate / batch_rate, 3) if batch_rate else None,
        "note": "first_request_to_last_chunk: the first artifact/req and the agent's reported 'downloading' "
        "with progress 1.0 (sent once the last chunk is verified and fsynced), both timestamped at the "
        "operator observer; publish_to_healthy adds manifest check, decompress, unpack, switch and the "
        f"{AGENT_UPDATE['no_probe_window']} no-probe health window",
    }
    memory = {
        "artifact_mib": mib(full),
        "idle_rss_mib": mib(idle_rss),
        "hwm_before_update_mib": mib(hwm_before),
        "peak_rss_mib": mib(hwm_after),
        "peak_minus_idle_mib": mib(hwm_after - idle_rss),
        "target_peak_minus_idle_mib": mib(RSS_TARGET_FACTOR * full),
        "within_target": hwm_after - idle_rss < RSS_TARGET_FACTOR * full,
        "rss_after_update_mib": mib(rss_after),
        "note": "idle = VmRSS after connect and settling; peak = VmHWM after the full v1 update is healthy "
        "(it includes the start-up peak, hwm_before_update_mib); target from issue 4: peak - idle < 2 x artifact",
    }
    delta = delta_update(rig)
    memory["peak_rss_after_delta_update_mib"] = mib(proc_status_kib(agent.pid, "VmHWM") * 1024)
    retire(agent, rig)
    return {"goodput_loopback": goodput, "delta_update": delta, "agent_peak_rss": memory}


def delta_update(rig: Rig) -> dict[str, Any]:
    releases = rig.releases
    started = time.monotonic()
    path = releases.store.delta(releases.v1, releases.v2)  # built ahead, so the timing is the transfer's
    build_s = time.monotonic() - started
    update = run_update(rig, releases.v2, WAIT_S, releases.v1.digest)
    full = releases.artifact_size(releases.v2)
    say(f"v1 -> v2 delta: {update.bytes_sent} bytes sent for a {full}-byte artifact, {update.to_healthy_s:.2f}s")
    return {
        "edited_bytes": EDITS,
        "delta_file_bytes": path.stat().st_size if path is not None else None,
        "delta_build_s": round(build_s, 3),
        "bytes_sent": update.bytes_sent,
        "chunks_sent": update.chunks_sent,
        "full_artifact_bytes": full,
        "sent_pct_of_full": round(100 * update.bytes_sent / full, 3),
        "publish_to_healthy_s": round(update.to_healthy_s, 3),
        "note": "bytes_sent: artifact bytes in chunks the broker acknowledged (ReleaseService.stats); the "
        "delta is built before the desired state goes out (delta_build_s), as the controller would",
    }


# ---- 2. rate-limited link ----------------------------------------------------------------------


def rate_limited(stack: ExitStack, rig: Rig) -> dict[str, Any]:
    full = rig.releases.artifact_size(rig.releases.v1)
    say(f"agent 2 (fresh, through the proxy at {BANDWIDTH // 1024} KiB/s): v1 in full")
    agent = start_agent(stack, rig, via_proxy=True)
    rig.proxy.set_bandwidth(BANDWIDTH)
    try:
        timeout = WAIT_S + 3 * full / BANDWIDTH
        update = run_update(rig, rig.releases.v1, timeout)
    finally:
        rig.proxy.set_bandwidth(None)
    retire(agent, rig)
    result = timing(update, full)
    transfer = update.transfer_s or update.to_healthy_s
    result |= {
        "artifact_bytes": full,
        "bandwidth_bytes_per_s": BANDWIDTH,
        "goodput_kib_per_s": round(full / transfer / 1024, 1),
        "goodput_fraction_of_link": round(full / transfer / BANDWIDTH, 3),
        "note": "FaultProxy.set_bandwidth limits each direction of the agent's link; goodput counts artifact "
        "bytes only (MQTT, msgpack and TLS framing share the link)",
    }
    say(f"rate-limited: {result['goodput_kib_per_s']} KiB/s of {BANDWIDTH // 1024} KiB/s")
    return result


# ---- 3. bytes re-sent after cuts ---------------------------------------------------------------


def cuts(stack: ExitStack, rig: Rig, cut_every: int, timeout: float) -> dict[str, Any]:
    releases = rig.releases
    full, total = releases.artifact_size(releases.v1), releases.chunks(releases.v1)
    say(f"fresh agent through the proxy, cut every {cut_every // 1024} KiB downstream: v1 in full (<= {timeout:.0f}s)")
    agent = start_agent(stack, rig, via_proxy=True)
    link_before, sent_before = rig.proxy.stats, rig.service.stats()
    rig.proxy.cut_after(cut_every, repeat=True)
    generation = rig.next_generation()
    published = rig.publish_desired(generation, releases.v1)
    completed = True
    try:
        rig.wait_reported(published, generation, UpdateState.HEALTHY, timeout, version=releases.v1.version)
    except TimeoutError:
        completed = False
    finally:
        rig.proxy.cut_after_off()
    healthy = rig.reported(published, generation, UpdateState.HEALTHY, version=releases.v1.version)
    seconds = (healthy.at if healthy is not None else time.monotonic()) - published
    after = rig.service.stats()
    sent, sent_bytes = after.chunks_sent - sent_before.chunks_sent, after.bytes_sent - sent_before.bytes_sent
    link_after = rig.proxy.stats
    number_of_cuts = link_after.cuts - link_before.cuts
    link_down = link_after.bytes_down - link_before.bytes_down
    progress = rig.last_progress(published, generation)
    retire(agent, rig)
    say(f"  {number_of_cuts} cuts, {sent} chunks sent for {total}, completed={completed} in {seconds:.1f}s")
    return {
        "cut_every_bytes": cut_every,
        "cuts": number_of_cuts,
        "completed": completed,
        "publish_to_healthy_s": round(seconds, 3) if completed else None,
        "waited_s": round(seconds, 3),
        "artifact_chunks": total,
        "chunks_sent": sent,
        "chunks_resent": sent - total if completed else None,
        "bytes_resent": (sent - total) * CHUNK if completed else None,
        "bytes_sent_minus_artifact": sent_bytes - full if completed else None,
        "last_reported_progress": progress,
        "link_bytes_down": link_down,
        "link_bytes_down_minus_artifact": link_down - full,
    }


def resent_after_cuts(stack: ExitStack, rig: Rig, quick: bool) -> dict[str, Any]:
    window_bytes = WINDOW * CHUNK
    result: dict[str, Any] = {
        "artifact_bytes": rig.releases.artifact_size(rig.releases.v1),
        "window_bytes": window_bytes,
        "agent_request_timeout": AGENT_UPDATE["request_timeout"],
    }
    # The requested ~512 KiB is exactly one window of chunks; 1.5 windows shows the re-send cost when the
    # link can carry a whole window between cuts (unless the broker backlog grows beyond it, see the note).
    for name, cut_every, timeout in (
        ("cut_every_512_kib", CUT_EVERY, 10.0 if quick else 30.0),
        ("cut_every_768_kib", CUT_EVERY * 3 // 2, 15.0 if quick else WAIT_S),
    ):
        result[name] = cuts(stack, rig, cut_every, timeout)
    result["note"] = (
        "chunks_sent: chunks the broker acknowledged to the release service; resent = sent - artifact chunks "
        "(None when the download did not complete); link_bytes_down: everything the proxy passed to the agent "
        "(TLS, MQTT, redeliveries by the broker). Each cut is an RST from tests/faultproxy, which also "
        "discards what the agent's kernel received but the agent had not read yet. On reconnect the broker "
        "first redelivers the agent's persistent-session backlog (a window of chunks, about "
        f"{window_bytes // 1024} KiB plus framing, more once the agent's re-requests after request_timeout "
        "queue further windows) in the same order every time; when that backlog exceeds the cut period, "
        "each connection dies within milliseconds, the agent's PUBACKs and reported never get out, and the "
        "download stops making progress (completed false). last_reported_progress is what reached the "
        "observer, not what the agent stored"
    )
    return result


# ---- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "bench": "update_transfer",
        "python": platform.python_version(),
        "broker": args.broker,
        "size_mib": args.size_mib,
        "quick": args.quick,
        "chunk_size": CHUNK,
        "agent_update_config": dict(AGENT_UPDATE),
    }
    with ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            workdir = args.keep.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-update-transfer-")))
        rig, raw_publisher, raw_subscriber = build_rig(stack, args, workdir)
        result["artifact"] = {
            "payload_bytes": rig.releases.v1.size,
            "v1_artifact_bytes": rig.releases.artifact_size(rig.releases.v1),
            "v2_artifact_bytes": rig.releases.artifact_size(rig.releases.v2),
            "chunks": rig.releases.chunks(rig.releases.v1),
        }
        raw = raw_baseline(rig, raw_publisher, raw_subscriber)
        result |= goodput_delta_and_rss(stack, rig, raw)
        result["rate_limited"] = rate_limited(stack, rig)
        result["resent_after_cuts"] = resent_after_cuts(stack, rig, args.quick)
        result["service_stats"] = vars(rig.service.stats())
        say("done; stopping agents, proxy, release service and broker")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_print(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

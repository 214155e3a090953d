"""Fleet-scale runs with ``fleet sim`` (real processes, mutual TLS, the real protocol).

    python bench/sim_scale.py [--agents 10000] [--compare-agents 1000] [--quick]

1. ``broker_comparison``: the same simulated fleet (``--compare-agents`` devices, heartbeat and
   health every second) against the embedded amqtt broker and against Mosquitto, each as its own
   process: connect time, messages delivered per second to one subscriber (the controller's view
   of the ingest stream), broker RSS and CPU. The same clients, two brokers.
2. ``fleet``: ``--agents`` simulated devices against Mosquitto with a real ``fleet controller``:
   certificate issuance, connect, the controller seeing every device online, then a one-wave
   rollout of a small release to all of them: time until every device reported it and the rollout
   succeeded (each device downloads and verifies the artifact over MQTT). Baseline in the same run:
   the connect phase, which is pure MQTT + TLS cost.
3. ``rollback``: detection-to-rollback latency. A small simulated fleet on 1.0.0 gets 2.0.0, which
   fails health on every device. A raw subscriber timestamps the first ``failed`` report, the
   rollout turning ``aborting``, each ``rollback`` command on the wire and each device reporting
   1.0.0 again. Baseline in the same run: one MQTT publish -> receive round trip through the broker.

Prints one JSON document on stdout. Raises RLIMIT_NOFILE (Mosquitto needs a descriptor per device).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import MIB, say, wait_for
from certs import PkiPaths, init_pki, issue_controller, issue_device
from fleet.protocol.codec import decode_for_channel
from fleet.protocol.messages import Command, ProbeSpec, Reported, UpdateState
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, all_nodes_filter
from fleet.releases import build_release
from tests.conftest import MosquittoProcess, free_port, tls_port_ready
from tests.faults.chaos import SimProcess
from tests.mqtt import Credentials, Endpoint

PREFIX = "sim-"
CONTROLLER = "ctl-sim-scale"
OBSERVER = "ctl-sim-observer"
ECHO = "fleet/v1/bench/echo"  # controllers may use any fleet/v1 topic
NOFILE = 65536
SIM_STOP_TIMEOUT = 120.0  # 10,000 devices publish offline and disconnect


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10_000, help="devices in the fleet run")
    parser.add_argument("--compare-agents", type=int, default=1_000, help="devices in the broker comparison")
    parser.add_argument("--compare-seconds", type=float, default=20.0, help="measured window per broker")
    parser.add_argument("--connect-rate", type=float, default=400.0, help="new TLS connections per second")
    parser.add_argument("--rollback-agents", type=int, default=50, help="devices in the rollback latency run")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (100 / 50 / 10 devices)")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.compare_agents, args.compare_seconds, args.rollback_agents = 100, 50, 4.0, 10
    return args


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Pki:
    paths: PkiPaths

    def client(self, name: str) -> Credentials:
        client = self.paths.controller(name)
        return Credentials(self.paths.ca_cert, client.cert, client.key)


def prepare_pki(root: Path, agents: int) -> tuple[Pki, float]:
    """CA, two controller identities (before any broker renders its ACL) and every device certificate."""
    paths = init_pki(root)
    for name in (CONTROLLER, OBSERVER):
        issue_controller(paths, name)
    started = time.monotonic()
    for index in range(agents):
        issue_device(paths, f"{PREFIX}{index:05d}")
    return Pki(paths), time.monotonic() - started


# ---- processes -----------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def broker_process(kind: str, pki: Pki, workdir: Path) -> Iterator[tuple[int, psutil.Process]]:
    """(port, process) of a Mosquitto from the rendered config, or of ``fleet broker`` (embedded amqtt)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "mosquitto":
        mosquitto = MosquittoProcess(pki.paths, workdir)
        mosquitto.start(pki.client(OBSERVER))
        assert mosquitto.process is not None
        try:
            yield mosquitto.port, psutil.Process(mosquitto.process.pid)
        finally:
            mosquitto.stop()
        return
    port = free_port()
    with (workdir / "broker.log").open("wb") as log:
        command = [sys.executable, "-m", "fleet", "broker", "--certs", str(pki.paths.root),
                   "--listen", f"127.0.0.1:{port}"]  # fmt: skip
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: tls_port_ready(port, pki.client(OBSERVER)), 30, "embedded broker up", interval=0.1)
        yield port, psutil.Process(process.pid)
    finally:
        _stop(process)


def start_sim(pki: Pki, port: int, agents: int, workdir: Path, **options: float | str) -> SimProcess:
    """``fleet sim`` as a process (the fault suite's runner); ``stop()`` returns its JSON report."""
    endpoint = Endpoint("mosquitto", "127.0.0.1", port)
    return SimProcess(pki.paths.root, endpoint, workdir, PREFIX, agents, dict(options)).start()


def observer_client(
    pki: Pki,
    port: int,
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None],
    filters: list[tuple[str, int]],
) -> mqtt.Client:
    """A connected raw paho client with the observer identity, subscribed before this returns."""
    creds = pki.client(OBSERVER)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=OBSERVER)
    client.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
    client.on_message = on_message
    # Nagle off, as every fleet client has it: otherwise a round trip is a delayed ACK (~40 ms).
    client.on_socket_open = _nodelay
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe(filters)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(30):
        client.loop_stop()
        raise TimeoutError("observer not subscribed")
    return client


def _nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Counter:
    """A raw paho subscriber counting heartbeats and health messages: what an ingest sees."""

    def __init__(self, pki: Pki, port: int) -> None:
        self.count = 0
        self._lock = threading.Lock()
        filters = [all_nodes_filter(Channel.HEARTBEAT), all_nodes_filter(Channel.HEALTH)]
        self.client = observer_client(pki, port, self._on_message, [(f, 0) for f in filters])

    def _on_message(self, _client: mqtt.Client, _userdata: object, _message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.count += 1

    def read(self) -> int:
        with self._lock:
            return self.count

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


# ---- 1: the same clients against both brokers -------------------------------------------------------


def compare_brokers(pki: Pki, workdir: Path, agents: int, seconds: float, connect_rate: float) -> dict[str, Any]:
    results: dict[str, Any] = {"devices": agents, "heartbeat_s": 1.0, "window_s": seconds}
    for kind in ("mosquitto", "amqtt"):
        say(f"broker comparison: {agents} devices against {kind}")
        results[kind] = one_broker(kind, pki, workdir / kind, agents, seconds, connect_rate)
    return results


def one_broker(kind: str, pki: Pki, workdir: Path, agents: int, seconds: float, connect_rate: float) -> dict[str, Any]:
    with broker_process(kind, pki, workdir) as (port, broker):
        counter = Counter(pki, port)
        started = time.monotonic()
        sim = start_sim(pki, port, agents, workdir, heartbeat=1.0, connect_rate=connect_rate)
        try:
            heard = f"{kind}: a message from every device"
            wait_for(lambda: sim.alive() and counter.read() >= 2 * agents, 300, heard, interval=0.2)
            heard_all = time.monotonic() - started
            counted, cpu, t0 = counter.read(), cpu_seconds(broker), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            delivered = counter.read() - counted
            broker_cpu = (cpu_seconds(broker) - cpu) / elapsed * 100
            rss = broker.memory_info().rss / MIB
        finally:
            report = sim.stop(SIM_STOP_TIMEOUT)
            counter.close()
    return {
        "first_messages_from_every_device_s": round(heard_all, 2),
        "connect_all_s": report["connect_time_s"]["all_connected_after"],
        "connects_per_s": report["connect_time_s"]["per_second"],
        "delivered_per_s": round(delivered / elapsed, 1),
        # Heartbeat + health per device per second; the sim's 0.5 s tick makes the real rate ~15 % lower.
        "nominal_offered_per_s": round(2 * agents / 1.0, 1),
        "broker_cpu_percent_of_one_core": round(broker_cpu, 1),
        "broker_rss_mib": round(rss, 1),
        "sim_errors": report["errors"],
    }


# ---- 2: a 10,000-device fleet with the controller ----------------------------------------------


@dataclass
class Api:
    """The controller's HTTPS API as the PKI's operator (an admin), and its unauthenticated metrics listener."""

    http: httpx.Client
    metrics_url: str

    def get(self, path: str) -> Any:
        response = self.http.get(path, timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(path, json=body, timeout=120)
        response.raise_for_status()
        return response.json()

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in httpx.get(f"{self.metrics_url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


def start_controller(pki: Pki, port: int, workdir: Path, store: Path) -> tuple[subprocess.Popen[bytes], Api]:
    http, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "fleet", "controller", "--certs", str(pki.paths.root), "--broker", f"127.0.0.1:{port}",
        "--db", str(workdir / "fleet.db"), "--store", str(store), "--http", f"127.0.0.1:{http}",
        "--metrics", f"127.0.0.1:{metrics_port}",
        "--identity", CONTROLLER, "--stale-after", "600", "--offline-after", "1200", "--max-transfers", "16",
    ]  # fmt: skip
    with (workdir / "controller.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
    context.load_cert_chain(str(pki.paths.operator_cert), str(pki.paths.operator_key))
    api = Api(httpx.Client(base_url=f"https://127.0.0.1:{http}", verify=context), f"http://127.0.0.1:{metrics_port}")

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"controller exited: {(workdir / 'controller.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{api.metrics_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "controller API", interval=0.2)
    return process, api


def build_small_release(pki: Pki, workdir: Path, versions: tuple[str, ...] = ("1.0.0",)) -> Path:
    """A tiny signed app per version (about 4 KB): the measurement is the fleet, not the transfer."""
    store = workdir / "store"
    key = load_private_key(pki.paths.release_key.read_bytes())
    health = ProbeSpec(kind="exec", target="true", period=5.0)
    for version in versions:
        tree = workdir / "app" / version
        tree.mkdir(parents=True)
        (tree / "run").write_text("#!/bin/sh\nexec sleep 3600\n")
        (tree / "run").chmod(0o755)
        (tree / "config.json").write_text(json.dumps({"version": version, "pad": "x" * 4000}))
        build_release(tree, name="app", version=version, store=store, release_key=key, entry=["./run"],
                      health=health, chunk_size=64 * 1024)  # fmt: skip
    return store


def fleet_run(pki: Pki, workdir: Path, agents: int, connect_rate: float, issue_s: float) -> dict[str, Any]:
    say(f"fleet: {agents} devices, Mosquitto, controller")
    store = build_small_release(pki, workdir)
    result: dict[str, Any] = {"devices": agents, "cert_issue_s": round(issue_s, 1)}
    with broker_process("mosquitto", pki, workdir / "mosquitto") as (port, broker):
        controller, api = start_controller(pki, port, workdir, store)
        ctl = psutil.Process(controller.pid)
        try:
            started = time.monotonic()
            sim = start_sim(pki, port, agents, workdir / "sim", heartbeat=60.0, connect_rate=connect_rate)

            def online() -> bool:
                return sim.alive() and api.metrics().get('fleet_nodes{status="online"}', 0) >= agents

            wait_for(online, 900, f"controller sees {agents} devices online", interval=1.0)
            result["controller_sees_all_online_s"] = round(time.monotonic() - started, 1)
            result["rss_mib_connected"] = {
                "mosquitto": round(broker.memory_info().rss / MIB, 1),
                "controller": round(ctl.memory_info().rss / MIB, 1),
                "sim": round(psutil.Process(sim.pid).memory_info().rss / MIB, 1),
            }
            say("rollout to every device")
            body = {"release": "app@1.0.0", "waves": ["100%"], "soak": 0, "wave_timeout": 1800, "health_timeout": 600,
                    "max_failures": "1%"}  # fmt: skip
            rollout_started = time.monotonic()
            rollout = api.post("/v1/rollouts", body)
            result["rollout_create_s"] = round(time.monotonic() - rollout_started, 2)

            def finished() -> bool:
                state = api.get(f"/v1/rollouts/{rollout['id']}")["state"]
                return sim.alive() and state in {"succeeded", "aborted"}

            wait_for(finished, 1800, "rollout finished", interval=2.0)
            view = api.get(f"/v1/rollouts/{rollout['id']}")
            result["rollout_to_finished_s"] = round(time.monotonic() - rollout_started, 1)
            result["rollout_state"] = view["state"]
            outcomes: dict[str, int] = {}
            for outcome in view["nodes"].values():
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            result["rollout_outcomes"] = outcomes
            after = api.metrics()
            result["artifact_bytes_sent"] = after.get("fleet_artifact_bytes_sent_total")
            result["artifact_requests_dropped"] = after.get("fleet_artifact_requests_dropped_total")
            result["rss_mib_after_rollout"] = {
                "mosquitto": round(broker.memory_info().rss / MIB, 1),
                "controller": round(ctl.memory_info().rss / MIB, 1),
                "sim": round(psutil.Process(sim.pid).memory_info().rss / MIB, 1),
            }
            report = sim.stop(SIM_STOP_TIMEOUT)
        finally:
            _stop(controller)
            api.http.close()
    result["sim"] = {key: report[key] for key in ("connect_time_s", "connect_attempts", "connection_losses",
                                                  "downloads_completed", "downloads_failed", "errors",
                                                  "error_samples")}  # fmt: skip
    return result


# ---- 3: detection-to-rollback latency --------------------------------------------------------------


class Watcher:
    """Timestamps what the rollback path puts on the wire: failure reports, rollback commands, recoveries."""

    def __init__(self, pki: Pki, port: int, bad: str, good: str) -> None:
        self.bad, self.good = bad, good
        self.failed_at: dict[str, float] = {}
        self.rollback_at: dict[str, float] = {}
        self.restored_at: dict[str, float] = {}
        self.echo_at: float | None = None
        self._lock = threading.Lock()
        filters = [all_nodes_filter(Channel.REPORTED), all_nodes_filter(Channel.CMD), ECHO]
        self.client = observer_client(pki, port, self._on_message, [(f, 1) for f in filters])

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if message.topic == ECHO:
            self.echo_at = now
            return
        if message.retain:
            return  # replayed from the retained store: not an event of this run
        node, _channel, decoded = decode_for_channel(message.topic, bytes(message.payload))
        with self._lock:
            if isinstance(decoded, Reported):
                if decoded.version == self.bad and decoded.state == UpdateState.FAILED:
                    self.failed_at.setdefault(node, now)
                elif decoded.version == self.good and node in self.failed_at:
                    self.restored_at.setdefault(node, now)
            elif isinstance(decoded, Command) and decoded.action == "rollback":
                self.rollback_at.setdefault(node, now)

    def round_trip_ms(self, samples: int = 20) -> float:
        """Median publish -> receive time of one QoS 1 message through the broker (the floor)."""
        times: list[float] = []
        for _ in range(samples):
            self.echo_at = None
            sent = time.monotonic()
            self.client.publish(ECHO, b"x", qos=1)
            wait_for(lambda: self.echo_at is not None, 10, "echo", interval=0.0005)
            assert self.echo_at is not None
            times.append(self.echo_at - sent)
        return float(statistics.median(times)) * 1000

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rollback_latency(pki: Pki, workdir: Path, devices: int) -> dict[str, Any]:
    say(f"rollback: {devices} devices, 2.0.0 fails health on all of them")
    store = build_small_release(pki, workdir, versions=("1.0.0", "2.0.0"))
    with broker_process("mosquitto", pki, workdir / "mosquitto") as (port, _broker):
        controller, api = start_controller(pki, port, workdir, store)
        watcher = Watcher(pki, port, bad="2.0.0", good="1.0.0")
        sim = start_sim(pki, port, devices, workdir / "sim", heartbeat=1.0, fail_version="2.0.0", fail_fraction=1.0)
        try:
            wait_for(lambda: sim.alive() and api.metrics().get('fleet_nodes{status="online"}', 0) >= devices, 120,
                     "devices online", interval=0.5)  # fmt: skip
            body = {"waves": ["100%"], "soak": 1, "wave_timeout": 120, "health_timeout": 30, "max_failures": "1"}
            first = api.post("/v1/rollouts", body | {"release": "app@1.0.0"})
            wait_for(lambda: rollout_state(api, first["id"]) == "succeeded", 120, "1.0.0 everywhere", interval=0.5)
            bad = api.post("/v1/rollouts", body | {"release": "app@2.0.0"})
            aborting_at = wait_for(lambda: rollout_state(api, bad["id"]) in {"aborting", "aborted"}, 120,
                                   "rollout aborting", interval=0.05)  # fmt: skip
            wait_for(lambda: len(watcher.restored_at) >= len(watcher.failed_at) > 0, 120, "devices back on 1.0.0",
                     interval=0.2)  # fmt: skip
            aborted_at = wait_for(lambda: rollout_state(api, bad["id"]) == "aborted", 120, "rollout aborted",
                                  interval=0.2)  # fmt: skip
            baseline_ms = watcher.round_trip_ms()
        finally:
            sim.stop(SIM_STOP_TIMEOUT)
            watcher.close()
            _stop(controller)
            api.http.close()
    detected = min(watcher.failed_at.values())
    commands = [watcher.rollback_at[n] - watcher.failed_at[n] for n in watcher.failed_at if n in watcher.rollback_at]
    restored = [watcher.restored_at[n] - watcher.failed_at[n] for n in watcher.failed_at if n in watcher.restored_at]
    return {
        "devices": devices,
        "failed_devices": len(watcher.failed_at),
        "first_failure_to_aborting_ms": round((aborting_at - detected) * 1000, 1),
        "failure_report_to_rollback_command_ms": summary_ms(commands),
        "failure_report_to_back_on_good_version_ms": summary_ms(restored),
        "first_failure_to_aborted_ms": round((aborted_at - detected) * 1000, 1),
        "baseline_mqtt_round_trip_ms": round(baseline_ms, 2),
    }


def rollout_state(api: Api, rollout_id: str) -> str:
    return str(api.get(f"/v1/rollouts/{rollout_id}")["state"])


def summary_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(seconds) * 1000, 1), "max": round(max(seconds) * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_fd_limit()
    say(f"RLIMIT_NOFILE {limit}")
    with tempfile.TemporaryDirectory(prefix="fleet-sim-scale-") as temp:
        root = Path(temp)
        pki, issue_s = prepare_pki(root / "pki", max(args.agents, args.compare_agents))
        say(f"{max(args.agents, args.compare_agents)} device certificates in {issue_s:.1f}s")
        document = {
            "broker_comparison": compare_brokers(
                pki, root / "compare", args.compare_agents, args.compare_seconds, args.connect_rate
            ),
            "fleet": fleet_run(pki, root / "fleet", args.agents, args.connect_rate, issue_s),
            "rollback": rollback_latency(pki, root / "rollback", args.rollback_agents),
            "nofile_limit": limit,
        }
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The agent on bad links: broker restarts, half-open connections, config reloads while running."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from broker.embedded import BrokerSettings, Listener, ThreadedBroker
from fleet.protocol.codec import decode
from fleet.protocol.messages import Health, Reported
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess
from tests.conftest import MosquittoProcess, Pki, free_port
from tests.faultproxy import FaultProxy
from tests.mqtt import Endpoint, Received, connected, wait_until

pytestmark = pytest.mark.timeout(120)
NODE = "gw-b"


class Restartable(Protocol):
    endpoint: Endpoint

    def stop(self) -> None: ...

    def start(self) -> None: ...


@dataclass
class EmbeddedOnFixedPort:
    pki: Pki
    endpoint: Endpoint
    threaded: ThreadedBroker | None = None

    def start(self) -> None:
        settings = BrokerSettings(pki=self.pki.paths, listeners=(Listener("127.0.0.1", self.endpoint.port),))
        self.threaded = ThreadedBroker(settings)
        self.threaded.start()

    def stop(self) -> None:
        if self.threaded is not None:
            self.threaded.stop()
            self.threaded = None


@dataclass
class MosquittoOnFixedPort:
    pki: Pki
    process: MosquittoProcess
    endpoint: Endpoint

    def start(self) -> None:
        self.process.start(self.pki.controller())

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
def restartable(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> Iterator[Restartable]:
    broker: Restartable
    if request.param == "amqtt":
        broker = EmbeddedOnFixedPort(pki, Endpoint("amqtt", "127.0.0.1", free_port()))
    else:
        process = MosquittoProcess(pki.paths, tmp_path / "mosquitto")
        broker = MosquittoOnFixedPort(pki, process, Endpoint("mosquitto", "127.0.0.1", process.port))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def queued_health(agent: AgentProcess) -> int:
    with closing(sqlite3.connect(agent.state_dir / "agent.db", timeout=5)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE topic LIKE '%/health'").fetchone()
    return int(count)


def agent_behind(proxy: FaultProxy, endpoint: Endpoint, pki: Pki, workdir: Path) -> AgentProcess:
    return AgentProcess(NODE, Endpoint(endpoint.kind, "127.0.0.1", proxy.port), pki.device(NODE), workdir)


def test_broker_restart_agent_reconnects_and_flushes_its_outbox_in_order(
    restartable: Restartable, pki: Pki, tmp_path: Path
) -> None:
    with FaultProxy("127.0.0.1", restartable.endpoint.port) as proxy:
        agent = agent_behind(proxy, restartable.endpoint, pki, tmp_path / "agent")
        try:
            agent.start()
            proxy.refuse()
            restartable.stop()
            outage_started = time.time()
            agent.wait_log("connection to", timeout=20)
            wait_until(lambda: queued_health(agent) >= 3, 20, "health results queued in the outbox while offline")
            outage_ended = time.time()
            restartable.start()
            with connected(restartable.endpoint, pki.operator("alice")) as operator:
                operator.subscribe(node_topic(NODE, Channel.HEALTH))
                proxy.refuse(False)
                agent.wait_log("Connected to control plane", offset=0, count=2)
                health: list[float] = []

                def caught_up(message: Received) -> bool:
                    health.append(decode(message.topic, message.payload, Health).ts)
                    return health[-1] > outage_ended

                operator.expect(caught_up, timeout=20)
        finally:
            agent.stop()
    during_outage = [ts for ts in health if outage_started <= ts <= outage_ended]
    assert len(during_outage) >= 2, f"health produced offline must be flushed, got {health}"
    assert health == sorted(health), "the outbox is flushed in the order it was written"


def test_half_open_link_is_detected_and_replaced(embedded: Endpoint, pki: Pki, tmp_path: Path) -> None:
    with FaultProxy("127.0.0.1", embedded.port) as proxy:
        agent = agent_behind(proxy, embedded, pki, tmp_path / "agent")
        agent.write_config(keepalive="2s")
        try:
            agent.start()
            proxy.stall()  # packets vanish, no FIN, no RST: only keepalive can tell
            stalled = time.monotonic()
            agent.wait_log("connection to", timeout=20)
            detected = time.monotonic() - stalled
            proxy.stall(False)
            proxy.cut()
            agent.wait_log("Connected to control plane", count=2, timeout=30)
        finally:
            agent.stop()
    assert detected < 2 * 2 + 3, f"half-open link noticed after {detected:.1f}s with keepalive 2s"


def test_config_file_change_and_sighup_reload_without_restart(embedded: Endpoint, pki: Pki, tmp_path: Path) -> None:
    agent = AgentProcess(NODE, embedded, pki.device(NODE), tmp_path / "agent")
    with connected(embedded, pki.operator("alice")) as operator:
        operator.subscribe(node_topic(NODE, Channel.REPORTED))
        try:
            agent.start()
            pid = agent.pid

            def labelled(site: str) -> bool:
                def check(message: Received) -> bool:
                    return decode(message.topic, message.payload, Reported).labels.get("site") == site

                operator.expect(check, timeout=15)
                return True

            agent.write_config(labels={"site": "plant-3"})
            assert labelled("plant-3")
            agent.write_config(labels={"site": "plant-4"}, config_poll_interval="1h")
            agent.wait_log("configuration reloaded", count=2)
            agent.write_config(labels={"site": "plant-5"})
            assert agent.process is not None
            agent.process.send_signal(signal.SIGHUP)
            assert labelled("plant-5")
            agent.write_config(heartbeat_interval="not a duration")
            agent.process.send_signal(signal.SIGHUP)
            agent.wait_log("configuration not reloaded, keeping the running one")
            assert agent.pid == pid and agent.process.poll() is None
        finally:
            agent.stop()


def test_systemd_notify_ready_and_watchdog(embedded: Endpoint, pki: Pki, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        agent = AgentProcess(NODE, embedded, pki.device(NODE), tmp_path / "agent")
        agent.env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        try:
            agent.start()
            received = {sock.recv(64).decode() for _ in range(3)}
            assert {"READY=1", "WATCHDOG=1"} <= received
        finally:
            agent.stop()
        sock.settimeout(0.5)
        after_stop = []
        with contextlib.suppress(TimeoutError):
            while True:
                after_stop.append(sock.recv(64).decode())
        assert "STOPPING=1" in after_stop

"""Shared ingest: controllers splitting telemetry through $share subscriptions over one database.

Unit level: the registry's newest-wins merge between two writers and the leadership lease on an
injected clock. System level: two real ``fleet controller --share`` processes on Mosquitto with a
simulated fleet and real agents: both ingest, both see every node, the leader drives a rollout,
and after a ``kill -9`` of the leader the other takes over and finishes it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certs import issue_device
from fleet.controller.lease import Lease
from fleet.controller.registry import Registry
from fleet.controller.storage import Database
from fleet.protocol.codec import encode
from fleet.protocol.messages import Health, Heartbeat, Message, ProbeSpec, Reported, UpdateState
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import build_release
from tests.agentproc import AgentProcess
from tests.apps import app_tree
from tests.conftest import MosquittoProcess, Pki, free_port
from tests.controllerproc import ControllerProcess
from tests.fakeclock import Clock
from tests.faults.chaos import SimProcess
from tests.mqtt import Endpoint, wait_until

pytestmark = pytest.mark.timeout(60)


def send(registry: Registry, node: str, message: Message, channel: Channel) -> None:
    registry.on_message(node_topic(node, channel), encode(message))


def reported(generation: int, version: str) -> Reported:
    return Reported(generation=generation, version=version, state=UpdateState.HEALTHY, ts=1.0)


@pytest.fixture
def two_registries(tmp_path: Path) -> Iterator[tuple[Registry, Registry, Clock]]:
    clock = Clock()
    first, second = Database(tmp_path / "fleet.db"), Database(tmp_path / "fleet.db")
    try:
        yield Registry(first, clock=clock), Registry(second, clock=clock), clock
    finally:
        first.close()
        second.close()


def test_two_writers_merge_newest_per_group(two_registries: tuple[Registry, Registry, Clock]) -> None:
    a, b, clock = two_registries
    send(a, "gw-a", Heartbeat(seq=7, uptime=1, cpu=1, mem_free=1, disk_free=1), Channel.HEARTBEAT)
    clock.advance(1)
    send(b, "gw-a", reported(3, "2.0.0"), Channel.REPORTED)
    a.flush()
    b.flush()
    a.refresh()
    b.refresh()
    for registry in (a, b):
        view = registry.node_view("gw-a")
        assert (view.heartbeat["seq"], view.generation, view.version) == (7, 3, "2.0.0")

    # a's older idea of the reported state never overwrites b's newer one, on disk or in memory
    clock.advance(1)
    send(b, "gw-a", reported(4, "3.0.0"), Channel.REPORTED)
    b.flush()
    send(a, "gw-a", Heartbeat(seq=8, uptime=2, cpu=1, mem_free=1, disk_free=1), Channel.HEARTBEAT)
    a.flush()  # a's row still carries generation 3 from the last refresh
    a.refresh()
    assert a.db.query("SELECT generation, version FROM registry_nodes WHERE id = 'gw-a'") == [(4, "3.0.0")]
    assert a.node_view("gw-a").generation == 4
    b.refresh()
    assert b.node_view("gw-a").heartbeat["seq"] == 8


def test_a_node_only_the_other_controller_heard_of_appears_after_refresh(
    two_registries: tuple[Registry, Registry, Clock],
) -> None:
    a, b, _clock = two_registries
    send(b, "gw-new", reported(1, "1.0.0"), Channel.REPORTED)
    b.flush()
    assert not a.known("gw-new")
    assert a.refresh() == 1
    assert a.node_view("gw-new").version == "1.0.0"
    assert a.refresh() == 1  # re-reads the last few seconds (late commits), idempotently
    assert [view.id for view in a.nodes()] == ["gw-new"]


def test_health_history_from_both_writers_once_each(two_registries: tuple[Registry, Registry, Clock]) -> None:
    a, b, clock = two_registries
    send(a, "gw-a", Health(version="1", healthy=True, ts=1.0), Channel.HEALTH)
    clock.advance(1)
    send(b, "gw-a", Health(version="1", healthy=False, ts=2.0), Channel.HEALTH)
    a.flush()
    b.flush()
    a.refresh()
    a.refresh()
    assert [record.healthy for record in a.health_history("gw-a")] == [True, False]


def test_lease_one_holder_takeover_after_ttl_and_release(tmp_path: Path) -> None:
    clock = Clock()
    db = Database(tmp_path / "fleet.db")
    try:
        a = Lease(db, "ctl-a", ttl=10, clock=clock)
        b = Lease(db, "ctl-b", ttl=10, clock=clock)
        assert a.renew() and not b.renew()
        clock.advance(9)
        assert a.renew() and not b.renew()  # renewed: another 10 s
        clock.advance(9.5)
        assert not b.renew() and b.current_holder() == "ctl-a"
        clock.advance(1)  # a silent for 10.5 s
        assert b.renew() and not a.renew()
        b.release()
        assert b.current_holder() is None and a.renew()
    finally:
        db.close()


# ---- two real controllers ----------------------------------------------------------------------

GROUP = "fleet-ctl"
PROBE = ProbeSpec(kind="exec", target="true", initial_delay=0.2, period=0.5, timeout=2, failure_threshold=2)
SIM_DEVICES = 20
REAL = ("gw-sh1", "gw-sh2")


def metric(controller: ControllerProcess, name: str) -> float:
    for line in controller.metrics_text().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in {controller.identity}'s metrics")


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(300)
def test_two_controllers_split_ingest_and_the_survivor_finishes_the_rollout(pki: Pki, tmp_path: Path) -> None:
    identities = ("ctl-share-a", "ctl-share-b")
    for identity in identities:  # before Mosquitto renders its ACL, which lists controllers
        pki.own_controller(identity)
    broker = MosquittoProcess(pki.paths, tmp_path / "mosquitto")
    broker.start(pki.controller())
    endpoint = Endpoint("mosquitto", "127.0.0.1", broker.port)
    key = load_private_key(pki.paths.release_key.read_bytes())
    store = tmp_path / "store"
    tree = app_tree(tmp_path / "src", "1.0.0", healthy=True)
    build_release(tree, name="app", version="1.0.0", store=store, release_key=key, entry=["./run"], health=PROBE,
                  chunk_size=16 * 1024)  # fmt: skip
    shared = ("--share", GROUP, "--lease-ttl", "3")
    controllers = [
        ControllerProcess(pki, endpoint, tmp_path, store, identity=name, extra_args=shared, db=tmp_path / "fleet.db")
        for name in identities
    ]
    sim = SimProcess(pki.paths.root, endpoint, tmp_path / "sim", "shsim-", SIM_DEVICES, {"heartbeat": 1, "seed": 3})
    agents: list[AgentProcess] = []
    try:
        for controller in controllers:
            controller.start()
        for node in REAL:
            if not pki.paths.device(node).cert.exists():
                issue_device(pki.paths, node)
            agent = AgentProcess(node, endpoint, pki.device(node), tmp_path / node)
            agent.write_config(
                release_public_key=str(pki.paths.release_pub),
                workload={
                    "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                    "env": {"APP_PORT": str(free_port()), "MARKER": str(tmp_path / node / "versions")},
                },
                update={"window": 8, "request_timeout": "3s", "health_grace": "1s"},
            )
            agents.append(agent.start())
        sim.start()
        devices = {*REAL, *sim.node_ids()}

        def everyone_seen_by_both() -> bool:
            return all({n["id"] for n in c.get("/nodes") if n["heartbeat"]} >= devices for c in controllers)

        wait_until(everyone_seen_by_both, 60, "both controllers know every device", interval=0.5)
        heartbeats = [metric(c, "fleet_heartbeats_received_total") for c in controllers]
        assert all(count > 0 for count in heartbeats), f"ingest not split: {heartbeats}"
        leaders = [metric(c, "fleet_controller_leader") for c in controllers]
        assert sorted(leaders) == [0.0, 1.0], leaders
        leader, follower = (controllers[0], controllers[1]) if leaders[0] else (controllers[1], controllers[0])

        # Started through the follower's API, driven by the leader; the leader dies mid-rollout.
        body: dict[str, Any] = {"release": "app@1.0.0", "waves": ["10%", "100%"], "soak": 2, "wave_timeout": 60,
                                "health_timeout": 20, "max_failures": "10%"}  # fmt: skip
        rollout = follower.post("/rollouts", body)["id"]
        wait_until(lambda: follower.get(f"/rollouts/{rollout}")["current_wave"] >= 1 or any(
            n["version"] == "1.0.0" for n in follower.get("/nodes")), 60, "wave 0 under way", interval=0.5)  # fmt: skip
        leader.kill9()
        wait_until(lambda: metric(follower, "fleet_controller_leader") == 1.0, 15, "the survivor leads", interval=0.2)

        def finished() -> bool:
            return follower.get(f"/rollouts/{rollout}")["state"] in {"succeeded", "aborted"}

        wait_until(finished, 120, "rollout finished by the survivor", interval=0.5)
        view = follower.get(f"/rollouts/{rollout}")
        assert view["state"] == "succeeded", view
        assert set(view["nodes"].values()) == {"succeeded"}
        nodes = {n["id"]: n for n in follower.get("/nodes")}
        assert all(nodes[d]["version"] == "1.0.0" and nodes[d]["generation"] == 1 for d in devices), nodes
        assert sim.stop()["downloads_failed"] == 0
    finally:
        sim.kill()
        for agent in agents:
            agent.stop()
        for controller in controllers:
            controller.stop()
        broker.stop()

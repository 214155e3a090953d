"""Operator access against a real ``fleet controller`` process (issue 12): HTTPS, roles, the audit
trail, idempotency keys, ``rollout status --watch`` and the unauthenticated metrics listener.

One controller (embedded broker, two raw devices speaking the protocol) serves the whole module.
Every refused request is followed by a look at the fleet: no command, no rollout, no label, no
desired state may have come from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.embedded import BrokerSettings, Listener, ThreadedBroker
from certs import AccessRole, issue_device, issue_operator, revoke
from fleet.protocol.codec import encode
from fleet.protocol.messages import Heartbeat, Reported, Status, UpdateState
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import build_release
from tests.apps import app_tree
from tests.conftest import Pki, free_port
from tests.controllerproc import ControllerProcess
from tests.mqtt import Endpoint, MqttClient, wait_until

pytestmark = pytest.mark.timeout(120)

NODES = ("gw-acc-1", "gw-acc-2")
LABELS = {"fleet": "access"}
ROLLOUT = {"release": "app@1.0.0", "selector": LABELS, "waves": ["1", "100%"], "soak": 300, "wave_timeout": 600}


@dataclass
class Setup:
    controller: ControllerProcess
    pki: Pki
    devices: list[MqttClient]

    def token(self, name: str, role: str, expires_in: float | None = None) -> str:
        body: dict[str, Any] = {"name": name, "role": role}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return str(self.controller.post("/tokens", body)["token"])

    def fleet_state(self) -> dict[str, Any]:
        """What a refused request must not have changed."""
        return {
            "commands": {node: self.controller.get(f"/nodes/{node}")["commands"] for node in NODES},
            "labels": {node: self.controller.get(f"/nodes/{node}")["node"]["operator_labels"] for node in NODES},
            "generations": {node: self.controller.get(f"/nodes/{node}")["node"]["generation"] for node in NODES},
            "rollouts": [view["id"] for view in self.controller.get("/rollouts")],
            "tokens": sorted(token["name"] for token in self.controller.get("/tokens")),
        }


def device(endpoint: Endpoint, pki: Pki, node: str) -> MqttClient:
    """A device that says it is online, idle and alive (enough for the registry and a rollout)."""
    if not pki.paths.device(node).cert.exists():
        issue_device(pki.paths, node)
    client = MqttClient(endpoint, pki.device(node), client_id=node)
    client.connect()
    publish = client.publish
    publish(node_topic(node, Channel.STATUS), encode(Status(state="online", ts=time.time())), qos=1, retain=True)
    reported = Reported(generation=0, state=UpdateState.IDLE, labels=LABELS, ts=time.time())
    publish(node_topic(node, Channel.REPORTED), encode(reported), qos=1, retain=True)
    beat = Heartbeat(seq=1, uptime=1.0, cpu=1.0, mem_free=1 << 20, disk_free=1 << 30)
    publish(node_topic(node, Channel.HEARTBEAT), encode(beat), qos=0)
    return client


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("access")
    store = workdir / "store"
    key = load_private_key(pki.paths.release_key.read_bytes())
    build_release(app_tree(workdir / "src", "1.0.0"), name="app", version="1.0.0", store=store, release_key=key,
                  entry=["./run"], health=None, chunk_size=64 * 1024)  # fmt: skip
    broker = ThreadedBroker(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 0),), crl_poll_interval=0.2))
    broker.start()
    endpoint = Endpoint("amqtt", "127.0.0.1", broker.ports[0])
    controller = ControllerProcess(pki, endpoint, workdir, store, identity="ctl-access", metrics_port=free_port())
    devices: list[MqttClient] = []
    try:
        controller.start()
        devices = [device(endpoint, pki, node) for node in NODES]
        wait_until(lambda: {n["id"] for n in controller.get("/nodes")} >= set(NODES), 30, "both devices known")
        yield Setup(controller, pki, devices)
    finally:
        for client in devices:
            client.close()
        controller.stop()
        broker.stop()


WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", f"/v1/nodes/{NODES[0]}/commands", {"action": "restart"}),
    ("POST", "/v1/rollouts", ROLLOUT),
    ("PATCH", f"/v1/nodes/{NODES[0]}/labels", {"ring": "canary"}),
    ("POST", "/v1/tokens", {"name": "sneaky", "role": "admin"}),
]


def attempt(http: httpx.Client, status: int, error: str) -> None:
    for method, path, body in WRITES:
        response = http.request(method, path, json=body)
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"].startswith(error), (path, response.text)
        assert "\n" not in response.text


def test_refused_credentials_change_nothing_in_the_fleet(setup: Setup) -> None:
    controller, pki = setup.controller, setup.pki
    before = setup.fleet_state()
    expiring = setup.token("acc-expiring", "operator", expires_in=1.0)
    viewer = setup.token("acc-viewer", "viewer")
    revoked_paths = pki.paths.operator("acc-revoked")
    if not revoked_paths.cert.exists():
        issue_operator(pki.paths, "acc-revoked", access=AccessRole.ADMIN)
    with controller.http(cert=revoked_paths.cert, key=revoked_paths.key) as http:
        assert http.get("/v1/whoami").json()["role"] == "admin"  # valid until revoked
    revoke(pki.paths, "acc-revoked")
    time.sleep(1.2)  # the expiring token's second is over; the controller re-reads crl.pem within a second
    before = before | {"tokens": sorted([*before["tokens"], "acc-expiring", "acc-viewer"])}
    with controller.http(anonymous=True) as anonymous:  # no certificate, no token
        attempt(anonymous, 401, "no credentials")
    with controller.http(token="fleet_0123456789abcdef_" + "A" * 43) as wrong:
        attempt(wrong, 401, "unknown token")
    with controller.http(token=expiring) as expired:
        attempt(expired, 401, "token 'acc-expiring' expired")
    with controller.http(cert=revoked_paths.cert, key=revoked_paths.key) as revoked:
        attempt(revoked, 401, "certificate of 'acc-revoked' is revoked")
    with controller.http(token=viewer) as reader:
        assert reader.get("/v1/nodes").status_code == 200
        attempt(reader, 403, "token 'acc-viewer' has role viewer; this needs ")
    assert setup.fleet_state() == before
    denied = controller.get("/audit?outcome=denied")
    assert {(entry["actor"], entry["status"]) for entry in denied} == {("acc-viewer", 403)}  # 401s are not stored
    assert len(denied) == len(WRITES)


def test_an_operator_token_starts_a_rollout_the_audit_names_it_and_watch_exits_1_on_abort(
    setup: Setup, tmp_path: Path
) -> None:
    controller = setup.controller
    token = setup.token("acc-ci", "operator")
    with controller.http(token=token) as ci:
        key = {"Idempotency-Key": "rollout-from-ci-1"}
        first = ci.post("/v1/rollouts", json=ROLLOUT, headers=key)
        retried = ci.post("/v1/rollouts", json=ROLLOUT, headers=key)
    assert first.status_code == retried.status_code == 201, first.text
    rollout = first.json()["id"]
    assert retried.json()["id"] == rollout and retried.headers["idempotent-replayed"] == "true"
    assert [view["id"] for view in controller.get(f"/rollouts?release={ROLLOUT['release']}")].count(rollout) == 1
    (started, replay) = controller.get(f"/audit?target={rollout}")
    assert (started["actor"], started["via"], started["role"], started["action"]) == (
        "acc-ci", "token", "operator", "start_rollout",
    )  # fmt: skip
    assert started["outcome"] == "ok" and replay["detail"] == "idempotent replay"
    assert controller.get(f"/rollouts/{rollout}")["actions"][0]["actor"] == "acc-ci"

    env = {key: value for key, value in os.environ.items() if not key.startswith("FLEET_")}
    env |= {"FLEET_CONTROLLER": controller.url, "FLEET_CERTS": str(setup.pki.paths.root), "FLEET_TOKEN": token}
    log = tmp_path / "watch.out"
    with log.open("w") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "fleet", "rollout", "status", rollout, "--watch", "--interval", "0.2",
             "--timeout", "90", "-o", "json"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_until(lambda: rollout in log.read_text(), 30, "the watch printed the rollout")
        with controller.http(token=token) as ci:
            assert ci.post(f"/v1/rollouts/{rollout}/abort").status_code == 200
        assert watch.wait(30) == 1, log.read_text()
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert f"fleet: rollout {rollout} aborted: aborted by the operator" in log.read_text()
    actions = [(a["action"], a["actor"]) for a in controller.get(f"/rollouts/{rollout}")["actions"]]
    assert actions == [("start_rollout", "acc-ci"), ("abort_rollout", "acc-ci")]


def test_a_retried_post_with_the_same_idempotency_key_creates_one_command(setup: Setup) -> None:
    controller = setup.controller
    node = NODES[1]
    before = len(controller.get(f"/nodes/{node}")["commands"])
    with controller.http() as admin:
        answers = [
            admin.post(f"/v1/nodes/{node}/commands", json={"action": "ping"}, headers={"Idempotency-Key": "ping-1"})
            for _ in range(3)
        ]
    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert len(controller.get(f"/nodes/{node}")["commands"]) == before + 1


def test_the_metrics_listener_serves_without_credentials_and_refuses_writes(setup: Setup) -> None:
    controller = setup.controller
    before = setup.fleet_state()
    with httpx.Client(base_url=controller.metrics_url, timeout=10) as scraper:
        metrics = scraper.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "fleet_nodes{",
            "fleet_build_info{",
            "process_resident_memory_bytes",
            "fleet_heartbeat_lag_seconds",
            "fleet_certificate_expiry_timestamp_seconds{",
        ):
            assert name in metrics.text, name  # fmt: skip
        assert scraper.get("/healthz").json()["broker"] == "connected"
        for method, path, body in [*WRITES, ("POST", "/metrics", None), ("DELETE", "/metrics", None)]:
            response = scraper.request(method, path, json=body)
            assert response.status_code in (404, 405), (method, path, response.text)
        assert scraper.get("/v1/nodes").status_code == 404
    assert setup.fleet_state() == before
    with controller.http(anonymous=True) as anonymous:
        assert anonymous.get("/metrics").status_code == 401  # on the API, metrics need a role
        health = anonymous.get("/healthz")
        assert health.status_code == 200
        assert health.json() | {"tick_age": None} == {
            "ok": True, "broker": "connected", "database": "ok", "leader": True, "tick_age": None,
        }  # fmt: skip

"""The whole system: `fleet controller` process, embedded broker, real agent processes, signed releases."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs import issue_device
from fleet.protocol.signing import load_private_key
from fleet.releases import ReleaseProbe, build_release
from tests.agentproc import AgentProcess, settle
from tests.apps import app_tree
from tests.conftest import Pki, free_port
from tests.controllerproc import ControllerProcess
from tests.mqtt import Endpoint, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NODES = ("gw-e1", "gw-e2", "gw-e3")  # gw-e1 is the canary (an operator label; gw-e3 claims the ring itself)
HEALTH = ReleaseProbe(
    kind="http",
    target="http://127.0.0.1:${APP_PORT}/healthz",
    env=["APP_PORT"],  # each device its own port: the release declares what its probe may expand
    initial_delay=0.3,
    period=0.3,
    timeout=1,
    failure_threshold=2,
)


@dataclass
class Fleet:
    controller: ControllerProcess
    agents: dict[str, AgentProcess]
    ports: dict[str, int]

    def version(self, node: str) -> str | None:
        return self.controller.get(f"/nodes/{node}")["node"]["version"]  # type: ignore[no-any-return]

    def rollout(self, release: str, **options: Any) -> str:
        body = {"release": release, "selector": {"fleet": "e2e"}, "waves": ["1", "2", "100%"], "soak": 1,
                "wave_timeout": 60, "health_timeout": 10, "max_failures": "1"} | options  # fmt: skip
        return str(self.controller.post("/rollouts", body)["id"])

    def wait_rollout(self, rollout_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        view: dict[str, Any] = {}

        def done() -> bool:
            view.update(self.controller.get(f"/rollouts/{rollout_id}"))
            return view["state"] in states

        wait_until(done, timeout, f"rollout {rollout_id} in {states}")
        return view


@pytest.fixture
def fleet(embedded: Endpoint, pki: Pki, tmp_path: Path) -> Iterator[Fleet]:
    key = load_private_key(pki.paths.release_key.read_bytes())
    store = tmp_path / "store"
    for version, healthy, edits in (("1.0.0", True, 0), ("2.0.0", True, 40), ("3.0.0", False, 80)):
        tree = app_tree(tmp_path / "src" / version, version, healthy=healthy, edits=edits)
        build_release(tree, name="app", version=version, store=store, release_key=key, entry=["./run"],
                      health=HEALTH, chunk_size=16 * 1024)  # fmt: skip
    controller = ControllerProcess(pki, embedded, tmp_path, store)
    agents: dict[str, AgentProcess] = {}
    ports: dict[str, int] = {}
    try:
        controller.start()
        for node in NODES:
            if not pki.paths.device(node).cert.exists():
                issue_device(pki.paths, node)
            ports[node] = free_port()
            agent = AgentProcess(node, embedded, pki.device(node), tmp_path / node)
            labels = {"fleet": "e2e"} | ({"ring": "canary"} if node == "gw-e3" else {})  # ignored for ordering
            agent.write_config(
                labels=labels,
                release_public_key=str(pki.paths.release_pub),
                workload={
                    "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                    "env": {"APP_PORT": str(ports[node]), "MARKER": str(tmp_path / node / "versions")},
                    "restart_backoff": {"initial": "200ms", "maximum": "1s", "jitter": 0},
                },
                update={"window": 8, "request_timeout": "3s", "health_grace": "3s"},
            )
            agents[node] = agent.start()
        result = Fleet(controller, agents, ports)
        wait_until(lambda: {n["id"] for n in controller.get("/nodes") if n["status"] == "online"} >= set(NODES),
                   30, "controller sees every agent online")  # fmt: skip
        controller.patch("/nodes/gw-e1/labels", {"ring": "canary"})
        yield result
    finally:
        for agent in agents.values():
            agent.stop()
        controller.stop()


def install_v1(fleet: Fleet) -> None:
    view = fleet.wait_rollout(fleet.rollout("app@1.0.0"), {"succeeded"})
    assert set(view["nodes"].values()) == {"succeeded"}


def test_three_waves_then_pause_resume_then_a_bad_release_is_aborted_and_rolled_back(fleet: Fleet) -> None:
    view = fleet.wait_rollout(fleet.rollout("app@1.0.0"), {"succeeded"})
    assert [wave["nodes"] for wave in view["waves"]] == [1, 1, 1]
    first = min(view["waves"], key=lambda w: w["index"])
    assert first["started_at"] <= min(w["started_at"] for w in view["waves"])
    assert all(fleet.version(node) == "1.0.0" for node in NODES)

    rollout = fleet.rollout("app@2.0.0", soak=2)
    fleet.controller.post(f"/rollouts/{rollout}/pause")
    settle(4.0)  # paused: wave 0 may finish, the next wave must not start
    paused = fleet.controller.get(f"/rollouts/{rollout}")
    assert paused["state"] == "paused"
    assert sum(1 for w in paused["waves"] if w["started_at"] is not None) == 1
    fleet.controller.post(f"/rollouts/{rollout}/resume")
    fleet.wait_rollout(rollout, {"succeeded"})
    assert all(fleet.version(node) == "2.0.0" for node in NODES)

    bad = fleet.rollout("app@3.0.0")
    view = fleet.wait_rollout(bad, {"aborted"})
    assert "fail" in (view["detail"] or "")
    assert view["nodes"]["gw-e1"] in {"failed", "rolled_back"}
    untouched = [node for node in NODES if node != "gw-e1"]
    assert all(view["nodes"][node] == "pending" for node in untouched)
    wait_until(lambda: all(fleet.version(node) == "2.0.0" for node in NODES), 60, "every node back on 2.0.0")
    for node in untouched:
        actions = [c["action"] for c in fleet.controller.get(f"/nodes/{node}")["commands"]]
        assert "rollback" not in actions


def test_health_silence_after_the_update_is_failure_and_rolls_back(fleet: Fleet) -> None:
    install_v1(fleet)
    rollout = fleet.rollout("app@2.0.0", waves=["1", "100%"], soak=30, health_timeout=4)
    canary = fleet.agents["gw-e1"]
    wait_until(lambda: fleet.version("gw-e1") == "2.0.0", 60, "canary reports the new version")
    assert canary.process is not None
    canary.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
    silenced = time.monotonic()
    try:
        fleet.wait_rollout(rollout, {"aborting", "aborted"}, timeout=30)
        detected = time.monotonic() - silenced
    finally:
        canary.process.send_signal(signal.SIGCONT)
    print(f"health silence -> rollout aborting after {detected:.2f}s (health_timeout 4s)")  # read with -s
    assert detected < 4 + 1 + 2, f"silence detected after {detected:.1f}s with health_timeout 4s"
    fleet.wait_rollout(rollout, {"aborted"})
    wait_until(lambda: fleet.version("gw-e1") == "1.0.0", 60, "canary rolled back to 1.0.0")


def test_offline_node_is_unreachable_then_converges_when_it_returns(fleet: Fleet) -> None:
    install_v1(fleet)
    fleet.agents["gw-e3"].stop()
    wait_until(lambda: fleet.controller.get("/nodes/gw-e3")["node"]["status"] == "offline", 30, "gw-e3 offline")
    view = fleet.wait_rollout(fleet.rollout("app@2.0.0", wave_timeout=8), {"succeeded", "aborted"})
    assert view["nodes"]["gw-e3"] == "unreachable"
    assert fleet.version("gw-e1") == "2.0.0"
    fleet.agents["gw-e3"].start()
    wait_until(lambda: fleet.version("gw-e3") == "2.0.0", 60, "gw-e3 converges to the rollout's release")


def test_controller_killed_mid_wave_resumes_the_same_rollout(fleet: Fleet) -> None:
    rollout = fleet.rollout("app@1.0.0", soak=3)
    wait_until(lambda: fleet.version("gw-e1") == "1.0.0", 60, "wave 0 node updated")
    fleet.controller.kill9()
    fleet.controller.start()
    view = fleet.wait_rollout(rollout, {"succeeded"})
    assert set(view["nodes"].values()) == {"succeeded"}
    # One rollout, one desired generation per node: nothing was published twice.
    for node in NODES:
        assert fleet.controller.get(f"/nodes/{node}")["node"]["generation"] == 1
    assert os.path.exists(fleet.controller.workdir / "fleet.db")

"""Skewed clocks do not break the control plane (issue 11): a real fleet-agent whose clock runs an
hour ahead or behind (libfaketime) answers ``fleet send NODE ping --expires-in 10m`` with ``done``
and a command that really expired with ``expired``, on both brokers, against a real controller
that shows the node's offset.

The PKI is made two hours in the past (under libfaketime too): certificates are backdated by only
5 minutes, and an agent an hour behind would otherwise find the broker's certificate not yet valid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.embedded import BrokerSettings, Listener, ThreadedBroker
from certs import PkiPaths
from tests.agentproc import AgentProcess, libfaketime
from tests.conftest import MosquittoProcess, Pki
from tests.controllerproc import ControllerProcess
from tests.mqtt import Credentials, Endpoint, wait_until

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(libfaketime() is None, reason="libfaketime is missing (apt-get install faketime)"),
]

NODES = {"+1h": "gw-ahead", "-1h": "gw-behind"}
HOUR = 3600.0
CONTROLLER = "ctl-skew"


@pytest.fixture(scope="module")
def skew_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("skew-pki")
    script = (
        "import sys\nfrom certs import init_pki, issue_device\n"
        "pki = init_pki(sys.argv[1])\nfor node in sys.argv[3:]: issue_device(pki, node)\ninit_pki(sys.argv[2])\n"
    )
    library = libfaketime()
    assert library is not None
    env = {**os.environ, "LD_PRELOAD": str(library), "FAKETIME": "-2h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(root / "main"), str(root / "foreign"), *NODES.values()],
        env=env,
        check=True,
        timeout=120,
    )
    pki = Pki(PkiPaths(root / "main"), PkiPaths(root / "foreign"))
    pki.own_controller(CONTROLLER)  # before any broker renders its ACL (Mosquitto names controllers one by one)
    return pki


@pytest.fixture(params=["amqtt", "mosquitto"])
def skew_broker(request: pytest.FixtureRequest, skew_pki: Pki, tmp_path: Path) -> Iterator[Endpoint]:
    if request.param == "amqtt":
        threaded = ThreadedBroker(BrokerSettings(pki=skew_pki.paths, listeners=(Listener("127.0.0.1", 0),)))
        threaded.start()
        try:
            yield Endpoint("amqtt", "127.0.0.1", threaded.ports[0])
        finally:
            threaded.stop()
        return
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto mosquitto-clients; .ci/run does)")
    process = MosquittoProcess(skew_pki.paths, tmp_path / "mosquitto")
    process.start(skew_pki.controller())
    try:
        yield Endpoint("mosquitto", "127.0.0.1", process.port)
    finally:
        process.stop()


def fleet_cli(controller: ControllerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fleet", *args, "--controller", controller.url,
               "--certs", str(controller.pki.paths.root)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def agent_acks(controller: ControllerProcess, command_id: str) -> list[str]:
    view: dict[str, Any] = controller.get(f"/commands/{command_id}")
    return [ack["status"] for ack in view["acks"]]


@pytest.mark.parametrize("offset", ["+1h", "-1h"])
def test_an_agent_with_a_skewed_clock_judges_expiry_on_controller_time(
    offset: str, skew_broker: Endpoint, skew_pki: Pki, tmp_path: Path
) -> None:
    node = NODES[offset]
    controller = ControllerProcess(skew_pki, skew_broker, tmp_path, tmp_path / "store", identity=CONTROLLER)
    agent = AgentProcess(node, skew_broker, Credentials(skew_pki.paths.ca_cert, *_device(skew_pki, node)),
                         tmp_path / node, clock_offset=offset)  # fmt: skip
    try:
        controller.start()
        agent.start(timeout=40)
        wait_until(
            lambda: any(n["id"] == node and n["status"] == "online" for n in controller.get("/nodes")),
            30,
            f"the controller sees {node} online",
        )

        # A fresh command with ten minutes to live runs, whichever way the agent's clock is off.
        sent = fleet_cli(controller, "send", node, "ping", "--expires-in", "10m", "--wait", "30s", "-o", "json")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert '"status": "done"' in sent.stdout, sent.stdout

        # The controller measured the agent's clock from its messages and shows it.
        expected = HOUR if offset == "+1h" else -HOUR

        def measured() -> bool:
            value = controller.get(f"/nodes/{node}")["node"].get("clock_offset")
            return value is not None and abs(value - expected) < 60

        wait_until(measured, 20, f"the controller shows {node}'s clock {offset}")
        shown = fleet_cli(controller, "node", node)
        assert shown.returncode == 0, shown.stderr
        direction = "ahead of the controller" if offset == "+1h" else "behind the controller"
        assert direction in shown.stdout, shown.stdout
        assert "fleet_device_clock_skewed_nodes 1.0" in _metrics(controller)
        agent.wait_log(f"controller clock is {'-' if offset == '+1h' else '+'}3")  # learned from the signed ping

        # A command that really expired while the agent was away is answered expired, not run: the
        # agent kept the controller's offset in agent.db across its restart.
        assert agent.stop() == 0
        late = fleet_cli(controller, "send", node, "ping", "--expires-in", "3s", "-o", "json")
        assert late.returncode == 0, late.stderr
        command_id = _command_id(late.stdout)
        wait_until(lambda: controller.get(f"/commands/{command_id}")["status"] == "expired", 20, "expired on record")
        agent.start(timeout=40)
        wait_until(lambda: "expired" in agent_acks(controller, command_id), 30, f"{node} answers expired")
        assert "done" not in agent_acks(controller, command_id)
        assert f"executing command {command_id}" not in agent.log_text()
    finally:
        agent.stop()
        controller.stop()


def _device(pki: Pki, node: str) -> tuple[Path, Path]:
    paths = pki.paths.device(node)
    return paths.cert, paths.key


def _command_id(output: str) -> str:
    return str(json.loads(output)["id"])


def _metrics(controller: ControllerProcess) -> str:
    with controller.http() as http:
        response = http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

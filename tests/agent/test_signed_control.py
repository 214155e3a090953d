"""A signed control plane, on by default: a real fleet-agent against both brokers refuses desired
state and commands that the controller's control key did not sign for it (issue 11).

The agent finds ``control.pub`` next to its ``tls.ca`` (the tests' PKI has it). What it refuses
shows up where an operator looks: event ``desired_rejected`` for desired state, ack ``rejected``
with the reason for a command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import load_control_key
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import Ack, Command, DesiredState, Event, ProbeSpec, Reported
from fleet.protocol.signing import sign_document
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess, settle
from tests.conftest import Pki
from tests.control import signed_command_json, signed_desired
from tests.mqtt import Endpoint, MqttClient, Received, connected

pytestmark = pytest.mark.timeout(120)
NODE = "gw-a"
OTHER = "gw-b"


def topic(channel: Channel, node: str = NODE) -> str:
    return node_topic(node, channel)


@pytest.fixture
def agent(broker: Endpoint, pki: Pki, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(NODE, broker, pki.device(NODE), tmp_path / "agent")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def operator(broker: Endpoint, pki: Pki) -> Iterator[MqttClient]:
    with connected(broker, pki.operator("alice")) as client:
        client.subscribe(f"fleet/v1/nodes/{NODE}/#")
        yield client


def publish_desired(broker: Endpoint, pki: Pki, payload: bytes) -> None:
    """As a controller identity would (or the broker itself, or a forged will): retained."""
    with connected(broker, pki.controller()) as controller:
        controller.publish(topic(Channel.DESIRED), payload, retain=True)


def publish_command(broker: Endpoint, pki: Pki, payload: str | bytes) -> None:
    """As an operator identity would with mosquitto_pub."""
    with connected(broker, pki.operator()) as operator:
        operator.publish(topic(Channel.CMD), payload.encode() if isinstance(payload, str) else payload)


def rejected_event(operator: MqttClient, fragment: str) -> Event:
    def matches(message: Received) -> bool:
        if message.topic != topic(Channel.EVENTS):
            return False
        event = decode(message.topic, message.payload, Event)
        return event.kind == "desired_rejected" and fragment in (event.detail or "")

    message = operator.expect(matches, 20)
    return decode(message.topic, message.payload, Event)


def final_ack(operator: MqttClient, command_id: str) -> Ack:
    def matches(message: Received) -> bool:
        if message.topic != topic(Channel.ACK):
            return False
        ack = decode(message.topic, message.payload, Ack)
        return ack.id == command_id and ack.status.value in {"done", "failed", "rejected", "expired"}

    message = operator.expect(matches, 20)
    return decode(message.topic, message.payload, Ack)


def reported_generations(operator: MqttClient) -> set[int]:
    return {
        decode(m.topic, m.payload, Reported).generation for m in operator.drain() if m.topic == topic(Channel.REPORTED)
    }


def reported(operator: MqttClient, generation: int) -> Reported:
    message = operator.expect(
        lambda m: m.topic == topic(Channel.REPORTED) and decode(m.topic, m.payload, Reported).generation == generation,
        20,
    )
    return decode(message.topic, message.payload, Reported)


# An exec probe is code the agent runs: exactly what an unsigned desired state must never bring.
EXEC_PROBE = ProbeSpec(kind="exec", target="touch /tmp/fleet-unsigned-desired-ran")


def test_unsigned_desired_state_is_refused(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.start()
    unsigned = DesiredState(generation=5, config={"labels": {"ring": "pwned"}}, health=EXEC_PROBE)
    publish_desired(broker, pki, encode(unsigned))
    event = rejected_event(operator, "desired state is not signed")
    assert event.kind == "desired_rejected"
    agent.wait_log("desired state is not signed")
    # A signed one for this node is applied: the refusal was about the signature, nothing else.
    publish_desired(broker, pki, encode(signed_desired(pki.paths, NODE, DesiredState(generation=6, config={"a": 1}))))
    assert reported(operator, 6).generation == 6
    assert 5 not in reported_generations(operator)
    assert json.loads((agent.state_dir / "config.json").read_text()) == {"a": 1}


def test_desired_state_signed_for_another_node_is_refused(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.start()
    # A genuine document of gw-b (e.g. copied from its retained topic) replayed to gw-a.
    for_b = signed_desired(pki.paths, OTHER, DesiredState(generation=9, config={"labels": {"ring": "b"}}))
    publish_desired(broker, pki, encode(for_b))
    rejected_event(operator, f"signed for node '{OTHER}', not for '{NODE}'")
    # A command document on the desired topic: bound to its channel, refused too.
    command = signed_command_json(pki.paths, NODE, "c-1", "ping")
    publish_desired(broker, pki, command.encode())
    rejected_event(operator, "signed as 'cmd', not as 'desired'")
    settle(1.0)
    assert 9 not in reported_generations(operator)
    assert (
        not (agent.state_dir / "config.json").exists()
        or json.loads((agent.state_dir / "config.json").read_text()) == {}
    )


def test_unsigned_restart_is_rejected_and_unsigned_ping_accepted(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.write_config(workload={"command": [sys.executable, "-c", "import time; time.sleep(3600)"]})
    agent.start()
    agent.wait_log("workload started with pid")
    publish_command(broker, pki, '{"id":"u-restart","action":"restart"}')
    ack = final_ack(operator, "u-restart")
    assert (ack.status.value, ack.detail) == (
        "rejected",
        "unsigned command: restart needs a signature (allowed unsigned: ping, report)",
    )
    publish_command(broker, pki, '{"id":"u-ping","action":"ping"}')
    ack = final_ack(operator, "u-ping")
    assert (ack.status.value, ack.detail) == ("done", "pong")
    publish_command(broker, pki, '{"id":"u-report","action":"report"}')
    assert final_ack(operator, "u-report").status.value == "done"
    # Signed, the same restart runs.
    publish_command(broker, pki, signed_command_json(pki.paths, NODE, "s-restart", "restart"))
    assert final_ack(operator, "s-restart").status.value == "done"
    assert agent.log_text().count("workload started with pid") == 2  # the first start and the signed restart


def test_the_unsigned_allow_list_is_configurable(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.write_config(unsigned_actions=["ping"])
    agent.start()
    publish_command(broker, pki, '{"id":"u-report","action":"report"}')
    ack = final_ack(operator, "u-report")
    assert (ack.status.value, ack.detail) == (
        "rejected",
        "unsigned command: report needs a signature (allowed unsigned: ping)",
    )


def test_signed_commands_with_the_wrong_node_or_kind_are_refused(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.start()
    publish_command(broker, pki, signed_command_json(pki.paths, OTHER, "for-b", "restart"))
    ack = final_ack(operator, "for-b")
    assert ack.status.value == "rejected"
    assert ack.detail == f"signed for node '{OTHER}', not for '{NODE}'"
    # Signed with the control key, but as a desired-state document (kind "desired"), on cmd.
    now = time.time()
    raw = Command(id="as-desired", action="reload", expires_at=now + 600).model_dump(exclude_none=True)
    raw |= {"node": NODE, "kind": "desired", "issued_at": now}
    publish_command(broker, pki, json.dumps(sign_document(raw, load_control_key(pki.paths))))
    ack = final_ack(operator, "as-desired")
    assert (ack.status.value, ack.detail) == ("rejected", "signed as 'desired', not as 'cmd'")
    # Tampered after signing: the signature does not match.
    tampered = json.loads(signed_command_json(pki.paths, NODE, "tampered", "ping"))
    tampered["action"] = "restart"
    publish_command(broker, pki, json.dumps(tampered))
    ack = final_ack(operator, "tampered")
    assert (ack.status.value, ack.detail) == ("rejected", "signature does not match the document and key")
    # Signed by another key (the foreign PKI's control key).
    foreign = signed_command_json(pki.foreign, NODE, "foreign", "restart")
    publish_command(broker, pki, foreign)
    assert final_ack(operator, "foreign").status.value == "rejected"
    assert "executing command" not in agent.log_text()


def _config_without_key(agent: AgentProcess, tmp_path: Path, pki: Pki) -> None:
    # ca.pem in a directory of its own: no control.pub next to it, and none configured.
    ca = tmp_path / "bare" / "ca.pem"
    ca.parent.mkdir()
    shutil.copy(pki.paths.ca_cert, ca)
    tls = {"ca": str(ca), "cert": str(agent.creds.cert), "key": str(agent.creds.key)}
    agent.write_config(tls=tls)


def test_an_agent_without_a_controller_key_does_not_start(agent: AgentProcess, pki: Pki, tmp_path: Path) -> None:
    _config_without_key(agent, tmp_path, pki)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("fleet-agent: error: no controller key: set controller_public_key")
    assert "insecure_unsigned_control: true" in line


def test_insecure_unsigned_control_must_be_explicit(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki, tmp_path: Path
) -> None:
    _config_without_key(agent, tmp_path, pki)
    agent.write_config(insecure_unsigned_control=True)
    agent.start()
    agent.wait_log("insecure_unsigned_control: desired state and commands are NOT verified")
    publish_desired(broker, pki, encode(DesiredState(generation=3, config={"x": 1})))
    assert reported(operator, 3).generation == 3

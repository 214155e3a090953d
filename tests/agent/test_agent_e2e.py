"""Real fleet-agent processes against real brokers (embedded amqtt and Mosquitto)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import Ack, DesiredState, Event, Health, Reported
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess, settle, wait_file_lines
from tests.conftest import Pki
from tests.control import signed_command_json, signed_desired
from tests.mqtt import Endpoint, MqttClient, Received, connected

pytestmark = pytest.mark.timeout(120)
NODE = "gw-a"


def topic(channel: Channel) -> str:
    return node_topic(NODE, channel)


def workload_writing_pids(path: Path, exit_code: int | None = None) -> list[str]:
    tail = f"raise SystemExit({exit_code})" if exit_code is not None else "time.sleep(3600)"
    script = f"import os, time\nwith open({str(path)!r}, 'a') as f: f.write(str(os.getpid()) + '\\n')\n{tail}\n"
    return [sys.executable, "-c", script]


@pytest.fixture
def agent(broker: Endpoint, pki: Pki, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(NODE, broker, pki.device(NODE), tmp_path / "agent")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def operator(broker: Endpoint, pki: Pki) -> Iterator[MqttClient]:
    # alice, not `operator`: mosquitto_pub below uses operator.pem, and one identity = one connection.
    with connected(broker, pki.operator("alice")) as client:
        client.subscribe(f"fleet/v1/nodes/{NODE}/#")
        yield client


def acks(client: MqttClient, command_id: str, settle_for: float = 0.0) -> list[str]:
    return [
        decode(m.topic, m.payload, Ack).status.value
        for m in client.drain(settle_for)
        if m.topic == topic(Channel.ACK) and decode(m.topic, m.payload, Ack).id == command_id
    ]


def wait_ack(client: MqttClient, command_id: str, status: str, timeout: float = 20.0) -> Received:
    def matches(message: Received) -> bool:
        if message.topic != topic(Channel.ACK):
            return False
        ack = decode(message.topic, message.payload, Ack)
        return ack.id == command_id and ack.status.value == status

    return client.expect(matches, timeout)


def mosquitto_pub(broker: Endpoint, pki: Pki, topic_name: str, message: str, *, retain: bool = False) -> None:
    tls = [
        "--cafile",
        str(pki.paths.ca_cert),
        "--cert",
        str(pki.paths.operator_cert),
        "--key",
        str(pki.paths.operator_key),
    ]
    flags = ["-r"] if retain else []
    subprocess.run(
        [
            "mosquitto_pub",
            *tls,
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-t",
            topic_name,
            "-m",
            message,
            *flags,
        ],
        check=True,
        timeout=20,
    )


def publish_desired(broker: Endpoint, pki: Pki, desired: DesiredState) -> None:
    with connected(broker, pki.controller()) as controller:
        controller.publish(topic(Channel.DESIRED), encode(signed_desired(pki.paths, NODE, desired)), retain=True)


def signed(pki: Pki, command_id: str, action: str, **options: Any) -> str:
    """A command for NODE as `fleet sign` prints it: only ping and report may go unsigned."""
    return signed_command_json(pki.paths, NODE, command_id, action, **options)


def workload_starts(agent: AgentProcess) -> int:
    return agent.log_text().count("workload started with pid")


def test_command_sent_while_stopped_runs_once_after_start(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.write_config(workload={"command": [sys.executable, "-c", "import time; time.sleep(3600)"]})
    agent.start()
    agent.wait_log("workload started with pid")
    assert agent.stop() == 0
    mosquitto_pub(broker, pki, topic(Channel.CMD), signed(pki, "cmd-1", "restart"))
    agent.start()
    wait_ack(operator, "cmd-1", "done")
    assert workload_starts(agent) == 3  # first run, second run, the restart command
    mosquitto_pub(broker, pki, topic(Channel.CMD), signed(pki, "cmd-1", "restart"))
    wait_ack(operator, "cmd-1", "duplicate")
    settle(1.0)
    assert workload_starts(agent) == 3
    assert acks(operator, "cmd-1").count("done") == 1


def test_kill9_between_receiving_and_acknowledging_a_command_runs_it_once(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    agent.write_config(workload={"command": workload_writing_pids(pids)})
    agent.start(failpoints="command.received")
    (orphan,) = wait_file_lines(pids, 1, 20)
    mosquitto_pub(broker, pki, topic(Channel.CMD), signed(pki, "crash-1", "restart"))
    assert agent.wait_exit(20) == -9
    assert psutil.pid_exists(int(orphan)), "kill -9 of the agent leaves its workload running"
    agent.start()
    wait_ack(operator, "crash-1", "done")
    agent.wait_log("left over from a previous agent")
    assert not psutil.pid_exists(int(orphan)) or psutil.Process(int(orphan)).status() == psutil.STATUS_ZOMBIE
    # The broker redelivers the command it never got a PUBACK for: the agent answers duplicate.
    wait_ack(operator, "crash-1", "duplicate")
    assert agent.log_text().count("executing command crash-1") == 1
    assert acks(operator, "crash-1").count("done") == 1


def test_bad_commands_are_answered(agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki) -> None:
    agent.start()
    mosquitto_pub(broker, pki, topic(Channel.CMD), signed(pki, "u1", "launch-missiles"))
    wait_ack(operator, "u1", "rejected")
    mosquitto_pub(broker, pki, topic(Channel.CMD), '{"id":"t1","action":42}')
    wait_ack(operator, "t1", "rejected")
    mosquitto_pub(
        broker, pki, topic(Channel.CMD), json.dumps({"id": "e1", "action": "ping", "expires_at": time.time() - 5})
    )
    wait_ack(operator, "e1", "expired")
    mosquitto_pub(broker, pki, topic(Channel.CMD), "not json and not msgpack {")
    mosquitto_pub(broker, pki, topic(Channel.CMD), '{"id":"p1","action":"ping"}')
    done = wait_ack(operator, "p1", "done")
    assert decode(done.topic, done.payload, Ack).detail == "pong"
    assert agent.process is not None and agent.process.poll() is None
    mosquitto_pub(broker, pki, topic(Channel.CMD), signed(pki, "r1", "rollback"))
    failed = wait_ack(operator, "r1", "failed")
    assert decode(failed.topic, failed.payload, Ack).detail == "no previous release"


def test_desired_state_is_applied_without_restart_and_old_generations_are_ignored(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.start()
    pid = agent.pid
    publish_desired(
        broker, pki, DesiredState(generation=5, config={"heartbeat_interval": "2s", "labels": {"ring": "canary"}})
    )

    def reported(generation: int) -> Received:
        return operator.expect(
            lambda m: (
                m.topic == topic(Channel.REPORTED) and decode(m.topic, m.payload, Reported).generation == generation
            )
        )

    message = reported(5)
    assert decode(message.topic, message.payload, Reported).labels["ring"] == "canary"
    assert json.loads((agent.state_dir / "config.json").read_text())["heartbeat_interval"] == "2s"
    publish_desired(broker, pki, DesiredState(generation=3, config={"heartbeat_interval": "9s"}))
    agent.wait_log("ignored desired generation 3 (applied 5)")
    assert agent.pid == pid and agent.process is not None and agent.process.poll() is None
    assert json.loads((agent.state_dir / "config.json").read_text())["heartbeat_interval"] == "2s"


def test_desired_state_is_reread_after_a_restart(
    agent: AgentProcess, operator: MqttClient, broker: Endpoint, pki: Pki
) -> None:
    agent.start()
    agent.stop()
    publish_desired(broker, pki, DesiredState(generation=7, config={"mode": "eco"}))
    started = time.monotonic()
    agent.start()
    operator.expect(
        lambda m: m.topic == topic(Channel.REPORTED) and decode(m.topic, m.payload, Reported).generation == 7
    )
    assert time.monotonic() - started < 15
    assert json.loads((agent.state_dir / "config.json").read_text()) == {"mode": "eco"}


def test_crashing_workload_is_restarted_with_growing_delays(
    agent: AgentProcess, operator: MqttClient, tmp_path: Path
) -> None:
    agent.write_config(
        workload={
            "command": workload_writing_pids(tmp_path / "starts", exit_code=3),
            "restart_backoff": {"initial": "200ms", "maximum": "1600ms", "jitter": 0},
        }
    )
    agent.start()
    delays: list[float] = []

    def exited(message: Received) -> bool:
        if message.topic != topic(Channel.EVENTS):
            return False
        event = decode(message.topic, message.payload, Event)
        if event.kind == "workload_exited":
            delays.append(float(event.data["restart_in"]))
            assert event.data["exit_code"] == 3
        return len(delays) >= 5

    operator.expect(exited, timeout=30)
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert max(delays) <= 1.6


def test_unhealthy_workload_is_reported_within_the_probe_budget(agent: AgentProcess, operator: MqttClient) -> None:
    agent.write_config(
        workload={
            "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
            "health": {"exec": "false", "initial_delay": "1s", "period": "500ms", "failure_threshold": 3},
        }
    )
    agent.start()
    started = time.monotonic()
    message = operator.expect(
        lambda m: m.topic == topic(Channel.HEALTH) and not decode(m.topic, m.payload, Health).healthy, timeout=20
    )
    budget = 1.0 + 3 * 0.5
    assert time.monotonic() - started < budget + 3.0  # slack for process start and a busy machine
    assert decode(message.topic, message.payload, Health).consecutive_failures >= 3


def test_broken_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("node_id: gw-a\nserver_addr: nowhere\nstate_dir: /tmp/x\ntls_enabled: false\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"fleet-agent: error: {config}: server_addr: 'nowhere' is not HOST:PORT"

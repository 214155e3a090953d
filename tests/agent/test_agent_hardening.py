"""What a desired state can no longer do to a real ``fleet-agent`` (issue 11, "close the trust holes").

- an ``exec`` health probe in a desired state never runs: the document is refused (``desired_rejected``);
- a desired state the agent cannot apply (``heartbeat_interval: bogus``) is refused before it is
  stored: the agent keeps running on the last good one, also after a restart;
- a corrupt stored desired state does not stop the agent: it starts without it and converges
  from the retained topic;
- state files are 0600;
- ``workload.user``: the workload runs as that user (root only).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import DesiredState, Event, ProbeSpec, Reported
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess, settle
from tests.conftest import Pki
from tests.control import signed_desired
from tests.mqtt import Endpoint, MqttClient, Received, connected, wait_until

pytestmark = pytest.mark.timeout(120)
NODE = "gw-a"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def topic(channel: Channel) -> str:
    return node_topic(NODE, channel)


@pytest.fixture
def agent(embedded: Endpoint, pki: Pki, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(NODE, embedded, pki.device(NODE), tmp_path / "agent")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def operator(embedded: Endpoint, pki: Pki) -> Iterator[MqttClient]:
    with connected(embedded, pki.operator("alice")) as client:
        client.subscribe(f"fleet/v1/nodes/{NODE}/#")
        yield client


def publish_desired(endpoint: Endpoint, pki: Pki, desired: DesiredState) -> None:
    with connected(endpoint, pki.controller()) as controller:
        controller.publish(topic(Channel.DESIRED), encode(signed_desired(pki.paths, NODE, desired)), retain=True)


def wait_reported(operator: MqttClient, generation: int, timeout: float = 30) -> Reported:
    def matches(message: Received) -> bool:
        return (
            message.topic == topic(Channel.REPORTED)
            and decode(message.topic, message.payload, Reported).generation == generation
        )

    message = operator.expect(matches, timeout)
    return decode(message.topic, message.payload, Reported)


def wait_event(operator: MqttClient, kind: str, timeout: float = 30) -> Event:
    def matches(message: Received) -> bool:
        return message.topic == topic(Channel.EVENTS) and decode(message.topic, message.payload, Event).kind == kind

    message = operator.expect(matches, timeout)
    return decode(message.topic, message.payload, Event)


def reported_generations(operator: MqttClient) -> set[int]:
    return {
        decode(m.topic, m.payload, Reported).generation for m in operator.drain() if m.topic == topic(Channel.REPORTED)
    }


def config_json(agent: AgentProcess) -> dict[str, object]:
    return json.loads((agent.state_dir / "config.json").read_text())  # type: ignore[no-any-return]


def alive(agent: AgentProcess) -> bool:
    return agent.process is not None and agent.process.poll() is None


def test_an_exec_probe_in_a_desired_state_never_runs(
    agent: AgentProcess, operator: MqttClient, embedded: Endpoint, pki: Pki, tmp_path: Path
) -> None:
    agent.write_config(workload={"command": SLEEPER})
    agent.start()
    publish_desired(embedded, pki, DesiredState(generation=1, config={"mode": "a"}))
    wait_reported(operator, 1)
    marker = tmp_path / "pwned"
    probe = ProbeSpec(kind="exec", target=f"touch {marker}", period=0.2, failure_threshold=1)
    publish_desired(embedded, pki, DesiredState(generation=2, config={"mode": "b"}, health=probe))
    event = wait_event(operator, "desired_rejected")
    assert "exec" in (event.detail or "")
    settle(2.0)
    assert not marker.exists()
    assert 2 not in reported_generations(operator)
    assert config_json(agent) == {"mode": "a"}
    assert alive(agent)


def test_a_desired_state_the_agent_cannot_apply_is_refused_and_the_last_good_one_stays(
    agent: AgentProcess, operator: MqttClient, embedded: Endpoint, pki: Pki
) -> None:
    agent.start()
    publish_desired(embedded, pki, DesiredState(generation=1, config={"heartbeat_interval": "2s"}))
    wait_reported(operator, 1)
    publish_desired(embedded, pki, DesiredState(generation=2, config={"heartbeat_interval": "bogus"}))
    event = wait_event(operator, "desired_rejected")
    assert "heartbeat_interval" in (event.detail or "")
    settle(1.0)
    assert alive(agent)
    assert 2 not in reported_generations(operator)
    assert config_json(agent) == {"heartbeat_interval": "2s"}
    # The refused document was never stored: a restart runs on generation 1 (the retained 2 is
    # refused again).
    assert agent.stop() == 0
    agent.start()
    assert wait_reported(operator, 1).generation == 1
    wait_event(operator, "desired_rejected")
    assert alive(agent)
    assert config_json(agent) == {"heartbeat_interval": "2s"}


@pytest.mark.parametrize(
    "stored",
    [
        b"\xff\x00 not msgpack, not json",
        # A document stored by an agent that did not check it yet: valid in form, unusable.
        json.dumps({"generation": 9, "config": {"heartbeat_interval": "bogus"}}).encode(),
    ],
    ids=["garbage", "unusable"],
)
def test_a_corrupt_stored_desired_state_does_not_stop_the_agent(
    agent: AgentProcess, operator: MqttClient, embedded: Endpoint, pki: Pki, stored: bytes
) -> None:
    agent.start()
    publish_desired(embedded, pki, DesiredState(generation=3, config={"mode": "eco"}))
    wait_reported(operator, 3)
    assert agent.stop() == 0
    with sqlite3.connect(agent.state_dir / "agent.db") as db:
        assert db.execute("UPDATE kv SET value = ? WHERE key = 'desired'", (stored,)).rowcount == 1
    db.close()
    agent.start()
    assert wait_reported(operator, 3).generation == 3  # converged again from the retained topic
    assert alive(agent)
    assert config_json(agent) == {"mode": "eco"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_only_for_the_agent(
    agent: AgentProcess, operator: MqttClient, embedded: Endpoint, pki: Pki
) -> None:
    old_umask = os.umask(0o022)  # what a shell gives: the agent must not depend on systemd's UMask
    try:
        agent.write_config(
            workload={"command": [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(3600)"]}
        )
        agent.start()
    finally:
        os.umask(old_umask)
    publish_desired(embedded, pki, DesiredState(generation=1, config={"token": "s3cret"}))
    wait_reported(operator, 1)
    state = agent.state_dir
    wait_until((state / "workload.log").exists, 10, "workload.log")
    files = [state / "agent.db", state / "config.json", state / "workload.log"]
    files += [path for path in (state / "agent.db-wal", state / "agent.db-shm") if path.exists()]
    assert {path.name: oct(mode(path)) for path in files} == {path.name: oct(0o600) for path in files}
    assert mode(state) & 0o077 == 0, "the state directory is the agent's alone without workload.user"


# ---- workload.user ---------------------------------------------------------------------------


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory other users can reach (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="fleet-user-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_the_workload_runs_as_its_own_user(
    operator: MqttClient, embedded: Endpoint, pki: Pki, open_workdir: Path
) -> None:
    user = pwd.getpwnam("nobody")
    agent = AgentProcess(NODE, embedded, pki.device(NODE), open_workdir / "agent")
    # /bin/sh, not this Python: a venv under /root is out of reach of the workload user.
    script = 'while true; do echo "ids $(id -u) $(id -g) [$(id -G)]"; cat "$FLEET_CONFIG"; echo; sleep 0.5; done'
    agent.write_config(workload={"command": ["/bin/sh", "-c", script], "user": "nobody"})
    try:
        agent.start()
        publish_desired(embedded, pki, DesiredState(generation=1, config={"greeting": "hello"}))
        wait_reported(operator, 1)
        log = agent.state_dir / "workload.log"
        wait_until(
            lambda: log.exists() and '"greeting": "hello"' in log.read_text(), 20, "the workload read its config"
        )
        ids = {line for line in log.read_text().splitlines() if line.startswith("ids ")}
        assert ids == {f"ids {user.pw_uid} {user.pw_gid} [{user.pw_gid}]"}, ids
        config = agent.state_dir / "config.json"
        assert mode(config) == 0o600 and config.stat().st_uid == user.pw_uid
        assert mode(agent.state_dir / "agent.db") == 0o600 and (agent.state_dir / "agent.db").stat().st_uid == 0
    finally:
        agent.stop()

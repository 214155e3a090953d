"""Parity: a real ``fleet-agent`` and a ``fleet sim`` device answer the same script the same way.

Both take their protocol decisions from ``agent.core``; this runs one script of desired states and
commands against each, over the same broker, and compares what they publish: every ack (status
and detail, in order) and the reported (generation, version, state) sequence. Covered: desired
generations up, a replay and stale ones (ignored), a duplicate command id, an expired command, an
unknown action, unexpected arguments, an invalid command, rollbacks whose from/to do not match
(noop / failed), a rollback with nothing to go back to, ``report`` and ``reload``. Everything is
signed as the controller signs it (the agent requires that; the simulator verifies nothing but
judges expiry on the controller's clock from ``issued_at`` like the agent).
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs import load_control_key
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import Ack, DesiredState, Reported
from fleet.protocol.signing import sign_document
from fleet.protocol.topics import Channel, node_topic
from fleet.tools.sim import SimSettings, Simulator
from tests.agentproc import AgentProcess
from tests.conftest import Pki
from tests.control import signed_desired
from tests.mqtt import Endpoint, MqttClient, Received, connected, wait_until

pytestmark = pytest.mark.timeout(120)

AGENT_NODE = "gw-a"
SIM_PREFIX = "parity-"
TERMINAL = {"done", "failed", "rejected", "expired", "duplicate"}


@dataclass(frozen=True)
class Desired:
    generation: int
    applied: bool  # expected: a newer generation applies; a replay or a stale one is ignored


@dataclass(frozen=True)
class Cmd:
    payload: dict[str, Any]


def command(command_id: str, action: Any, **fields: Any) -> Cmd:
    return Cmd({"id": command_id, "action": action, **fields})


SCRIPT: list[Desired | Cmd] = [
    Desired(5, applied=True),
    Desired(7, applied=True),
    Desired(6, applied=False),  # stale
    Desired(7, applied=False),  # replay
    command("p1", "ping"),
    command("p1", "ping"),  # duplicate
    command("e1", "ping", expires_at=1000.0),
    command("u1", "launch-missiles"),
    command("a1", "ping", args={"x": 1}),
    command("t1", 42),  # invalid: answered rejected with the validation error
    command("r1", "rollback", args={"from": "9.9.9", "to": "8.8.8", "rollout": "ro-1"}),  # not on `from`
    command("r2", "rollback", args={"to": "8.8.8"}),  # `to` is not installed
    command("r3", "rollback"),  # no release to go back from
    command("rp", "report"),
    command("rl", "reload"),
    Desired(3, applied=False),  # stale again, after the commands
    Desired(9, applied=True),
    command("p1", "report"),  # a duplicate id with another action
    command("end", "ping"),
]


@dataclass(frozen=True)
class Transcript:
    acks: list[tuple[str, str, str | None]]  # (id, status, detail) in arrival order
    reported: list[tuple[int, str | None, str]]  # (generation, version, state), repeats folded


def signed_payload(pki: Pki, node: str, payload: dict[str, Any]) -> bytes:
    """The script's command for ``node``, signed as the controller signs (the agent requires it; the
    simulator checks no signature). Signed raw, so even the invalid one reaches validation."""
    now = time.time()
    raw = payload | {"node": node, "kind": "cmd", "issued_at": now, "expires_at": payload.get("expires_at", now + 600)}
    return json.dumps(sign_document(raw, load_control_key(pki.paths))).encode()


def run_script(node: str, operator: MqttClient, controller: MqttClient, pki: Pki) -> Transcript:
    ack_topic, reported_topic = node_topic(node, Channel.ACK), node_topic(node, Channel.REPORTED)

    def reported_generation(message: Received, generation: int) -> bool:
        return message.topic == reported_topic and decode(message.topic, message.payload, Reported).generation == (
            generation
        )

    def final_ack(message: Received, command_id: str) -> bool:
        if message.topic != ack_topic:
            return False
        ack = decode(message.topic, message.payload, Ack)
        return ack.id == command_id and ack.status.value in TERMINAL

    # The first report comes after the subscriptions: from here on nothing published is missed.
    operator.expect(lambda m: m.topic == reported_topic, timeout=30)
    for step in SCRIPT:
        if isinstance(step, Desired):
            desired = DesiredState(generation=step.generation, config={"step": step.generation})
            signed = signed_desired(pki.paths, node, desired)
            controller.publish(node_topic(node, Channel.DESIRED), encode(signed), retain=True)
            if step.applied:
                operator.expect(functools.partial(reported_generation, generation=step.generation))
        else:
            operator.publish(node_topic(node, Channel.CMD), signed_payload(pki, node, step.payload))
            operator.expect(functools.partial(final_ack, command_id=step.payload["id"]))
    acks: list[tuple[str, str, str | None]] = []
    reported: list[tuple[int, str | None, str]] = []
    for message in operator.drain():
        if message.topic == ack_topic:
            ack = decode(message.topic, message.payload, Ack)
            acks.append((ack.id, ack.status.value, ack.detail))
        elif message.topic == reported_topic:
            report = decode(message.topic, message.payload, Reported)
            entry = (report.generation, report.version, report.state.value)
            if not reported or reported[-1] != entry:
                reported.append(entry)
    return Transcript(acks, reported)


@contextmanager
def observers(broker: Endpoint, pki: Pki, node: str) -> Iterator[tuple[MqttClient, MqttClient]]:
    with connected(broker, pki.operator("alice")) as operator, connected(broker, pki.controller()) as controller:
        operator.subscribe(node_topic(node, Channel.ACK))
        operator.subscribe(node_topic(node, Channel.REPORTED))
        yield operator, controller


def agent_transcript(broker: Endpoint, pki: Pki, workdir: Path) -> Transcript:
    agent = AgentProcess(AGENT_NODE, broker, pki.device(AGENT_NODE), workdir)
    with observers(broker, pki, AGENT_NODE) as (operator, controller):
        agent.start()
        try:
            return run_script(AGENT_NODE, operator, controller, pki)
        finally:
            agent.stop()


def sim_transcript(broker: Endpoint, pki: Pki) -> Transcript:
    settings = SimSettings(
        agents=1,
        host=broker.host,
        port=broker.port,
        certs=pki.paths.root,
        prefix=SIM_PREFIX,
        duration=300,
        heartbeat=300,
        initial_version=None,  # like the agent: no release installed, running its configured workload
    )
    node = settings.node_id(0)
    simulator = Simulator(settings)
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(simulator.run())
        except BaseException as exc:
            failure.append(exc)

    with observers(broker, pki, node) as (operator, controller):
        thread = threading.Thread(target=main, name="parity-sim", daemon=True)
        thread.start()
        try:
            return run_script(node, operator, controller, pki)
        finally:
            wait_until(lambda: simulator._loop is not None or not thread.is_alive(), 30, "simulator started")
            simulator.request_stop()
            thread.join(30)
            assert not thread.is_alive(), "simulator did not stop"
            if failure:
                raise failure[0]


EXPECTED_ACKS = [
    ("p1", "accepted", None),
    ("p1", "done", "pong"),
    ("p1", "duplicate", "already seen: done"),
    ("e1", "expired", "expired at 1000"),
    ("u1", "rejected", "unknown action 'launch-missiles'; known: ping, reload, report, restart, rollback"),
    ("a1", "rejected", "ping does not take x"),
    ("r1", "accepted", None),
    ("r1", "done", "not running 9.9.9 (running the configured workload): nothing to roll back"),
    ("r2", "accepted", None),
    ("r2", "failed", "release 8.8.8 is not installed"),
    ("r3", "accepted", None),
    ("r3", "failed", "no previous release"),
    ("rp", "accepted", None),
    ("rp", "done", "reported"),
    ("rl", "accepted", None),
    ("rl", "done", "configuration reloaded"),
    ("p1", "duplicate", "already seen: done"),
    ("end", "accepted", None),
    ("end", "done", "pong"),
]


def test_agent_and_simulated_device_answer_the_same(broker: Endpoint, pki: Pki, tmp_path: Path) -> None:
    agent = agent_transcript(broker, pki, tmp_path / "agent")
    sim = sim_transcript(broker, pki)
    assert sim.acks == agent.acks
    assert sim.reported == agent.reported
    # And what both said is what the protocol says (the invalid command's reason is the codec's).
    (invalid,) = [ack for ack in agent.acks if ack[0] == "t1"]
    assert invalid[1] == "rejected" and invalid[2]
    assert [ack for ack in agent.acks if ack[0] != "t1"] == EXPECTED_ACKS
    assert [generation for generation, _version, _state in agent.reported] == [0, 5, 7, 9]
    assert {(version, state) for _generation, version, state in agent.reported} == {(None, "idle")}

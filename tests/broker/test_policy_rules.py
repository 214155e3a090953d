"""The policy as data, and its renderings; no broker needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.embedded import BrokerSettings, Listener, will_refusal
from broker.policy import filter_covers, may_publish, may_receive, may_subscribe
from broker.render import default_options, emqx_acl, emqx_conf, mosquitto_acl
from certs import Identity, Role
from tests.conftest import Pki

DEVICE = Identity("gw-a", Role.DEVICE, 1)
OPERATOR = Identity("alice", Role.OPERATOR, 2)
CONTROLLER = Identity("fleet-controller", Role.CONTROLLER, 3)


@pytest.mark.parametrize(
    ("granted", "requested", "covered"),
    [
        ("fleet/v1/#", "fleet/v1/nodes/+/cmd", True),
        ("fleet/v1/#", "fleet/v1/#", True),
        ("fleet/v1/#", "#", False),
        ("fleet/v1/nodes/+/cmd", "fleet/v1/nodes/gw-a/cmd", True),
        ("fleet/v1/nodes/+/cmd", "fleet/v1/nodes/#", False),
        ("fleet/v1/nodes/gw-a/cmd", "fleet/v1/nodes/+/cmd", False),
        ("fleet/v1/nodes/gw-a/cmd", "fleet/v1/nodes/gw-a/cmd", True),
        ("fleet/v1/nodes/gw-a/cmd", "fleet/v1/nodes/gw-a/cmd/x", False),
    ],
)
def test_filter_covers(granted: str, requested: str, covered: bool) -> None:
    assert filter_covers(granted, requested) is covered


def test_device_rules() -> None:
    assert may_publish(DEVICE, "fleet/v1/nodes/gw-a/reported")
    assert may_publish(DEVICE, "fleet/v1/nodes/gw-a/artifact/req")
    assert not may_publish(DEVICE, "fleet/v1/nodes/gw-a/desired")
    assert not may_publish(DEVICE, "fleet/v1/nodes/gw-b/reported")
    assert may_subscribe(DEVICE, "fleet/v1/nodes/gw-a/artifact/chunk")
    assert not may_subscribe(DEVICE, "fleet/v1/nodes/gw-a/#")
    assert not may_receive(DEVICE, "fleet/v1/nodes/gw-b/desired")


def test_operator_and_controller_rules() -> None:
    assert may_publish(OPERATOR, "fleet/v1/nodes/gw-a/cmd")
    assert not may_publish(OPERATOR, "fleet/v1/nodes/gw-a/desired")
    assert may_subscribe(OPERATOR, "fleet/v1/#")
    assert may_publish(CONTROLLER, "fleet/v1/nodes/gw-a/desired")
    assert not may_publish(CONTROLLER, "other/topic")


@pytest.mark.parametrize(
    ("identity", "topic", "qos", "allowed"),
    [
        (DEVICE, "fleet/v1/nodes/gw-a/status", 1, True),
        (DEVICE, "fleet/v1/nodes/gw-a/reported", 0, True),
        (DEVICE, "fleet/v1/nodes/gw-b/status", 1, False),
        (DEVICE, "fleet/v1/nodes/gw-b/desired", 1, False),
        (DEVICE, "fleet/v1/nodes/gw-a/desired", 1, False),
        (DEVICE, "fleet/v1/nodes/gw-a/cmd", 1, False),
        (DEVICE, "fleet/v1/nodes/gw-a/status", 3, False),  # malformed QoS
        (OPERATOR, "fleet/v1/nodes/gw-a/cmd", 1, True),
        (OPERATOR, "fleet/v1/nodes/gw-a/desired", 1, False),
        (CONTROLLER, "fleet/v1/nodes/gw-a/desired", 1, True),
        (CONTROLLER, "fleet/v1/nodes/+/desired", 1, False),  # a topic name has no wildcards
        (CONTROLLER, "fleet/v1/#", 1, False),
        (CONTROLLER, "$SYS/broker/clients", 1, False),
        (CONTROLLER, "outside/fleet", 1, False),
        (CONTROLLER, "", 1, False),
        (CONTROLLER, None, 1, False),
    ],
)
def test_will_needs_the_right_to_publish_its_topic(
    identity: Identity, topic: str | None, qos: int, allowed: bool
) -> None:
    assert (will_refusal(identity, topic, qos) is None) is allowed


def test_emqx_conf_denies_what_the_acl_does_not_grant(pki: Pki, tmp_path: Path) -> None:
    """EMQX authorizes wills (and publishes) with these settings; no_match=allow would let wills through."""
    settings = BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 8883),))
    conf = emqx_conf(settings, default_options(settings, tmp_path)).splitlines()
    assert "  no_match = deny" in conf
    sources = [line for line in conf if line.strip().startswith("sources = ")]
    assert sources == [f'  sources = [{{ type = file, enable = true, path = "{tmp_path.resolve() / "acl.conf"}" }}]']


def test_mosquitto_acl_names_every_operator_and_controller(pki: Pki) -> None:
    acl = mosquitto_acl(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 8883),)))
    for name in ("fleet-controller", "ctl-2", "operator", "alice"):
        assert f"user {name}\n" in acl
    assert "pattern write fleet/v1/nodes/%u/reported" in acl
    assert "pattern read fleet/v1/nodes/%u/cmd" in acl
    assert "topic write fleet/v1/nodes/+/cmd" in acl


def test_emqx_acl_ends_with_deny(pki: Pki) -> None:
    acl = emqx_acl(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 8883),)))
    assert '{allow, all, publish, ["fleet/v1/nodes/${username}/reported"]}.' in acl
    assert acl.rstrip().endswith("{deny, all}.")


def test_cli_render_mosquitto_writes_a_config_mosquitto_accepts(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet",
            "broker",
            "--certs",
            str(pki.paths.root),
            "--listen",
            "127.0.0.1:18883",
            "--render",
            "mosquitto",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {pki.paths.root.resolve() / 'crl.pem'}",
        "set_tcp_nodelay true",
        "listener 18883 127.0.0.1",
    ):
        assert line in conf.splitlines()
    assert (out / "acl").is_file() and (out / "data").is_dir()


def test_docker_compose_file_is_valid() -> None:
    compose = Path(__file__).resolve().parents[2] / "docker-compose.yml"
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    result = subprocess.run(
        ["docker-compose", "-f", str(compose), "config", "-q"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_container_render_uses_container_paths(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet",
            "broker",
            "--certs",
            str(pki.paths.root),
            "--listen",
            "0.0.0.0:8883",
            "--render",
            "mosquitto",
            str(out),
            "--container",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "cafile /mosquitto/pki/ca.pem" in conf
    assert "acl_file /mosquitto/config/acl" in conf
    assert "user mosquitto" in conf

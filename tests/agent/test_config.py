"""Agent settings: YAML file, FLEET_AGENT_* overrides, one-line errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import env_overrides, load_settings, parse_duration
from fleet.protocol.errors import ConfigError

BASE = """
node_id: gw-0001
server_addr: broker.example.com:8883
tls: {ca: /etc/ca.pem, cert: /etc/cert.pem, key: /etc/key.pem}
state_dir: /var/lib/fleet-agent
heartbeat_interval: 30s
workload: {command: ["./bin/app"], health: {http: "http://127.0.0.1:8080/healthz", initial_delay: 5s, period: 10s}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_seed_style_file_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    assert settings.node_id == "gw-0001"
    assert settings.port == 8883
    assert settings.heartbeat_interval == 30.0
    assert settings.workload is not None and settings.workload.health is not None
    spec = settings.workload.health.spec()
    assert (spec.kind, spec.initial_delay, spec.period) == ("http", 5.0, 10.0)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_AGENT_HEARTBEAT_INTERVAL", "5m")
    monkeypatch.setenv("FLEET_AGENT_TLS__CA", "/other/ca.pem")
    monkeypatch.setenv("FLEET_AGENT_LABELS", "{site: plant-3}")
    settings = load_settings(write(tmp_path, BASE))
    assert settings.heartbeat_interval == 300.0
    assert settings.tls is not None and str(settings.tls.ca) == "/other/ca.pem"
    assert str(settings.tls.cert) == "/etc/cert.pem"
    assert settings.labels == {"site": "plant-3"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BASE.replace("gw-0001", "gw 0001"), "node_id: "),
        (BASE.replace("broker.example.com:8883", "broker"), "server_addr: 'broker' is not HOST:PORT"),
        (BASE.replace("30s", "soon"), "heartbeat_interval: 'soon' is not a duration"),
        (BASE + "surprise: 1\n", "surprise: Extra inputs are not permitted"),
        (BASE.replace("http: ", "tcp: 127.0.0.1:1, http: "), "set exactly one of http, tcp, exec"),
        ("node_id: [unclosed\n", "not valid YAML"),
        ("- a list\n", "the top level must be a mapping"),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_durations() -> None:
    assert [parse_duration(v) for v in ("500ms", "30s", "5m", "1h", 2, "1.5s")] == [0.5, 30, 300, 3600, 2, 1.5]
    with pytest.raises(ValueError, match="duration"):
        parse_duration(True)


def test_env_overrides_ignore_other_variables() -> None:
    assert env_overrides({"PATH": "/bin", "FLEET_AGENT_": "x", "FLEET_AGENT_A__B": "true"}) == {"a": {"b": True}}

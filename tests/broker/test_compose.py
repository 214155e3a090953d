"""docker-compose.yml, statically: no Docker engine here, so `docker-compose config` is the check."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEFAULT_SERVICES = {"mosquitto", "controller", "agent"}
CLUSTER_SERVICES = {"emqx1", "emqx2", "emqx3", "controller-emqx-1", "controller-emqx-2", "agent-emqx"}
# Written by the user before `up` (fleet certs init / fleet broker --render), not part of the repo.
GENERATED = [ROOT / "pki", ROOT / "deploy" / "mosquitto", ROOT / "deploy" / "emqx"]


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )


@functools.cache
def _config(*profile: str) -> dict[str, Any]:
    result = _compose(*profile, "config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.mark.parametrize("profile", [(), ("--profile", "cluster")], ids=["default", "cluster"])
def test_compose_file_is_valid(profile: tuple[str, ...]) -> None:
    result = _compose(*profile, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_services_and_profiles() -> None:
    services = _config("--profile", "cluster")["services"]
    assert set(services) >= DEFAULT_SERVICES | CLUSTER_SERVICES
    for name in DEFAULT_SERVICES:
        assert not services[name].get("profiles"), f"{name} must run without --profile"
    for name in CLUSTER_SERVICES:
        assert services[name].get("profiles") == ["cluster"], name


def test_controller_api_is_published_on_loopback_only() -> None:
    services = _config("--profile", "cluster")["services"]
    for name in ("controller", "controller-emqx-1", "controller-emqx-2"):
        ports = services[name]["ports"]
        assert ports, name
        for port in ports:
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert published.startswith("127.0.0.1:"), f"{name} publishes its unauthenticated API on {port}"


def test_agent_service_is_scalable() -> None:
    agent = _config()["services"]["agent"]
    assert "container_name" not in agent  # --scale needs generated names
    assert not agent.get("ports"), "a fixed host port would clash between replicas"
    assert agent["entrypoint"][-1].endswith("agent-entrypoint.sh")


def test_emqx_nodes_form_a_static_cluster() -> None:
    services = _config("--profile", "cluster")["services"]
    nodes = [services[f"emqx{i}"] for i in (1, 2, 3)]
    names = {node["environment"]["EMQX_NODE_NAME"] for node in nodes}
    assert len(names) == 3
    for node in nodes:
        env = node["environment"]
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        assert all(name in env["EMQX_CLUSTER__STATIC__SEEDS"] for name in names)
        host = env["EMQX_NODE_NAME"].split("@", 1)[1]
        assert "." in host and node["hostname"] == host  # Erlang long names need a dotted host


def test_cluster_controllers_share_ingest_and_one_database() -> None:
    services = _config("--profile", "cluster")["services"]
    pair = [services[f"controller-emqx-{i}"] for i in (1, 2)]
    commands = [service["command"] for service in pair]
    for command in commands:
        assert command[command.index("--share") + 1] == "fleet-ctl"
        assert command[command.index("--db") + 1] == "/data/fleet.db"
    identities = {command[command.index("--identity") + 1] for command in commands}
    brokers = {command[command.index("--broker") + 1] for command in commands}
    assert len(identities) == 2, "two processes with one certificate would kick each other off"
    assert len(brokers) == 2, "each controller on its own EMQX node"
    volumes = [{v.split(":")[0] if isinstance(v, str) else v["source"] for v in s["volumes"]} for s in pair]
    assert "controller-emqx-data" in volumes[0] & volumes[1]


def test_every_mounted_repository_file_exists() -> None:
    services = _config("--profile", "cluster")["services"]
    checked = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if not source.startswith("/"):
                continue  # a named volume
            path = Path(source)
            if any(path == generated or generated in path.parents for generated in GENERATED):
                continue
            assert path.exists(), f"{name} mounts {source}, which is not in the repository"
            checked += 1
    assert checked >= 2  # the agent entrypoint and config at least
    for service in ("controller", "agent"):
        build = services[service]["build"]
        context = Path(build["context"] if isinstance(build, dict) else build)
        assert (context / "Dockerfile").is_file(), service

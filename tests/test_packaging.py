"""The wheel's dependencies: the base install is the agent's; the server libraries come only with
the [server] extra (which [dev] pulls in)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"amqtt", "fastapi", "uvicorn", "typer", "rich", "prometheus-client", "httpx"}
AGENT_NEEDS = {"paho-mqtt", "pydantic", "msgpack", "tenacity", "psutil", "pyyaml", "zstandard", "cryptography"}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def requires_dist(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The Requires-Dist lines of the wheel built from this checkout (no dependencies fetched)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=110,
        capture_output=True,
    )
    (wheel,) = out.glob("fleet_mqtt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def split(requirement: str) -> tuple[str, str]:
    """(normalised project name, marker) of one Requires-Dist line."""
    spec, _, marker = requirement.partition(";")
    match = re.match(r"\s*([A-Za-z0-9._-]+)", spec)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), marker.strip()


def test_base_install_is_what_the_agent_imports(requires_dist: list[str]) -> None:
    base = {name for name, marker in map(split, requires_dist) if not marker}
    assert base == AGENT_NEEDS


def test_server_libraries_come_only_with_the_server_extra(requires_dist: list[str]) -> None:
    markers: dict[str, set[str]] = {}
    for name, marker in map(split, requires_dist):
        markers.setdefault(name, set()).add(marker)
    for name in SERVER_ONLY:
        assert markers.get(name) == {'extra == "server"'}, (name, markers.get(name))
    assert any(r.startswith("amqtt==") for r in requires_dist)  # still pinned


def test_dev_extra_pulls_in_the_server_extra(requires_dist: list[str]) -> None:
    assert 'fleet-mqtt[server]; extra == "dev"' in requires_dist

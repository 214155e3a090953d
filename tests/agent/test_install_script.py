"""deploy/install-agent.sh: the package's sha256 is checked before anything is installed, and the
agent is installed without the [server] extra."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install-agent.sh"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel plus its base dependencies (no extras): what an offline gateway gets shipped."""
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        timeout=170,
    )
    return out


@pytest.fixture(scope="module")
def wheel(wheelhouse: Path) -> Path:
    (built,) = wheelhouse.glob("fleet_mqtt-*.whl")
    return built


def run_install(wheel: Path, digest: str, prefix: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PREFIX": str(prefix),
        "ETC": str(prefix / "etc"),
        "SYSTEMD_DIR": str(prefix / "systemd"),
        "PIP_ARGS": f"--no-index --find-links {wheel.parent}",
    }
    return subprocess.run(
        ["sh", str(SCRIPT), str(wheel), digest, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=170,
        check=False,
    )


def test_wrong_checksum_installs_nothing(wheel: Path, tmp_path: Path) -> None:
    result = run_install(wheel, "0" * 64, tmp_path / "opt")
    assert result.returncode == 1
    assert "does not match" in result.stderr
    assert not (tmp_path / "opt").exists()


def test_malformed_checksum_is_a_usage_error(wheel: Path, tmp_path: Path) -> None:
    result = run_install(wheel, "abc", tmp_path / "opt")
    assert result.returncode == 2
    assert "not a sha256" in result.stderr


def test_verified_package_is_installed_with_its_unit(wheel: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    config = tmp_path / "config.yaml"
    config.write_text("node_id: gw-0001\n")
    prefix = tmp_path / "opt"
    result = run_install(wheel, digest.upper(), prefix, str(config))
    assert result.returncode == 0, result.stderr
    agent = prefix / "venv" / "bin" / "fleet-agent"
    assert agent.is_file()
    assert (prefix / "venv").is_symlink()
    unit = (prefix / "systemd" / "fleet-agent.service").read_text()
    assert "Restart=always" in unit
    assert "WatchdogSec=" in unit
    assert (prefix / "etc" / "config.yaml").read_text() == "node_id: gw-0001\n"


def test_agent_install_has_no_server_libraries(wheelhouse: Path, wheel: Path, tmp_path: Path) -> None:
    # The wheelhouse was built from the base requirements only, and the install is offline: had the
    # script asked for an extra, pip would have failed. Check the result all the same.
    shipped = {path.name.split("-")[0].lower() for path in wheelhouse.glob("*.whl")}
    assert not shipped & {"amqtt", "fastapi", "uvicorn", "starlette", "typer", "rich", "prometheus_client", "httpx"}
    prefix = tmp_path / "opt"
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert run_install(wheel, digest, prefix).returncode == 0
    venv = prefix / "venv"
    subprocess.run([str(venv / "bin" / "fleet-agent"), "--version"], check=True, capture_output=True, timeout=60)
    # The operator CLI is in the same wheel; without the [server] extra it says what to install.
    result = subprocess.run(
        [str(venv / "bin" / "fleet"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr == "fleet: error: the operator CLI needs the server extra: pip install 'fleet-mqtt[server]'\n"

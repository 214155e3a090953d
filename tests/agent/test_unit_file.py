"""The shipped systemd unit is hardened: systemd's own exposure score stays at 4.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "fleet-agent.service"


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_unit_sets_the_hardening_the_issue_names() -> None:
    settings = _settings()
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ReadWritePaths"] == ["/var/lib/fleet-agent"]
    assert settings["PrivateTmp"] == ["yes"]
    assert settings["ProtectHome"] == ["yes"]
    assert settings["UMask"] == ["0077"]
    capabilities = set(settings["CapabilityBoundingSet"][0].split())
    assert "CAP_SYS_ADMIN" not in capabilities
    assert capabilities <= {"CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_exposure_score_is_at_most_4() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()[:200]}")
    assert match is not None, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= 4.0, result.stdout

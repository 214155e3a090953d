""".ci/sysdeps.sh: one list of system packages; without root (or apt-get) it names what is missing
in one line and carries on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "sysdeps.sh"


def run_with_path(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(SCRIPT)], capture_output=True, text=True, env={"PATH": str(path)}, timeout=60, check=False
    )


def test_missing_packages_are_named_in_one_line(tmp_path: Path) -> None:
    # Only `id` on PATH: everything is missing, and there is no apt-get to run even as root.
    id_command = shutil.which("id")
    assert id_command
    (tmp_path / "id").symlink_to(id_command)
    result = run_with_path(tmp_path)
    assert result.returncode == 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    packages = "mosquitto mosquitto-clients docker-compose make openssl iproute2 nftables python3-venv faketime"
    assert (
        line == f"sysdeps: missing {packages}; install with: sudo apt-get install -y --no-install-recommends {packages}"
    )


def test_nothing_missing_says_nothing(tmp_path: Path) -> None:
    id_command = shutil.which("id")
    assert id_command
    (tmp_path / "id").symlink_to(id_command)
    # Stand-ins that exist (and, for python3, succeed at `import ensurepip`).
    for name in ("mosquitto", "mosquitto_pub", "docker-compose", "make", "openssl", "ip", "nft", "python3", "faketime"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    result = run_with_path(tmp_path)
    assert result.returncode == 0
    assert result.stderr == ""


def test_ci_and_make_use_the_one_list() -> None:
    assert ".ci/sysdeps.sh" in (ROOT / ".ci" / "run").read_text()
    assert ".ci/sysdeps.sh" in (ROOT / "Makefile").read_text()
    assert "apt-get" not in (ROOT / ".ci" / "run").read_text()

"""`fleet demo` end to end: a real run with 3 agents, and a Ctrl-C in the middle of it.

The command is run through its own one-command app (``fleet.cli.demo_cmd.main``), so these tests
do not depend on it being mounted in the top-level ``fleet`` app.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.mqtt import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
DEMO = [sys.executable, "-c", "from fleet.cli.demo_cmd import main; main()"]


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLEET_")}
    return env | {"TMPDIR": str(tmp_path), "COLUMNS": "160"}


def leftovers(workdir: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(workdir) in cmdline or (process.info["cwd"] or "").startswith(str(workdir)):
            found.append(f"{process.pid}: {cmdline}")
    return found


def assert_no_leftovers(workdir: Path) -> None:
    wait_until(lambda: not leftovers(workdir), 5, "no process of the demo left")


def test_demo_rolls_out_twice_aborts_the_bad_release_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DEMO, "--agents", "3"], capture_output=True, text=True, env=demo_env(tmp_path), timeout=200, check=False
    )
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    found = re.search(r"work dir (\S+)", out)
    assert found is not None, out
    workdir = Path(found.group(1))
    assert workdir.is_relative_to(tmp_path.resolve())

    # The summary table: release, state, then per wave: wave, nodes, succeeded, failed, unreachable, rolled back.
    for version in ("1.0.0", "1.1.0"):
        assert re.search(rf"^{re.escape(version)}\s+succeeded\s+1/3\s+1\s+1\s+0\s+0\s+0\s", out, re.M), out
    assert re.search(r"^1\.2\.0\s+aborted\s+1/3\s+1\s+0\s+1\s+0\s+\d\s", out, re.M), out
    assert len(re.findall(r"^\s+[23]/3\s+1\s+0\s+0\s+0\s+0\s+-\s*$", out, re.M)) == 2, out  # waves 2, 3 untouched
    assert "never received 1.2.0" in out
    # The authenticated way: HTTPS, the operator certificate, then an operator token the audit trail names.
    assert re.search(r"controller API on https://127\.0\.0\.1:\d+ ", out), out
    assert "API token demo-rollouts (role operator) created" in out
    starters = re.findall(r"^app@1\.[012]\.0: started by demo-rollouts \(token, request [0-9a-f]{8}\)$", out, re.M)
    assert len(starters) == 3, out
    assert "failed in wave 1 " in out  # numbered as the table numbers it
    assert "demo succeeded" in out
    assert "FAILED" not in out
    assert "killed leftover processes" not in out  # the orderly stop got everything
    assert not workdir.exists(), "the temp work dir is removed without --keep"
    assert_no_leftovers(workdir)


def test_ctrl_c_during_the_first_rollout_stops_every_process(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    with output.open("w") as out:
        process = subprocess.Popen(
            [*DEMO, "--agents", "3", "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=demo_env(tmp_path),
        )
    try:
        wait_until(lambda: "wave 1/3 started" in output.read_text(), 90, "the first rollout started")
        assert leftovers(workdir), "the demo's processes should be running now"
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = output.read_text()
    assert code != 0, text
    assert "interrupted" in text
    assert "demo succeeded" not in text
    assert_no_leftovers(workdir)

"""Smoke test: bench/run_all.py runs one quick benchmark and writes results.json and report.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import REPO, lookup


@pytest.mark.timeout(75)
def test_run_all_writes_results_and_report(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto mosquitto-clients; .ci/run does)")
    out = tmp_path / "results"
    command = [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--no-timeline", "--only", "agent_idle",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=70, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "agent_idle"}
    assert lookup(results, "meta.failed") == {}
    assert isinstance(lookup(results, "meta.cpu_count"), int)
    assert isinstance(lookup(results, "agent_idle.idle_memory.idle_rss_mib"), float)

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| agent idle RSS |")]
    assert len(rows) == 1, report
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1].endswith(" MiB") and cells[1] != "n/a MiB", rows[0]
    assert cells[3].startswith("<= ") and cells[4] in ("met", "**not met**"), rows[0]

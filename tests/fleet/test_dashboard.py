"""deploy/grafana/fleet-dashboard.json uses only metrics the controller exports (by name and type)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleet.controller.metrics import ControllerMetrics
from tests.fleet.apisupport import MemoryController

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fleet-dashboard.json"
_METRIC = re.compile(r"\b((?:fleet|process|python)_[a-z0-9_]+)\b")


def exported() -> dict[str, str]:
    """Sample names the controller exports -> their family's type."""
    metrics = ControllerMetrics("1.0.0", MemoryController().stats)
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        names[family.name] = family.type
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ())
        for suffix in suffixes:
            names[family.name + suffix] = family.type
    return names


def test_every_metric_in_the_dashboard_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in _METRIC.findall(expr)}
    known = exported()
    assert used, "no metric found in the dashboard"
    assert sorted(used - set(known)) == []
    for expr in expressions:  # counters are read through rate()/increase(), never raw
        for name in _METRIC.findall(expr):
            if known[name] == "counter":
                assert re.search(rf"(rate|increase)\({name}", expr), expr
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])

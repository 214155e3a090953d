"""Smoke test: bench/agent_idle.py runs end to end and reports every number (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.bench import assert_numbers, lookup, run_bench

# Every measurement the bench must report as a number; targets are deliberately not asserted.
NUMERIC_KEYS = (
    "heartbeat_cost.mean_us",
    "heartbeat_cost.encode_only_mean_us",
    "heartbeat_cost.encoded_bytes",
    "heartbeat_cost.mqtt_publish_bytes",
    "heartbeat_cost.cpu_percent_at_interval",
    "import_breakdown.rss_mib.bare_interpreter",
    "import_breakdown.rss_mib.paho_mqtt",
    "import_breakdown.rss_mib.plus_pydantic_fleet_protocol",
    "import_breakdown.rss_mib.plus_sqlite3",
    "import_breakdown.rss_mib.plus_agent_daemon_whole_agent",
    "import_breakdown.rss_mib.plus_cryptography_ed25519",
    "idle_memory.rss_after_connect_mib",
    "idle_memory.idle_rss_mib",
    "idle_memory.target_mib",
    "idle_memory.idle_uss_mib",
    "idle_memory.peak_uss_mib",
    "idle_memory.peak_rss_mib",
    "idle_memory.first_heartbeat_after_start_s",
    "idle_cpu.window_s",
    "idle_cpu.cpu_seconds",
    "idle_cpu.cpu_percent_of_one_core",
    "idle_cpu.target_percent",
    "wire.bytes_up",
    "wire.bytes_down",
    "wire.bytes_total",
    "wire.bytes_per_hour",
    "wire.heartbeats_in_window",
    "wire.health_messages_in_window",
    "wire.connect_bytes",
    "reconnect.reconnect_to_applied.median_ms",
    "reconnect.reconnect_to_applied.max_ms",
    "reconnect.tcp_connect_to_reported.median_ms",
    "reconnect.tcp_connect_to_reported.max_ms",
    "reconnect.target_ms",
    "reconnect.backoff_s.initial",
    "reconnect.backoff_s.maximum",
)


@pytest.mark.timeout(60)
def test_agent_idle_bench_reports_every_number() -> None:
    # A 1 s heartbeat so the short window still sees heartbeats; one reconnect round keeps it under 20 s.
    quick = ["--duration", "3", "--heartbeat-interval", "1", "--settle", "0.5", "--rounds", "1", "--outage", "1.2"]
    document = run_bench("agent_idle.py", *quick, timeout=45)
    assert_numbers(document, NUMERIC_KEYS)
    assert lookup(document, "wire.heartbeats_in_window") > 0
    assert len(lookup(document, "reconnect.reconnect_to_applied.samples_ms")) == 1

"""Smoke test: bench/sim_scale.py --quick runs end to end and reports every number (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.bench import assert_numbers, lookup, run_bench

BROKER_KEYS = (
    "first_messages_from_every_device_s",
    "connect_all_s",
    "connects_per_s",
    "delivered_per_s",
    "nominal_offered_per_s",
    "broker_cpu_percent_of_one_core",
    "broker_rss_mib",
)
NUMERIC_KEYS = (
    *(f"broker_comparison.{broker}.{key}" for broker in ("mosquitto", "amqtt") for key in BROKER_KEYS),
    "fleet.devices",
    "fleet.cert_issue_s",
    "fleet.controller_sees_all_online_s",
    "fleet.rollout_to_finished_s",
    "fleet.artifact_bytes_sent",
    *(f"fleet.rss_mib_connected.{name}" for name in ("mosquitto", "controller", "sim")),
    "fleet.sim.connect_time_s.all_connected_after",
    "rollback.first_failure_to_aborting_ms",
    "rollback.failure_report_to_rollback_command_ms.median",
    "rollback.failure_report_to_back_on_good_version_ms.median",
    "rollback.first_failure_to_aborted_ms",
    "rollback.baseline_mqtt_round_trip_ms",
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sim_scale_bench_reports_every_number() -> None:
    document = run_bench("sim_scale.py", "--quick", timeout=170)
    assert_numbers(document, NUMERIC_KEYS)
    fleet = document["fleet"]
    # Correctness, not speed: every simulated device took the release, none failed.
    assert fleet["rollout_state"] == "succeeded"
    assert fleet["rollout_outcomes"] == {"succeeded": fleet["devices"]}
    assert lookup(document, "fleet.sim.downloads_completed") == fleet["devices"]
    assert lookup(document, "fleet.sim.downloads_failed") == 0
    rollback = document["rollback"]
    assert rollback["failed_devices"] >= 1  # the bad release reached at least its first wave
    for broker in ("mosquitto", "amqtt"):
        assert lookup(document, f"broker_comparison.{broker}.sim_errors") == 0

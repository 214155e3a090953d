"""Smoke test: bench/controller_scale.py --quick runs end to end and reports every number (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.bench import assert_numbers, lookup, run_bench

INGEST_KEYS = (
    "offered_rate_per_s",
    "window_s",
    "warmup_excluded_s",
    "published_per_s",
    "controller_ingested_per_s",
    "controller_per_second_min",
    "controller_per_second_median",
    "ratio_controller_to_published",
    "published_total",
    "controller_ingested_total",
    "controller_delivered_fraction",
    "drain_after_publishers_s",
    "controller_drain_per_s",
    "cpu_percent_of_one_core.controller",
    "cpu_percent_of_one_core.mosquitto",
    "cpu_percent_of_one_core.publishers",
    "machine_cpu_busy_percent",
    "target_per_s",
)
RAW_KEYS = (
    "raw_received_per_s",
    "ratio_controller_to_raw",
    "raw_received_total",
    "raw_delivered_fraction",
    "cpu_percent_of_one_core.raw_subscriber",
)

# Every measurement the bench must report as a number; targets are deliberately not asserted.
NUMERIC_KEYS = (
    *(f"ingest_with_raw_baseline.{key}" for key in (*INGEST_KEYS, *RAW_KEYS)),
    *(f"ingest_controller_alone.{key}" for key in INGEST_KEYS),
    *(f"ingest_paced_at_target.{key}" for key in INGEST_KEYS),
    "fleet_requirement_per_s",
    "controller_metrics.fleet_heartbeats_received_total",
    "controller_metrics.fleet_invalid_messages_total",
    "controller_metrics.fleet_controller_tick_errors_total",
    "desired_fanout.nodes",
    "desired_fanout.document_bytes",
    "desired_fanout.persist_and_publish_s",
    "desired_fanout.persist_and_publish_per_s",
    "desired_fanout.all_received_s",
    "desired_fanout.received_nodes",
    "desired_fanout.received_messages",
    "desired_fanout.target_s",
    "controller_rss.idle_mib",
    "controller_rss.nodes_known",
    "controller_rss.with_nodes_mib",
    "controller_rss.kib_per_node",
    "controller_rss.after_fanout_mib",
    "registry_flush.dirty_nodes",
    "registry_flush.first_flush_inserts_s",
    "registry_flush.flush_updates_s",
    "registry_flush.on_message_per_s",
    "bench_wall_s",
)
BOOLEAN_KEYS = (
    "ingest_with_raw_baseline.kept_up_target",
    "ingest_with_raw_baseline.kept_up_with_published",
    "ingest_with_raw_baseline.kept_up_with_raw",
    "ingest_controller_alone.kept_up_target",
    "ingest_controller_alone.kept_up_with_published",
    "ingest_paced_at_target.kept_up_target",
    "ingest_paced_at_target.kept_up_with_published",
    "desired_fanout.within_target_scaled_to_10000",
)


@pytest.mark.timeout(90)
def test_controller_scale_bench_reports_every_number() -> None:
    document = run_bench("controller_scale.py", "--quick", timeout=80)
    assert_numbers(document, NUMERIC_KEYS)
    for key in BOOLEAN_KEYS:
        assert isinstance(lookup(document, key), bool), f"{key} is not a boolean"
    # Plumbing, not performance: every node became known and every desired state arrived.
    assert lookup(document, "controller_rss.nodes_known") == lookup(document, "params.nodes")
    assert lookup(document, "desired_fanout.received_nodes") == lookup(document, "params.nodes")

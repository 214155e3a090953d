"""Smoke test: bench/update_transfer.py --quick runs end to end and reports every number (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.bench import assert_numbers, lookup, run_bench

# Every measurement the bench must report as a number; targets are deliberately not asserted.
NUMERIC_KEYS = (
    "artifact.v1_artifact_bytes",
    "artifact.chunks",
    "goodput_loopback.artifact_bytes",
    "goodput_loopback.agent.publish_to_healthy_s",
    "goodput_loopback.agent.goodput_publish_to_healthy_mb_per_s",
    "goodput_loopback.agent.first_request_to_last_chunk_s",
    "goodput_loopback.agent.goodput_transfer_mb_per_s",
    "goodput_loopback.agent.chunks_sent",
    "goodput_loopback.raw_paho_baseline.sliding_window.mb_per_s",
    "goodput_loopback.raw_paho_baseline.stop_and_wait_windows.mb_per_s",
    "goodput_loopback.ratio_agent_to_raw_sliding",
    "goodput_loopback.ratio_agent_to_raw_stop_and_wait",
    "rate_limited.publish_to_healthy_s",
    "rate_limited.bandwidth_bytes_per_s",
    "rate_limited.goodput_kib_per_s",
    "rate_limited.goodput_fraction_of_link",
    "resent_after_cuts.cut_every_512_kib.cuts",
    "resent_after_cuts.cut_every_512_kib.chunks_sent",
    "resent_after_cuts.cut_every_512_kib.artifact_chunks",
    "resent_after_cuts.cut_every_768_kib.cuts",
    "resent_after_cuts.cut_every_768_kib.chunks_sent",
    "resent_after_cuts.cut_every_768_kib.link_bytes_down",
    "delta_update.bytes_sent",
    "delta_update.full_artifact_bytes",
    "delta_update.sent_pct_of_full",
    "delta_update.publish_to_healthy_s",
    "agent_peak_rss.artifact_mib",
    "agent_peak_rss.idle_rss_mib",
    "agent_peak_rss.peak_rss_mib",
    "agent_peak_rss.peak_minus_idle_mib",
    "agent_peak_rss.target_peak_minus_idle_mib",
)


@pytest.mark.timeout(120)
def test_update_transfer_bench_reports_every_number() -> None:
    document = run_bench("update_transfer.py", "--quick", timeout=115)
    assert_numbers(document, NUMERIC_KEYS)
    for run in ("cut_every_512_kib", "cut_every_768_kib"):
        assert isinstance(lookup(document, f"resent_after_cuts.{run}.completed"), bool)
    assert isinstance(lookup(document, "agent_peak_rss.within_target"), bool)

"""Everything the controller exports to Prometheus, built with prometheus_client collectors.

One ``ControllerMetrics`` per controller holds its own ``CollectorRegistry`` (never the global one,
so several controllers in one process, as in tests, do not collide):

* process and Python metrics (``process_*``, ``python_*``) from prometheus_client's collectors;
* ``fleet_build_info``;
* histograms observed as things happen: heartbeat lag, command round trip, wave duration, API
  request duration;
* counters of API responses by status and of refused authentications by reason;
* the fleet's state, read at scrape time from ``ControllerFacade.stats()`` by ``FleetCollector``.

Every metric has a HELP text saying what it means. The same registry is served on the API
(``GET /metrics``, any role) and on the unauthenticated read-only metrics listener (``--metrics``).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fleet.controller.facade import FleetStats

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_VERSIONS = 50
"""Versions exported one by one in fleet_nodes_by_version; the rest are summed as version="other"."""

_LAG_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)
_ROUND_TRIP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_WAVE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ControllerMetrics:
    """The registry and the instruments the controller and its API update."""

    def __init__(self, version: str, stats: Callable[[], FleetStats] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        build = Gauge(
            "fleet_build_info",
            "The running fleet controller: its version and the Python it runs on (always 1).",
            ["version", "python"],
            registry=self.registry,
        )
        build.labels(version=version, python=platform.python_version()).set(1)
        self.heartbeat_lag = Histogram(
            "fleet_heartbeat_lag_seconds",
            "Seconds between two consecutive heartbeats of one node as this controller received them: the node's"
            " heartbeat interval plus network and broker delay. A growing tail means nodes drifting towards stale.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.command_round_trip = Histogram(
            "fleet_command_round_trip_seconds",
            "Seconds from sending a command to its final acknowledgement (done, failed or rejected), by that"
            " status; resends included, so an offline node shows as a long round trip.",
            ["status"],
            buckets=_ROUND_TRIP_BUCKETS,
            registry=self.registry,
        )
        self.wave_duration = Histogram(
            "fleet_rollout_wave_duration_seconds",
            "Seconds from a rollout wave's start until every node of it was judged (succeeded, failed or"
            " unreachable); soak and health timeouts included.",
            buckets=_WAVE_BUCKETS,
            registry=self.registry,
        )
        self.api_requests = Histogram(
            "fleet_api_request_duration_seconds",
            "Seconds the HTTP API took to answer, by operation (the OpenAPI operation id).",
            ["operation"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.api_responses = Counter(
            "fleet_api_responses",
            "HTTP API responses by status code (401/403: refused credentials; 4xx: bad requests).",
            ["code"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "fleet_api_auth_failures",
            "API requests refused before reaching an operation, by reason: no_credentials, bad_token,"
            " bad_certificate, forbidden (role too low), bad_host (Host header not one of the server's names).",
            ["reason"],
            registry=self.registry,
        )
        if stats is not None:
            self.registry.register(FleetCollector(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self.registry)


class FleetCollector(Collector):
    """The fleet's state at scrape time, from one ``FleetStats`` snapshot."""

    def __init__(self, stats: Callable[[], FleetStats]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []  # families are built per scrape; nothing to check against at registration

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a scrape must not die with a bug in one part of the controller
            log.exception("metrics: collecting the fleet's state failed")
            failed = GaugeMetricFamily(
                "fleet_metrics_collection_failed", "1 when this scrape could not read the fleet's state (see the log)."
            )
            failed.add_metric([], 1)
            return [failed]
        return list(_families(stats))


def _gauge(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _counter(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _families(stats: FleetStats) -> Iterable[Metric]:
    yield _gauge(
        "fleet_nodes", "Nodes by status: online, stale (heartbeats late), offline.", "status", stats.nodes_by_status
    )
    yield _gauge(
        "fleet_nodes_by_version",
        f"Nodes by the release version they report (the {MAX_VERSIONS} most common; the rest as other, none"
        " reported as unknown).",
        "version",
        _top(stats.nodes_by_version),
    )
    yield _gauge(
        "fleet_nodes_by_health",
        "Nodes by their last health message: healthy, unhealthy, or unknown (none yet).",
        "health",
        stats.nodes_by_health,
    )
    yield _gauge(
        "fleet_rollouts", "Rollouts by state: running, paused, aborting, aborted, succeeded.", "state",
        stats.rollouts_by_state,
    )  # fmt: skip
    nodes = GaugeMetricFamily(
        "fleet_rollout_nodes",
        "Nodes of each active rollout by outcome (pending, succeeded, failed, unreachable, rolled_back).",
        labels=["rollout", "release", "outcome"],
    )
    progress = GaugeMetricFamily(
        "fleet_rollout_progress_ratio",
        "Share of an active rollout's nodes that are finished (anything but pending), 0 to 1.",
        labels=["rollout", "release", "state"],
    )
    wave = GaugeMetricFamily(
        "fleet_rollout_wave", "The wave an active rollout is in, numbered from 1.", labels=["rollout", "release"]
    )
    waves = GaugeMetricFamily(
        "fleet_rollout_waves", "How many waves an active rollout has.", labels=["rollout", "release"]
    )
    for rollout in stats.rollouts:
        total = sum(rollout.outcomes.values())
        for outcome, count in sorted(rollout.outcomes.items()):
            nodes.add_metric([rollout.id, rollout.release, outcome], count)
        finished = total - rollout.outcomes.get("pending", 0)
        progress.add_metric([rollout.id, rollout.release, rollout.state], finished / total if total else 1.0)
        wave.add_metric([rollout.id, rollout.release], rollout.wave)
        waves.add_metric([rollout.id, rollout.release], rollout.waves)
    yield from (nodes, progress, wave, waves)
    yield CounterMetricFamily(
        "fleet_heartbeats_received", "Heartbeats this controller received.", value=stats.heartbeats_received
    )
    yield GaugeMetricFamily(
        "fleet_heartbeats_per_second", "Heartbeats received per second, over the last second or more.",
        value=stats.heartbeat_rate,
    )  # fmt: skip
    yield CounterMetricFamily(
        "fleet_invalid_messages", "Node messages that did not decode or were on a channel the registry does not read.",
        value=stats.invalid_messages,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "fleet_commands_pending", "Commands without any acknowledgement yet (the controller resends them).",
        value=stats.commands_pending,
    )  # fmt: skip
    yield CounterMetricFamily(
        "fleet_artifact_chunks_sent", "Release artifact chunks sent to agents.", value=stats.artifact_chunks_sent
    )
    yield CounterMetricFamily(
        "fleet_artifact_bytes_sent", "Release artifact bytes sent to agents.", value=stats.artifact_bytes_sent
    )
    yield CounterMetricFamily(
        "fleet_artifact_requests_dropped",
        "Artifact requests shed while the release service queue was full (devices ask again); steady growth"
        " means raise --max-transfers or stagger waves.",
        value=stats.artifact_requests_dropped,
    )
    yield _counter(
        "fleet_artifact_requests_limited",
        "Artifact requests the release service's fair share cut, by reason: replaced (a newer request of the same"
        " device came while it waited), clamped (window cut to the cap), refused (error chunk), full_for_delta (no"
        " prepared delta: the full artifact was served).",
        "reason",
        stats.artifact_requests_limited,
    )
    yield GaugeMetricFamily(
        "fleet_release_deltas_pending",
        "Deltas queued or being made for rollouts that started (the first wave may get full artifacts until then).",
        value=stats.deltas_pending,
    )
    yield CounterMetricFamily(
        "fleet_controller_tick_errors", "Failures of the controller's periodic loop (should stay 0).",
        value=stats.tick_errors,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "fleet_controller_leader",
        "1 on the controller that drives rollouts and resends (always 1 without --share).",
        value=1 if stats.leader else 0,
    )
    yield _counter(
        "fleet_device_values_rejected",
        "Values reported by devices outside the controller's bounds, by field (the message was dropped or the"
        " value replaced).",
        "field",
        stats.rejected_values,
    )
    yield _counter(
        "fleet_rollout_node_errors",
        "Errors on one node while driving a rollout, by step; the other nodes carried on.",
        "step",
        stats.rollout_node_errors,
    )
    expiry = GaugeMetricFamily(
        "fleet_certificate_expiry_timestamp_seconds",
        "When each certificate the controller knows expires (unix seconds): the CAs, its own identities, the"
        " API's server certificate, the operators and controllers in its PKI directory and the operators seen"
        " on the API. Alert on time() - this.",
        labels=["name", "role"],
    )
    for cert in sorted(stats.certificates, key=lambda c: (c.role, c.name)):
        expiry.add_metric([cert.name, cert.role], cert.not_after)
    yield expiry


def _top(counts: dict[str, int]) -> dict[str, int]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    top = dict(ordered[:MAX_VERSIONS])
    rest = sum(count for _, count in ordered[MAX_VERSIONS:])
    if rest:
        top["other"] = top.get("other", 0) + rest
    return top


def merged(*sources: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for source in sources:
        for key, value in source.items():
            total[key] = total.get(key, 0) + value
    return total

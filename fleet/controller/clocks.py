"""Each device's clock offset to the controller's, from the timestamps its messages carry.

A message stamped ``ts`` by the device and received at controller time ``received`` gives
``ts - received`` = (device clock - controller clock) - transit delay, a lower bound of the offset
(messages that waited in the agent's outbox while it was offline give much lower ones). The estimate
is the highest sample among those received within ``window`` of the newest: a fresh status,
health or reported message dominates, and a device whose clock was set right is shown right after
``window``. Replayed retained messages are old news and never sampled (the registry skips them).

Nothing is decided on a device's clock (the registry judges liveness on the controller's; agents
judge command expiry on the controller's, learned from signed messages). The offset is for people:
``fleet node`` shows it, ``fleet_device_clock_offset_seconds`` exports the largest each way and
``fleet_device_clock_skewed_nodes`` how many are past ``timing.clock_skew_warn`` (default 5 min),
and crossing it is logged once as a warning (and once more when the device is back within it).
Memory only: after a restart the next message of each node measures it again.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WINDOW = 600.0
"""Seconds of samples (before the newest) the estimate is the highest of."""

SAMPLES = 16
"""Samples kept per node at most."""

LIMIT = 10 * 365 * 86_400.0
"""Offsets are clipped to +-10 years (a device's timestamp is its word; a metric must stay sane)."""


class DeviceClocks:
    """Clock offsets by node. Thread-safe."""

    def __init__(self, *, warn_after: float = 300.0, window: float = WINDOW) -> None:
        if warn_after <= 0 or window <= 0:
            raise ValueError("warn_after and window must be positive")
        self.warn_after = warn_after
        self.window = window
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[tuple[float, float]]] = {}  # node -> (received, offset)
        self._offsets: dict[str, float] = {}
        self._skewed: set[str] = set()

    def observe(self, node: str, ts: float | None, received: float) -> None:
        """A message stamped ``ts`` (device time; None: unstamped, ignored) arrived at ``received``."""
        if ts is None:
            return
        sample = max(-LIMIT, min(LIMIT, ts - received))
        with self._lock:
            samples = self._samples.get(node)
            if samples is None:
                samples = self._samples[node] = collections.deque(maxlen=SAMPLES)
            samples.append((received, sample))
            newest = max(at for at, _ in samples)
            offset = max(value for at, value in samples if at >= newest - self.window)
            self._offsets[node] = offset
            crossed = abs(offset) > self.warn_after
            changed = crossed != (node in self._skewed)
            if changed:
                (self._skewed.add if crossed else self._skewed.discard)(node)
        if changed and crossed:
            log.warning(
                "node %s: clock %s by %.0fs (past %.0fs); commands and their expiry are unaffected (judged on the"
                " controller's clock), but fix its time source (NTP)",
                node,
                "ahead" if offset > 0 else "behind",
                abs(offset),
                self.warn_after,
            )
        elif changed:
            log.info("node %s: clock within %.0fs of the controller's again (%+.1fs)", node, self.warn_after, offset)

    def offset(self, node: str) -> float | None:
        """Device clock minus controller clock in seconds (None: not measured yet)."""
        with self._lock:
            return self._offsets.get(node)

    def offsets(self) -> dict[str, float]:
        with self._lock:
            return dict(self._offsets)

    def summary(self) -> tuple[float, float, int]:
        """(largest offset ahead, largest behind, as positive seconds; nodes past ``warn_after``)."""
        with self._lock:
            values = list(self._offsets.values())
            skewed = len(self._skewed)
        ahead = max((value for value in values if value > 0), default=0.0)
        behind = max((-value for value in values if value < 0), default=0.0)
        return ahead, behind, skewed


class ClockCollector(Collector):
    """``fleet_device_clock_offset_seconds{direction}`` and ``fleet_device_clock_skewed_nodes`` at
    scrape time: bounded cardinality however many nodes (``fleet node`` shows each one's)."""

    def __init__(self, clocks: DeviceClocks) -> None:
        self._clocks = clocks

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        ahead, behind, skewed = self._clocks.summary()
        offset = GaugeMetricFamily(
            "fleet_device_clock_offset_seconds",
            "The largest clock offset of a node to the controller's clock, by direction (ahead or behind, in"
            " positive seconds), measured from the timestamps of the nodes' messages; 0 when none is off that way.",
            labels=["direction"],
        )
        offset.add_metric(["ahead"], ahead)
        offset.add_metric(["behind"], behind)
        yield offset
        yield GaugeMetricFamily(
            "fleet_device_clock_skewed_nodes",
            f"Nodes whose clock is off the controller's by more than timing.clock_skew_warn"
            f" ({self._clocks.warn_after:g}s); `fleet node NODE` shows each node's offset.",
            value=skewed,
        )

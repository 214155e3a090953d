"""What the controller accepts from a device: every value it reports, checked against bounds.

A device can say anything its certificate lets it publish. The protocol models already refuse
malformed messages (types, negative counts, values past a signed 64-bit integer); this module adds
the controller's own limits, so a value a device reports can never break the controller's
arithmetic, storage or any other node. The policy, per kind of value:

* A value that steers the controller or is stored as a number or name (generation, counters,
  sizes, versions, labels, how many probes) out of bounds drops the whole message: nothing else in
  it can be trusted either. The node is then as silent as if it had not sent it.
* Free text for people (details) is cut to ``MAX_TEXT`` characters; the message is kept.
* A device timestamp is never used for a decision (the controller judges by its own clock at
  receipt), so one outside ``[now - CLOCK_BEHIND, now + CLOCK_AHEAD]`` is replaced by the receipt
  time and the message is kept: a device with a bad clock (no RTC) stays visible.

Every rejected or replaced value is counted per field in ``Rejects`` (exposed as the Prometheus
counter ``fleet_device_values_rejected_total{field=...}``) and logged as one line.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, TypeVar

from fleet.protocol.messages import Event, Health, Heartbeat, Message, Reported, Status

log = logging.getLogger(__name__)

MAX_GENERATION = 2**53
"""Highest generation a device may report, and so the highest the controller ever builds on.

Far above any real count of desired-state changes (one a second for 285 million years), far below
the wire format's 2^63-1, so one past it is always a valid ``DesiredState`` generation."""

GENERATION_AHEAD = 1_000_000
"""How far past the controller's own last published generation a reported one may be. An honest
agent is ahead only when the controller's database is older than the agent (a restored backup), by
the changes made since; a larger lead is a lie (see fleet/controller/desired.py)."""

MAX_COUNTER = 2**53  # heartbeat seq, consecutive failures
MAX_BYTES = 2**60  # memory and disk sizes: one exbibyte
MAX_UPTIME = 100 * 365 * 86_400.0
MAX_CPU = 100_000.0  # percent; a per-core sum on a large machine stays far below
MAX_LATENCY_MS = 86_400_000.0
MAX_NAME = 128  # versions, agent versions, probe names, config digests
MAX_TEXT = 1024  # free text for people, cut to this
MAX_PROBES = 64
MAX_EVENT_DATA = 4096  # bytes of an event's data as JSON (events are kept in memory per node)
MAX_REPORTED_LABELS = 64
MAX_REPORTED_LABEL_KEY = 128
MAX_REPORTED_LABEL_VALUE = 256
CLOCK_AHEAD = 86_400.0
CLOCK_BEHIND = 365 * 86_400.0

# Operator labels are names an operator types and selectors match, so they are stricter than what
# a device may report: no ',' or '=' (selector syntax), no spaces.
MAX_OPERATOR_LABELS = 32
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")

M = TypeVar("M", bound=Message)


class OutOfBounds(ValueError):
    """A reported value outside the controller's bounds: the whole message is dropped."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


class Rejects:
    """Rejected (or replaced) device values by field; thread-safe. One log line per reject."""

    METRIC = "fleet_device_values_rejected_total"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def reject(self, node: str, field: str, reason: str, *, action: str = "message dropped") -> None:
        with self._lock:
            self._counts[field] += 1
        log.warning("device %s: %s %s (%s)", node, field, reason, action)

    def count(self, field: str | None = None) -> int:
        with self._lock:
            return self._counts[field] if field is not None else sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def reject_metrics(*sources: Rejects) -> dict[str, float]:
    """``fleet_device_values_rejected_total{field="..."}`` summed over ``sources`` (for metrics())."""
    total: collections.Counter[str] = collections.Counter()
    for source in sources:
        total.update(source.counts())
    return {f'{Rejects.METRIC}{{field="{field}"}}': float(count) for field, count in sorted(total.items())}


# ---- checks --------------------------------------------------------------------------------------


def _at_most(field: str, value: float | None, limit: float) -> None:
    if value is not None and value > limit:
        raise OutOfBounds(field, f"{value!r} is above {limit!r}")


def _name(field: str, value: str | None) -> None:
    if value is not None and len(value) > MAX_NAME:
        raise OutOfBounds(field, f"is {len(value)} characters long, more than {MAX_NAME}")


def check_generation(field: str, generation: int) -> None:
    _at_most(field, generation, MAX_GENERATION)


def check_reported_labels(field: str, labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_REPORTED_LABELS:
        raise OutOfBounds(field, f"has {len(labels)} labels, more than {MAX_REPORTED_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > MAX_REPORTED_LABEL_KEY:
            raise OutOfBounds(field, f"key {key[:40]!r}... is empty or longer than {MAX_REPORTED_LABEL_KEY}")
        if len(value) > MAX_REPORTED_LABEL_VALUE:
            raise OutOfBounds(field, f"{key}: value longer than {MAX_REPORTED_LABEL_VALUE} characters")


def check_operator_label(key: str, value: str | None) -> str | None:
    """Why ``key=value`` cannot be an operator label (``value`` None: a removal), or None."""
    if LABEL_KEY.fullmatch(key) is None:
        return f"label key {key!r}: 1-63 characters of A-Z a-z 0-9 . _ / -, starting with a letter or digit"
    if value is not None and LABEL_VALUE.fullmatch(value) is None:
        return f"label {key}={value!r}: the value must be 1-128 characters of A-Z a-z 0-9 . _ : / @ + -"
    return None


def _cut(text: str | None) -> tuple[str | None, bool]:
    if text is None or len(text) <= MAX_TEXT:
        return text, False
    return text[:MAX_TEXT], True


def screen(node: str, channel: str, message: M, now: float, rejects: Rejects) -> M:
    """``message`` within the controller's bounds, or ``OutOfBounds`` (already counted and logged).

    Free text longer than ``MAX_TEXT`` is cut and a device timestamp outside the clock window is
    replaced by ``now``; each such change is counted and logged too.
    """
    try:
        _check(message)
    except OutOfBounds as exc:
        rejects.reject(node, f"{channel}.{exc.field}", exc.reason)
        raise
    changes: dict[str, Any] = {}
    ts = getattr(message, "ts", None)
    if ts is not None and not now - CLOCK_BEHIND <= ts <= now + CLOCK_AHEAD:
        rejects.reject(node, f"{channel}.ts", f"{ts:.0f} is {ts - now:+.0f}s off the controller clock",
                       action="receipt time used")  # fmt: skip
        changes["ts"] = now
    if isinstance(message, Health) and any(len(probe.detail or "") > MAX_TEXT for probe in message.probes):
        rejects.reject(node, f"{channel}.probes.detail", f"longer than {MAX_TEXT} characters", action="cut")
        changes["probes"] = [probe.model_copy(update={"detail": _cut(probe.detail)[0]}) for probe in message.probes]
    detail, cut = _cut(getattr(message, "detail", None))
    if cut:
        rejects.reject(node, f"{channel}.detail", f"longer than {MAX_TEXT} characters", action="cut")
        changes["detail"] = detail
    return message.model_copy(update=changes) if changes else message


def _check(message: Message) -> None:
    if isinstance(message, Reported):
        check_generation("generation", message.generation)
        _name("version", message.version)
        _name("previous_version", message.previous_version)
        _name("config_digest", message.config_digest)
        check_reported_labels("labels", message.labels)
    elif isinstance(message, Heartbeat):
        _at_most("seq", message.seq, MAX_COUNTER)
        _at_most("uptime", message.uptime, MAX_UPTIME)
        _at_most("cpu", message.cpu, MAX_CPU)
        _at_most("mem_free", message.mem_free, MAX_BYTES)
        _at_most("disk_free", message.disk_free, MAX_BYTES)
        _at_most("latency_ms", message.latency_ms, MAX_LATENCY_MS)
        _name("version", message.version)
    elif isinstance(message, Health):
        _name("version", message.version)
        _at_most("consecutive_failures", message.consecutive_failures, MAX_COUNTER)
        if len(message.probes) > MAX_PROBES:
            raise OutOfBounds("probes", f"has {len(message.probes)} entries, more than {MAX_PROBES}")
        for probe in message.probes:
            _name("probes.name", probe.name)
            _at_most("probes.latency_ms", probe.latency_ms, MAX_LATENCY_MS)
    elif isinstance(message, Status):
        _name("agent_version", message.agent_version)
    elif isinstance(message, Event):
        size = len(json.dumps(message.data, default=str))
        if size > MAX_EVENT_DATA:
            raise OutOfBounds("data", f"is {size} bytes as JSON, more than {MAX_EVENT_DATA}")
    # An Ack's id and status are checked by the protocol model; its detail and ts by screen().

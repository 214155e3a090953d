"""Liveness probes of the workload, timed like Kubernetes liveness probes.

``run_probe`` runs one probe and turns every expected failure (refused connection, bad status,
timeout, non-zero exit) into a failed ``ProbeResult``. ``HealthMonitor`` runs probes on a schedule
and turns the results into a healthy / unhealthy verdict.

The HTTP probe speaks just enough HTTP/1.1 over asyncio streams to read a status line, so the agent
does not import an HTTP client library on its idle path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import string
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fleet.protocol.messages import ProbeResult, ProbeSpec

logger = logging.getLogger(__name__)

# Failures a probe reports as a result instead of raising: network and OS errors (OSError covers
# refused, reset and unresolvable), timeouts, malformed targets or responses (ValueError) and a
# connection closed mid-response (EOFError covers asyncio.IncompleteReadError).
_PROBE_FAILURES = (OSError, TimeoutError, ValueError, EOFError)


# -- one probe ------------------------------------------------------------------------------------


async def run_probe(
    spec: ProbeSpec, *, shown: str | None = None, run_as: Mapping[str, Any] | None = None
) -> ProbeResult:
    """Run one probe within ``spec.timeout``; never raises except ``CancelledError``.

    ``shown``: the target as it may be told (the template ``spec.target`` was expanded from, which
    may have put a secret in it): the detail says that instead. ``run_as``: ``subprocess`` keywords
    (``user``, ``group``, ``extra_groups``) an ``exec`` probe's command is started with."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "exec":
                ok, detail = await _check_exec(spec.target, run_as)
            else:
                ok, detail = await _CHECKS[spec.kind](spec.target)
    except TimeoutError:
        ok, detail = False, f"timed out after {spec.timeout:g}s"
    except _PROBE_FAILURES as exc:
        ok, detail = False, _describe_error(exc)
    if shown is not None and shown != spec.target:
        detail = _hide(detail, spec.target, shown)
    latency_ms = (time.monotonic() - started) * 1000.0
    return ProbeResult(name=spec.kind, ok=ok, detail=detail, latency_ms=round(latency_ms, 3))


def _hide(text: str, target: str, shown: str) -> str:
    """``text`` with the expanded ``target`` replaced by its template ``shown``, and each value
    that went into it (of three characters or more) by its ``${NAME}``, wherever it appears."""
    for spelling in (repr(target)[1:-1], target):
        text = text.replace(spelling, shown)
    for name, value in _expanded_values(shown, target).items():
        if len(value) >= 3:
            text = text.replace(value, "${" + name + "}")
    return text


def _expanded_values(template: str, target: str) -> dict[str, str]:
    """What each ``${NAME}`` of ``template`` became in ``target`` (``string.Template`` syntax)."""
    parts: list[str] = []
    names: list[str] = []
    position = 0
    for match in string.Template.pattern.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name = match.group("named") or match.group("braced")
        if name:
            parts.append(f"(?P<v{len(names)}>.*?)")
            names.append(name)
        else:
            parts.append(re.escape("$" if match.group("escaped") is not None else match.group(0)))
        position = match.end()
    parts.append(re.escape(template[position:]))
    found = re.fullmatch("".join(parts), target, re.DOTALL)
    if found is None:
        return {}
    return {name: found.group(f"v{index}") for index, name in enumerate(names)}


def target_problem(spec: ProbeSpec) -> str | None:
    """Why ``spec.target`` cannot be probed as its kind says (None: it can), checked before it is taken."""
    try:
        if spec.kind == "http":
            _parse_http_target(spec.target)
        elif spec.kind == "tcp":
            _parse_host_port(spec.target)
        elif not shlex.split(spec.target):
            return "exec probe target is an empty command"
    except ValueError as exc:
        return str(exc)
    return None


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _check_http(target: str) -> tuple[bool, str]:
    host, port, path, host_header = _parse_http_target(target)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: fleet-agent\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        status = _parse_status_line(await reader.readline())
    finally:
        await _close(writer)
    return 200 <= status < 400, f"HTTP {status}"


def _parse_http_target(target: str) -> tuple[str, int, str, str]:
    """Host, port, request path and Host header of an ``http://`` URL."""
    parts = urlsplit(target)
    if parts.scheme != "http":
        raise ValueError(f"http probe target must be an http:// URL, got {target!r}")
    if not parts.hostname:
        raise ValueError(f"http probe target has no host: {target!r}")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    host_header = parts.netloc.rpartition("@")[2]  # never send credentials in the Host header
    return parts.hostname, parts.port or 80, path, host_header


def _parse_status_line(line: bytes) -> int:
    if not line:
        raise EOFError("connection closed before a status line")
    fields = line.decode("latin-1").split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    return int(fields[1])


async def _check_tcp(target: str) -> tuple[bool, str]:
    host, port = _parse_host_port(target)
    _reader, writer = await asyncio.open_connection(host, port)
    await _close(writer)
    return True, f"connected to {target}"


def _parse_host_port(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    parts = urlsplit(f"//{target}")
    port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    if not parts.hostname or port is None:
        raise ValueError(f"tcp probe target must be host:port or [v6]:port, got {target!r}")
    return parts.hostname, port


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):  # the peer may reset the connection; it is closed either way
        await writer.wait_closed()


async def _check_exec(target: str, run_as: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    argv = shlex.split(target)
    if not argv:
        raise ValueError("exec probe target is an empty command")
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # own process group, so a timeout kills everything it started
        **(run_as or {}),  # the workload's user (workload.user): a probe is no way to root
    )
    try:
        returncode = await process.wait()
    finally:
        if process.returncode is None:  # timed out or cancelled
            _kill_group(process.pid)
            await process.wait()
    # Descendants it left behind would pile up with every period.
    _kill_group(process.pid)
    return returncode == 0, f"exit code {returncode}"


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, signal.SIGKILL)


_CHECKS: dict[str, Callable[[str], Awaitable[tuple[bool, str]]]] = {
    "http": _check_http,
    "tcp": _check_tcp,
}


# -- the monitor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthState:
    healthy: bool | None
    """None until the first verdict: the first success, or ``failure_threshold`` failures in a row."""
    consecutive_failures: int
    last: ProbeResult | None
    since: float
    """``time.monotonic()`` of the last change of ``healthy``."""


def _ignore(state: HealthState) -> None:
    """Default ``on_result``: the caller only wants changes."""


class HealthMonitor:
    """Runs a probe every ``period`` after ``initial_delay`` and keeps the verdict.

    * ``healthy`` becomes False when ``failure_threshold`` probes in a row have failed and True on
      the first success; it stays None before the first verdict.
    * The period is counted from the start of each probe, so a slow probe does not stretch it
      beyond ``max(period, timeout)``: an unhealthy workload is reported unhealthy within
      ``initial_delay + failure_threshold * max(period, timeout)``.
    * Without a probe (``spec`` None) nothing can fail, so the workload is reported healthy at once
      (a single ``on_change`` to True, no ``on_result``): an update to a release without a health
      probe is judged by the supervisor alone (a release that crash-loops is not healthy anyway).
    * ``set_spec`` replaces the settings at once: the next probe is due ``period`` (the new one)
      after the start of the last probe, and failures of the old settings are forgotten.
    * A probe that is running when ``reset`` or ``set_spec`` is called finishes (it is bounded by
      its timeout), but its result is discarded.
    """

    def __init__(
        self,
        node_id: str,
        spec: ProbeSpec | None,
        on_change: Callable[[HealthState], None],
        on_result: Callable[[HealthState], None] = _ignore,
        *,
        run_as: Mapping[str, Any] | None = None,
    ) -> None:
        self.node_id = node_id
        self._spec = spec
        self._shown: str | None = None  # the template the target was expanded from: what is told
        self.run_as = run_as  # subprocess keywords for exec probes (the workload's user)
        self._on_change = on_change
        self._on_result = on_result
        self._state = HealthState(healthy=None, consecutive_failures=0, last=None, since=time.monotonic())
        self._epoch = time.monotonic()  # the initial delay counts from here
        self._last_probe_start: float | None = None
        self._generation = 0  # bumped by reset() and set_spec(): results of older probes are stale
        self._wake = asyncio.Event()

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def spec(self) -> ProbeSpec | None:
        return self._spec

    def reset(self) -> None:
        """Start over: initial delay, counters and verdict (the workload restarted or changed)."""
        logger.info("%s: health monitor reset", self.node_id)
        self._restart_schedule()
        self._set_state(None, 0, None)

    def set_spec(self, spec: ProbeSpec | None, *, shown: str | None = None) -> None:
        """Hot-reload the probe settings; takes effect at once. ``shown``: the target's template,
        logged and reported instead of the expanded target (which may carry a secret)."""
        self._shown = shown
        if spec == self._spec:
            return
        told = spec.model_copy(update={"target": shown}) if spec is not None and shown is not None else spec
        logger.info("%s: health probe set to %s", self.node_id, told)
        self._spec = spec
        self._generation += 1
        self._wake.set()
        self._set_state(self._state.healthy, 0, self._state.last)

    async def run(self) -> None:
        """The owned probe loop; runs until cancelled."""
        self._restart_schedule()
        while True:
            self._wake.clear()  # anything that sets it from here on is seen by the wait below
            spec = self._spec
            if spec is None:
                if self._state.healthy is not True:
                    self._set_state(True, 0, self._state.last)
                await self._wake.wait()
                continue
            due = self._next_probe_at(spec)
            if not await self._sleep_until(due):
                continue  # woken by reset() or set_spec(): recompute the schedule
            await self._probe(spec)

    def _restart_schedule(self) -> None:
        self._epoch = time.monotonic()
        self._last_probe_start = None
        self._generation += 1
        self._wake.set()

    def _next_probe_at(self, spec: ProbeSpec) -> float:
        first = self._epoch + spec.initial_delay
        if self._last_probe_start is None:
            return first
        return max(first, self._last_probe_start + spec.period)

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until ``deadline``; False if woken earlier."""
        delay = deadline - time.monotonic()
        if delay <= 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return True
        return False

    async def _probe(self, spec: ProbeSpec) -> None:
        generation = self._generation
        self._last_probe_start = time.monotonic()
        result = await run_probe(spec, shown=self._shown, run_as=self.run_as)
        if generation != self._generation:
            logger.debug("%s: discarding a probe result of replaced settings", self.node_id)
            return
        self._apply(spec, result)
        self._call(self._on_result, "on_result")

    def _apply(self, spec: ProbeSpec, result: ProbeResult) -> None:
        if result.ok:
            self._set_state(True, 0, result)
            return
        failures = self._state.consecutive_failures + 1
        logger.info(
            "%s: %s probe failed (%d/%d): %s",
            self.node_id,
            spec.kind,
            failures,
            spec.failure_threshold,
            result.detail,
        )
        healthy = False if failures >= spec.failure_threshold else self._state.healthy
        self._set_state(healthy, failures, result)

    def _set_state(self, healthy: bool | None, consecutive_failures: int, last: ProbeResult | None) -> None:
        old = self._state
        changed = healthy != old.healthy
        since = time.monotonic() if changed else old.since
        self._state = HealthState(healthy, consecutive_failures, last, since)
        if changed:
            self._log_change(old.healthy, self._state)
            self._call(self._on_change, "on_change")

    def _log_change(self, old: bool | None, new: HealthState) -> None:
        if new.healthy is False:
            detail = new.last.detail if new.last is not None else None
            logger.warning(
                "%s: workload unhealthy after %d failed probes: %s", self.node_id, new.consecutive_failures, detail
            )
        else:
            logger.info("%s: workload health %s -> %s", self.node_id, old, new.healthy)

    def _call(self, callback: Callable[[HealthState], None], name: str) -> None:
        try:
            callback(self._state)
        except Exception:
            # A faulty consumer must not stop health monitoring.
            logger.exception("%s: health %s callback failed", self.node_id, name)

"""Probes and the health monitor against real servers and processes (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.probes import HealthMonitor, HealthState, run_probe
from fleet.protocol.messages import ProbeSpec
from tests.agent.test_workload import live_group_members, poll_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0
SLACK = 1.0  # generous: two busy cores


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


class TinyHttp:
    """A real HTTP server on 127.0.0.1:0 whose answer a test can change (or withhold)."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.requests: list[bytes] = []
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.hang:
                await reader.read()  # until the prober gives up and closes
                return
            writer.write(f"HTTP/1.1 {self.status} Whatever\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz?deep=1"


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[TinyHttp]:
    app = TinyHttp()
    server = await asyncio.start_server(app._handle, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- run_probe ------------------------------------------------------------------------------------


def test_http_probe_success_sends_a_proper_request() -> None:
    async def scenario() -> None:
        async with http_server() as app:
            result = await run_probe(ProbeSpec(kind="http", target=app.url, timeout=2))
        assert result.ok and result.name == "http" and result.detail == "HTTP 200"
        assert result.latency_ms is not None and 0 <= result.latency_ms < 2000
        request = app.requests[0].decode()
        assert request.startswith("GET /healthz?deep=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{app.port}\r\n" in request and "Connection: close\r\n" in request

    run(scenario)


@pytest.mark.parametrize(("status", "ok"), [(204, True), (302, True), (404, False), (500, False)])
def test_http_probe_judges_the_status(status: int, ok: bool) -> None:
    async def scenario() -> None:
        async with http_server() as app:
            app.status = status
            result = await run_probe(ProbeSpec(kind="http", target=app.url, timeout=2))
        assert result.ok is ok and result.detail == f"HTTP {status}"

    run(scenario)


def test_http_probe_times_out_on_a_server_that_never_answers() -> None:
    async def scenario() -> None:
        async with http_server() as app:
            app.hang = True
            started = time.monotonic()
            result = await run_probe(ProbeSpec(kind="http", target=app.url, timeout=0.2))
            took = time.monotonic() - started
        assert not result.ok and result.detail == "timed out after 0.2s"
        assert 0.2 <= took < 0.2 + SLACK

    run(scenario)


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        (f"http://127.0.0.1:{closed_port()}/", "ConnectionRefusedError"),
        ("https://127.0.0.1/", "http:// URL"),
        ("http:///nohost", "no host"),
    ],
)
def test_http_probe_reports_errors_instead_of_raising(target: str, detail: str) -> None:
    result = asyncio.run(run_probe(ProbeSpec(kind="http", target=target, timeout=2)))
    assert not result.ok and result.detail is not None and detail in result.detail


def test_tcp_probe_open_and_closed_port() -> None:
    async def scenario() -> None:
        async with http_server() as app:
            opened = await run_probe(ProbeSpec(kind="tcp", target=f"127.0.0.1:{app.port}", timeout=2))
        closed = await run_probe(ProbeSpec(kind="tcp", target=f"127.0.0.1:{closed_port()}", timeout=2))
        assert opened.ok and opened.name == "tcp"
        assert not closed.ok and closed.detail is not None and "ConnectionRefusedError" in closed.detail

    run(scenario)


def test_tcp_probe_accepts_ipv6_literals() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "::1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            result = await run_probe(ProbeSpec(kind="tcp", target=f"[::1]:{port}", timeout=2))
        finally:
            server.close()
            await server.wait_closed()
        assert result.ok, result.detail

    run(scenario)


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:99999"])
def test_tcp_probe_rejects_malformed_targets(target: str) -> None:
    result = asyncio.run(run_probe(ProbeSpec(kind="tcp", target=target, timeout=1)))
    assert not result.ok and result.detail is not None


def test_exec_probe_exit_codes() -> None:
    async def scenario() -> None:
        good = await run_probe(ProbeSpec(kind="exec", target="true"))
        bad = await run_probe(ProbeSpec(kind="exec", target="sh -c 'exit 7'"))
        missing = await run_probe(ProbeSpec(kind="exec", target="/no/such/probe --flag"))
        assert good.ok and good.name == "exec" and good.detail == "exit code 0"
        assert not bad.ok and bad.detail == "exit code 7"
        assert not missing.ok and missing.detail is not None and "FileNotFoundError" in missing.detail

    run(scenario)


def test_exec_probe_timeout_kills_its_process_group(tmp_path: Path) -> None:
    async def scenario() -> None:
        pid_file = tmp_path / "pid"
        # The shell records its pid (= the probe's process group) and leaves a grandchild behind.
        target = f"sh -c 'echo $$ > {pid_file}; sleep 5 & sleep 5'"
        started = time.monotonic()
        result = await run_probe(ProbeSpec(kind="exec", target=target, timeout=0.3))
        took = time.monotonic() - started
        assert not result.ok and result.detail == "timed out after 0.3s"
        assert 0.3 <= took < 0.3 + SLACK
        pgid = int(pid_file.read_text())
        await poll_until(lambda: not live_group_members(pgid))

    run(scenario)


# -- HealthMonitor --------------------------------------------------------------------------------


class Watcher:
    """Records every state change and every probe result with its time."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, HealthState]] = []
        self.results: list[tuple[float, HealthState]] = []
        self._changed = asyncio.Event()

    def on_change(self, state: HealthState) -> None:
        self.changes.append((time.monotonic(), state))
        self._changed.set()

    def on_result(self, state: HealthState) -> None:
        self.results.append((time.monotonic(), state))
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> float:
        """Wait until ``predicate()`` holds; returns the time it was seen to hold."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic()

    def healthy_values(self) -> list[bool | None]:
        return [state.healthy for _, state in self.changes]


@contextlib.asynccontextmanager
async def monitoring(monitor: HealthMonitor) -> AsyncIterator[None]:
    task = asyncio.create_task(monitor.run(), name="test-health-monitor")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_unhealthy_within_initial_delay_plus_threshold_periods() -> None:
    async def scenario() -> None:
        watcher = Watcher()
        async with http_server() as app:
            app.status = 500
            spec = ProbeSpec(
                kind="http", target=app.url, initial_delay=0.3, period=0.2, timeout=0.2, failure_threshold=3
            )
            monitor = HealthMonitor("gw-test", spec, watcher.on_change, watcher.on_result)
            started = time.monotonic()
            async with monitoring(monitor):
                await watcher.wait_for(lambda: monitor.state.healthy is False)
                took = time.monotonic() - started

        # Not before the third failure (initial_delay + 2 periods), and within the promised bound.
        assert 0.3 + 2 * 0.2 <= took <= 0.3 + 3 * 0.2 + SLACK, took
        assert watcher.healthy_values() == [False]  # None -> False; below the threshold it stays None
        assert [state.consecutive_failures for _, state in watcher.results] == [1, 2, 3]
        first_probe = watcher.results[0][0] - started
        assert 0.3 <= first_probe <= 0.3 + SLACK
        last = monitor.state.last
        assert last is not None and not last.ok and last.detail == "HTTP 500"

    run(scenario)


def test_flip_to_unhealthy_and_back() -> None:
    async def scenario() -> None:
        watcher = Watcher()
        async with http_server() as app:
            spec = ProbeSpec(kind="http", target=app.url, period=0.1, timeout=0.1, failure_threshold=3)
            monitor = HealthMonitor("gw-test", spec, watcher.on_change, watcher.on_result)
            async with monitoring(monitor):
                await watcher.wait_for(lambda: monitor.state.healthy is True)
                flipped = time.monotonic()
                app.status = 500
                went_bad = await watcher.wait_for(lambda: monitor.state.healthy is False)
                app.status = 200
                came_back = await watcher.wait_for(lambda: monitor.state.healthy is True)

        # The probe in flight at the flip may still see 200, hence one extra period.
        assert went_bad - flipped <= (3 + 1) * 0.1 + SLACK
        assert came_back - went_bad <= 0.1 + SLACK
        assert watcher.healthy_values() == [True, False, True]
        assert monitor.state.consecutive_failures == 0
        assert monitor.state.since == pytest.approx(watcher.changes[-1][0], abs=0.05)

    run(scenario)


def test_reset_restarts_the_initial_delay() -> None:
    async def scenario() -> None:
        watcher = Watcher()
        async with http_server() as app:
            spec = ProbeSpec(kind="http", target=app.url, initial_delay=0.5, period=0.1, timeout=0.1)
            monitor = HealthMonitor("gw-test", spec, watcher.on_change, watcher.on_result)
            async with monitoring(monitor):
                await watcher.wait_for(lambda: monitor.state.healthy is True)
                probes_before = len(watcher.results)
                reset_at = time.monotonic()
                monitor.reset()
                assert monitor.state.healthy is None and monitor.state.last is None
                await watcher.wait_for(lambda: len(watcher.results) > probes_before)
                first_after_reset = watcher.results[probes_before][0]
                await watcher.wait_for(lambda: monitor.state.healthy is True)

        assert 0.5 - 0.05 <= first_after_reset - reset_at <= 0.5 + SLACK
        assert watcher.healthy_values() == [True, None, True]

    run(scenario)


def test_set_spec_changes_the_period_at_runtime() -> None:
    async def scenario() -> None:
        watcher = Watcher()
        async with http_server() as app:
            slow = ProbeSpec(kind="http", target=app.url, period=5.0, timeout=0.5)
            monitor = HealthMonitor("gw-test", slow, watcher.on_change, watcher.on_result)
            async with monitoring(monitor):
                await watcher.wait_for(lambda: len(watcher.results) == 1)
                switched = time.monotonic()
                monitor.set_spec(slow.model_copy(update={"period": 0.1}))
                await watcher.wait_for(lambda: len(watcher.results) >= 6, timeout=5.0)
                finished = time.monotonic()

        # With the old period the second probe would be 5 s away; five came well within that.
        assert finished - switched < 0.5 + SLACK
        starts = [at for at, _ in watcher.results[1:6]]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(gap < 0.1 + 0.3 for gap in gaps), gaps
        assert watcher.healthy_values() == [True]

    run(scenario)


def test_without_a_probe_the_workload_is_healthy_once() -> None:
    async def scenario() -> None:
        watcher = Watcher()
        monitor = HealthMonitor("gw-test", None, watcher.on_change, watcher.on_result)
        async with monitoring(monitor):
            await watcher.wait_for(lambda: monitor.state.healthy is True)
            monitor.set_spec(None)  # unchanged settings: nothing happens
            async with http_server() as app:
                monitor.set_spec(ProbeSpec(kind="http", target=app.url, period=0.1, timeout=0.1))
                await watcher.wait_for(lambda: len(watcher.results) >= 1)
        assert watcher.healthy_values() == [True]
        assert monitor.state.last is not None and monitor.state.last.ok

    run(scenario)


def test_a_failing_callback_does_not_stop_monitoring() -> None:
    async def scenario() -> None:
        watcher = Watcher()

        def faulty(state: HealthState) -> None:
            watcher.on_result(state)
            raise RuntimeError("consumer bug")

        spec = ProbeSpec(kind="exec", target="true", period=0.05, timeout=1)
        monitor = HealthMonitor("gw-test", spec, watcher.on_change, faulty)
        async with monitoring(monitor):
            await watcher.wait_for(lambda: len(watcher.results) >= 3)

    run(scenario)

"""FaultProxy against a real echo server over loopback sockets; every wait has a deadline."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy
from tests.mqtt import wait_until

pytestmark = pytest.mark.timeout(30)

DEADLINE = 5.0  # generous for 2 busy cores; the happy path takes milliseconds


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(DEADLINE * 2)  # a forgotten client must not keep the server thread forever
        # The proxy cuts links on purpose, so resets here are expected, not errors.
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins handler threads: nothing outlives the test
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="echo", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(*echo) as p:
        yield p


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
    sock.settimeout(DEADLINE)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload


def _recv_until_closed(sock: socket.socket) -> tuple[int, bool]:
    """Read until the link ends; returns (bytes received, whether it ended with a reset rather than EOF)."""
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        return total, True
    return total, False


def _assert_refused(proxy: FaultProxy) -> None:
    """The proxy accepts and resets at once; that reset can already surface in connect() itself."""
    try:
        sock = _connect(proxy)
    except ConnectionResetError:
        return
    with sock:
        assert _recv_until_closed(sock)[0] == 0


def _assert_closed_soon(sock: socket.socket) -> None:
    # recv() has the socket's DEADLINE timeout: a TimeoutError here means the link was not closed.
    _recv_until_closed(sock)


def test_forwards_both_ways_and_counts_bytes(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _echo(sock, b"hello")
        _echo(sock, b"x" * 100_000)
        stats = proxy.stats
        assert (stats.accepted, stats.open) == (1, 1)
        assert stats.bytes_up == stats.bytes_down == 100_005
        # A half-close travels through: the echo server sees EOF, closes, and we see EOF.
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    wait_until(lambda: proxy.stats.open == 0, DEADLINE, "link closed after both sides finished")
    assert proxy.stats.cuts == 0


def test_cut_resets_current_links_and_accepts_new_ones(proxy: FaultProxy) -> None:
    with _connect(proxy) as a, _connect(proxy) as b:
        _echo(a, b"a")
        _echo(b, b"b")
        assert proxy.cut() == 2
        assert proxy.stats.open == 0
        _assert_closed_soon(a)
        _assert_closed_soon(b)
    assert proxy.stats.cuts == 2
    with _connect(proxy) as sock:
        _echo(sock, b"after cut")


def test_cut_sends_reset_not_fin(proxy: FaultProxy) -> None:
    # An MQTT client must see an abrupt failure, not an orderly close by the broker.
    with _connect(proxy) as sock:
        _echo(sock, b"ping")
        proxy.cut()
        assert _recv_until_closed(sock) == (0, True)


def test_refuse_closes_new_connections_until_turned_off(proxy: FaultProxy) -> None:
    with _connect(proxy) as before:
        _echo(before, b"up")
        proxy.refuse()
        _assert_refused(proxy)
        _echo(before, b"existing links are not affected")
    wait_until(lambda: proxy.stats.refused == 1, DEADLINE, "the refused connection is counted")
    proxy.refuse(False)
    with _connect(proxy) as sock:
        _echo(sock, b"back")


def test_stall_holds_data_then_delivers_in_order(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _echo(sock, b"link up")
        up_before = proxy.stats.bytes_up
        proxy.stall()
        sock.sendall(b"one,")
        sock.sendall(b"two,")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(b"three")
        assert proxy.stats.bytes_up == up_before  # nothing reached the target either
        assert proxy.stats.open == 1  # the link stays open: a blackhole, not a disconnect
        proxy.stall(False)
        sock.settimeout(DEADLINE)
        assert _recv_exactly(sock, 13) == b"one,two,three"


def test_delay_applies_to_each_direction(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _echo(sock, b"warm up")  # the upstream connect must not count in the measured round trip
        proxy.set_delay(0.2)
        started = time.monotonic()
        _echo(sock, b"slow")
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 0.4 + DEADLINE
        proxy.set_delay(0)
        started = time.monotonic()
        _echo(sock, b"fast")
        assert time.monotonic() - started < 0.4


def test_bandwidth_limits_throughput(proxy: FaultProxy) -> None:
    proxy.set_bandwidth(10_000)
    payload = bytes(range(256)) * 80  # 20 480 bytes
    with _connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 1.5 + DEADLINE


def test_cut_after_drops_links_after_n_downstream_bytes(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _echo(sock, b"z" * 100)
        proxy.cut_after(3000)
        sock.sendall(b"y" * 10_000)
        received, reset = _recv_until_closed(sock)
    # Exact: the proxy hands the budget to the kernel before the reset, and loopback keeps that order.
    assert (received, reset) == (3000, True)
    assert proxy.stats.bytes_down == 100 + 3000
    assert proxy.stats.cuts == 1
    # One-shot: the next connection works normally.
    with _connect(proxy) as sock:
        _echo(sock, b"w" * 10_000)


def test_cut_after_repeat_keeps_dropping(proxy: FaultProxy) -> None:
    proxy.cut_after(500, repeat=True)
    for _ in range(2):
        with _connect(proxy) as sock:
            sock.sendall(b"r" * 2000)
            _recv_until_closed(sock)
    assert proxy.stats.cuts == 2
    proxy.cut_after_off()
    with _connect(proxy) as sock:
        _echo(sock, b"r" * 2000)


def test_unreachable_target_resets_client() -> None:
    # Grab a free port and release it, so nothing listens there.
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        _assert_refused(proxy)
        wait_until(lambda: proxy.stats.refused == 1, DEADLINE, "the failed upstream connect is counted")


def test_stop_closes_links_and_port(echo: tuple[str, int]) -> None:
    proxy = FaultProxy(*echo).start()
    port = proxy.port
    with _connect(proxy) as sock:
        _echo(sock, b"bye")
        proxy.stop()
        _assert_closed_soon(sock)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
    proxy.stop()  # idempotent


def test_rejects_non_loopback_listen_address(echo: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(*echo, listen_host="0.0.0.0")

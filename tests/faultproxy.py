"""A fault-injecting TCP proxy for network tests: cut, refuse, stall, delay and throttle links at runtime.

`tc netem` is not available on the test machines, so tests put this proxy between an MQTT client and the
broker and switch faults from the test thread. The proxy runs an asyncio loop in its own daemon thread;
every control method hands its work to that loop and waits for it, so a fault is in force when the call
returns. It listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import struct
import threading
from asyncio import trsock
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final, Self, TypeVar

_T = TypeVar("_T")

_CHUNK: Final = 65536
# Bounded per direction so a stalled or throttled link pushes back on the sender's TCP window
# instead of buffering without limit in the proxy.
_QUEUE_CHUNKS: Final = 16
_CONNECT_TIMEOUT: Final = 5.0
_CONTROL_TIMEOUT: Final = 5.0
_CLOSE_TIMEOUT: Final = 2.0
_STOP_TIMEOUT: Final = 10.0
# Throttled writes go out in slices of this fraction of a second, so the rate is smooth, not bursty.
_SLICES_PER_SECOND: Final = 20
# SO_LINGER on, timeout 0: close() sends RST and drops unsent data, as a dying link does.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

# (time read, bytes); b"" marks the source's EOF.
_Item = tuple[float, bytes]


@dataclasses.dataclass
class ProxyStats:
    accepted: int = 0  # every client connection accepted, refused ones included
    refused: int = 0  # closed at once: refuse() was on, or the target could not be reached
    open: int = 0  # links currently forwarding
    bytes_up: int = 0  # client -> target, handed to the target's socket
    bytes_down: int = 0  # target -> client, handed to the client's socket
    cuts: int = 0  # connections aborted by cut() or cut_after()


def _set_reset_on_close(sock: socket.socket | trsock.TransportSocket) -> None:
    # The socket may already be closed by the transport; then there is nothing left to reset.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        _set_reset_on_close(sock)
    writer.transport.abort()


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close gracefully (a no-op after abort) and wait until the socket is really released."""
    writer.close()
    # The peer may have reset the link; all that matters here is that our side is closed.
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)


class _Link:
    """One proxied connection: the client's and the target's stream, and the four tasks pumping them."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.writers = (client, target)
        self.tasks: list[asyncio.Task[None]] = []

    def pause(self, paused: bool) -> None:
        # Stop the transports pulling bytes off the kernel, so a stall backs up into the peers' TCP windows
        # as on a dead path, instead of being soaked up by the proxy's read buffers.
        for writer in self.writers:
            transport = writer.transport
            # Stream transports are read/write; the check is for the type checker, and skips closed ones.
            if not isinstance(transport, asyncio.Transport) or transport.is_closing():
                continue
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def abort(self) -> None:
        for writer in self.writers:
            _reset(writer)
        for task in self.tasks:
            task.cancel()

    async def closed(self) -> None:
        await asyncio.gather(*(_closed(writer) for writer in self.writers))


class FaultProxy:
    """TCP proxy 127.0.0.1:<port> -> target, with faults switchable at runtime from the test thread."""

    def __init__(
        self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        if not ipaddress.ip_address(listen_host).is_loopback:
            raise ValueError(f"FaultProxy listens on loopback only, not {listen_host!r}")
        self._target = (target_host, target_port)
        self._listen = (listen_host, listen_port)
        self.port = 0
        self._stats = ProxyStats()
        # Fault settings: written only on the loop thread, read by the pumps.
        self._refusing = False
        self._delay = 0.0
        self._bandwidth: int | None = None
        self._cut_budget: int | None = None  # downstream bytes left before cut_after() fires
        self._cut_rearm: int | None = None  # budget to restore after firing, for repeat=True
        # Loop-side state, created in _main() because asyncio objects belong to their loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None  # cleared while stalled
        self._stopping: asyncio.Event | None = None
        self._links: set[_Link] = set()
        # Accepted sockets not yet owned by a stream transport, so shutdown can close them whatever happens.
        self._raw: set[socket.socket] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle (test thread)

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name=f"faultproxy->{self._target[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(_STOP_TIMEOUT):
            raise RuntimeError("FaultProxy did not start listening in time")
        if self._error is not None:
            self._thread.join(_STOP_TIMEOUT)
            self._thread = None
            raise RuntimeError("FaultProxy failed to start") from self._error
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            # The loop may already have ended if the thread crashed; then there is nothing to signal.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop in time")
        if self._error is not None:
            raise RuntimeError("FaultProxy thread crashed") from self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults (test thread)

    def cut(self) -> int:
        """Abort every current connection (RST both ways); returns once their sockets are closed."""
        return self._call(self._cut_and_wait())

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are accepted and reset at once (the broker is "down").

        Links already open are left alone; call cut() too for a broker crash. The reset can come so fast
        that the client's connect() itself fails with ECONNRESET.
        """
        self._call(self._apply(lambda: setattr(self, "_refusing", on)))

    def stall(self, on: bool = True) -> None:
        """While on, nothing is read or forwarded either way; off resumes with what is buffered, in order."""
        self._call(self._apply(lambda: self._set_flowing(not on)))

    def set_delay(self, seconds: float) -> None:
        """Forward each chunk this long after it was read, per direction, keeping order."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(self._apply(lambda: setattr(self, "_delay", float(seconds))))

    def set_bandwidth(self, bytes_per_second: int | None) -> None:
        """Limit each link to about this rate per direction; None removes the limit."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bandwidth must be > 0 or None")
        self._call(self._apply(lambda: setattr(self, "_bandwidth", bytes_per_second)))

    def cut_after(self, nbytes: int, *, repeat: bool = False) -> None:
        """Cut all connections once `nbytes` more bytes went downstream (target -> client), summed over links.

        Exactly `nbytes` are forwarded before the cut. With repeat=True it re-arms after each cut, so the link
        keeps dropping every `nbytes` ("drops every few chunks"); cut_after_off() disarms it.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._call(self._apply(lambda: self._arm_cut(nbytes, nbytes if repeat else None)))

    def cut_after_off(self) -> None:
        """Disarm a pending cut_after()."""
        self._call(self._apply(lambda: self._arm_cut(None, None)))

    @property
    def stats(self) -> ProxyStats:
        """A snapshot; taken on the loop thread while running so the counters agree with each other."""
        if self._thread is None or self._loop is None or self._loop.is_closed():
            return dataclasses.replace(self._stats)
        return self._call(self._apply(lambda: dataclasses.replace(self._stats)))

    # ------------------------------------------------------------------ thread plumbing

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if self._thread is None or loop is None or not self._ready.is_set():
            coro.close()
            raise RuntimeError("FaultProxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy control methods must not be called from its own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CONTROL_TIMEOUT)

    @staticmethod
    async def _apply(change: Callable[[], _T]) -> _T:
        # Runs `change` on the loop thread, so pumps never see a half-applied setting.
        return change()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()/stop() on the test thread
            self._error = exc
        finally:
            self._ready.set()

    # ------------------------------------------------------------------ loop thread

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopping = asyncio.Event()
        listener = socket.create_server(self._listen)
        try:
            listener.setblocking(False)
            self.port = listener.getsockname()[1]
            accepting = asyncio.create_task(self._accept_loop(listener))
            self._ready.set()
            await self._stopping.wait()
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
        finally:
            listener.close()
            await self._shutdown()

    async def _shutdown(self) -> None:
        for link in list(self._links):
            link.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), _STOP_TIMEOUT / 2)
        # A handler cancelled before its first step never ran its cleanup; its socket is still ours.
        for sock in list(self._raw):
            _set_reset_on_close(sock)
            sock.close()
        self._raw.clear()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                # e.g. out of file descriptors: back off instead of spinning, and keep serving.
                await asyncio.sleep(0.05)
                continue
            self._stats.accepted += 1
            if self._refusing:
                self._stats.refused += 1
                _set_reset_on_close(conn)
                conn.close()
                continue
            self._raw.add(conn)
            task = asyncio.create_task(self._handle(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            creader, cwriter = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()  # the client already went away
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            self._raw.discard(conn)  # from here on the transport owns (and closes) the socket
        try:
            treader, twriter = await asyncio.wait_for(asyncio.open_connection(*self._target), _CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            # Target down (or we are stopping): the client sees a reset, as if the broker refused it.
            if not isinstance(exc, asyncio.CancelledError):
                self._stats.refused += 1
            _reset(cwriter)
            await _closed(cwriter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self._serve(_Link(cwriter, twriter), creader, treader)

    async def _serve(self, link: _Link, creader: asyncio.StreamReader, treader: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        cwriter, twriter = link.writers
        for writer in link.writers:
            # No buffering above the kernel: drain() then means "handed to the socket", which makes the
            # byte counts, cut_after() and stall() exact.
            writer.transport.set_write_buffer_limits(high=0)
        up: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        down: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        link.tasks = [
            asyncio.create_task(self._guard(link, self._read_side(creader, up))),
            asyncio.create_task(self._guard(link, self._write_side(up, twriter, downstream=False))),
            asyncio.create_task(self._guard(link, self._read_side(treader, down))),
            asyncio.create_task(self._guard(link, self._write_side(down, cwriter, downstream=True))),
        ]
        self._links.add(link)
        self._stats.open += 1
        if not self._flowing.is_set():
            link.pause(True)
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._forget(link)
            await link.closed()

    def _forget(self, link: _Link) -> None:
        # Called both by the link's own handler and by a cut, whichever comes first, so that
        # stats.open is already right when cut() returns.
        if link in self._links:
            self._links.discard(link)
            self._stats.open -= 1

    async def _guard(self, link: _Link, pump: Coroutine[Any, Any, None]) -> None:
        try:
            await pump
        except OSError:
            link.abort()  # a reset on one side is passed on as a reset to the other, like a broken path
        except Exception as exc:
            link.abort()
            # A bug in the proxy must fail the test (stop() raises it) rather than vanish in gather().
            if self._error is None:
                self._error = exc

    async def _read_side(self, src: asyncio.StreamReader, queue: asyncio.Queue[_Item]) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._flowing.wait()  # stalled: leave the bytes in the kernel, unread
            data = await src.read(_CHUNK)
            await queue.put((loop.time(), data))
            if not data:
                return

    async def _write_side(self, queue: asyncio.Queue[_Item], dst: asyncio.StreamWriter, downstream: bool) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            stamp, data = await queue.get()
            # Latency counts from when the chunk was read; a single writer per direction keeps order.
            wait = stamp + self._delay - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()  # pass the half-close on, the other direction may still be talking
                return
            await self._send(dst, data, downstream)

    async def _send(self, dst: asyncio.StreamWriter, data: bytes, downstream: bool) -> None:
        assert self._flowing is not None
        while data:
            await self._flowing.wait()  # a stall may start in the middle of a throttled chunk
            piece = data[: self._slice_size(len(data))]
            if downstream and self._cut_budget is not None:
                piece = piece[: self._cut_budget]
            if piece:
                dst.write(piece)
                await dst.drain()
                self._count(len(piece), downstream)
            if downstream and self._cut_budget is not None:
                self._cut_budget -= len(piece)
                if self._cut_budget <= 0:
                    self._fire_cut_after()
                    return
            data = data[len(piece) :]
            if self._bandwidth is not None:
                await asyncio.sleep(len(piece) / self._bandwidth)

    def _slice_size(self, available: int) -> int:
        if self._bandwidth is None:
            return available
        return max(1, self._bandwidth // _SLICES_PER_SECOND)

    def _count(self, nbytes: int, downstream: bool) -> None:
        if downstream:
            self._stats.bytes_down += nbytes
        else:
            self._stats.bytes_up += nbytes

    def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()
        for link in self._links:
            link.pause(not flowing)

    def _arm_cut(self, budget: int | None, rearm: int | None) -> None:
        self._cut_budget = budget
        self._cut_rearm = rearm

    def _fire_cut_after(self) -> None:
        self._cut_budget = self._cut_rearm
        self._cut_all()

    def _cut_all(self) -> list[_Link]:
        links = list(self._links)
        for link in links:
            link.abort()
            self._forget(link)
        self._stats.cuts += len(links)
        return links

    async def _cut_and_wait(self) -> int:
        links = self._cut_all()
        await asyncio.gather(*(link.closed() for link in links))
        return len(links)

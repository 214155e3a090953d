"""Fetch byte ranges of a release artifact over HTTPS (a CDN, or the release store served as files).

The alternative to the MQTT transfer for users with a CDN. Only the stdlib: one blocking
``http.client`` connection, reused from range to range and reopened after any error; the updater
calls :meth:`RangeClient.fetch` in a worker thread. Every failure is a :class:`SourceError` so the
updater can count them and fall back to MQTT.

TLS checks the server against the system store (a CDN has a public certificate) plus the agent's
own CA (a self-hosted store). Plain ``http://`` is refused except to loopback hosts (tests).
"""

from __future__ import annotations

import http.client
import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from fleet.protocol.errors import FleetError


class SourceError(FleetError):
    """The HTTPS source did not deliver the range (refused, 4xx/5xx, cut short, not a range reply)."""


def check_url(url: str) -> None:
    """``SourceError`` unless the agent may fetch from ``url`` (https, or http to loopback)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise SourceError(f"{url}: no host")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    raise SourceError(f"{url}: only https:// is allowed (http:// only to a loopback host)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """The system trust store plus the agent's CA, hostname checked."""
    context = ssl.create_default_context()
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    return context


class RangeClient:
    """Ranges of one URL; not thread-safe (one download uses it from one worker thread at a time)."""

    def __init__(self, url: str, *, timeout: float, context: ssl.SSLContext | None = None) -> None:
        check_url(url)
        self.url = url
        self.timeout = timeout
        self._parts = urlsplit(url)
        self._context = context if context is not None else tls_context(None)
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def fetch(self, start: int, length: int, total: int) -> bytes:
        """Bytes ``start .. start+length-1`` of a ``total``-byte file, exactly, or ``SourceError``."""
        try:
            return self._fetch(start, length, total)
        except (OSError, http.client.HTTPException) as exc:
            # Covers refused, reset, timeouts, TLS failures and IncompleteRead (a cut mid-range).
            self.close()
            raise SourceError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        except SourceError:
            self.close()  # the connection may hold an unread body: never reuse it
            raise

    def _fetch(self, start: int, length: int, total: int) -> bytes:
        end = start + length - 1
        connection = self._connect()
        path = self._parts.path + (f"?{self._parts.query}" if self._parts.query else "")
        connection.request("GET", path or "/", headers={"Range": f"bytes={start}-{end}"})
        response = connection.getresponse()
        if response.status != http.client.PARTIAL_CONTENT:
            raise SourceError(f"{self.url}: HTTP {response.status} {response.reason} for bytes {start}-{end}")
        expected = f"bytes {start}-{end}/{total}"
        content_range = response.getheader("Content-Range", "")
        if content_range.replace(" ", "") != expected.replace(" ", ""):
            # Another file (size changed on the CDN) or a server that answers another range.
            raise SourceError(f"{self.url}: Content-Range {content_range!r}, expected {expected!r}")
        data = response.read(length)
        if len(data) != length:
            raise SourceError(f"{self.url}: {len(data)} of {length} bytes for bytes {start}-{end}")
        if response.read(1):
            raise SourceError(f"{self.url}: more than {length} bytes for bytes {start}-{end}")
        return data

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._parts.scheme == "https":
                self._connection = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context)
            else:
                self._connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return self._connection
